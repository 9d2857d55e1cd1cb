"""FAE extraction on the tiny model: it learns, encodes once, resumes exactly, cancels safely, writes action files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from flexiact_backend.actions import import_published_action, read_action
from flexiact_backend.cli import main
from flexiact_backend.errors import Cancelled, CheckpointError, MediaError, Paused
from flexiact_backend.extraction import CHECKPOINT_NAME, extract_action


@pytest.fixture(scope="module")
def latent_cache(tmp_path_factory) -> Path:
    """One latent cache for the module: tests that do not count encodes need not pay for them again."""
    return tmp_path_factory.mktemp("latent-cache")


@pytest.fixture()
def run(tiny_generator, motion_clip, tmp_path, latent_cache):
    def extract(name: str, **kw) -> dict:
        defaults = dict(video=motion_clip, start_s=0.0, end_s=2.0, caption="a block slides", name=name,
                        out=tmp_path / f"{name}.safetensors", work_dir=tmp_path / f"{name}.work", steps=40, seed=3,
                        checkpoint_every=10, cache_dir=latent_cache)
        return extract_action(tiny_generator, **{**defaults, **kw})

    return extract


@pytest.fixture()
def count_vae_encodes(tiny_generator):
    vae = tiny_generator.pipe.vae
    original = vae.encode
    calls = []

    def counting(x, *a, **kw):
        calls.append(tuple(x.shape))
        return original(x, *a, **kw)

    vae.encode = counting
    yield calls
    del vae.encode


def test_training_learns_and_moves_tokens(run, tiny_generator, tmp_path, target_image) -> None:
    meta = run("learn", steps=200, checkpoint_every=100)
    losses = np.array(meta["losses"])
    fifth = len(losses) // 5
    assert losses[-fifth:].mean() < losses[:fifth].mean()
    tokens, stored = read_action(tmp_path / "learn.safetensors")
    assert max(t.abs().max().item() for t in tokens.values()) > 1e-3
    assert stored["name"] == "learn" and stored["steps"] == 200 and stored["clip_sha256"] == meta["clip_sha256"]
    assert stored["trim"] == [0.0, 2.0] and stored["base_model"] == tiny_generator.info.id and stored["format_version"] == 1
    assert len(stored["crops"]) == 12
    with_action = tiny_generator.generate(target_image, "a block slides", steps=4, action=tmp_path / "learn.safetensors")
    without = tiny_generator.generate(target_image, "a block slides", steps=4)
    assert not np.array_equal(with_action.frames, without.frames)


def test_only_motion_tokens_get_gradients(run, tiny_generator, tmp_path) -> None:
    transformer = tiny_generator.pipe.transformer
    seen = []

    def inspect(update: dict) -> None:
        if update.get("phase") == "training":
            seen.append(sorted(n.split(".")[-1] for n, p in transformer.named_parameters() if p.grad is not None))

    run("grads", steps=3, progress=inspect)
    assert seen == [["motion_inversion_tokens"] * 2] * 3
    assert not any(p.requires_grad or p.grad is not None for p in transformer.parameters())


def test_vae_encodes_each_crop_once_and_cache_is_reused(run, tiny_generator, tmp_path, count_vae_encodes) -> None:
    run("first", steps=15, cache_dir=tmp_path / "own-cache")
    assert len(count_vae_encodes) == 2 * 12  # each crop's clip and its frame 0, once per extraction
    run("second", steps=15, cache_dir=tmp_path / "own-cache")
    assert len(count_vae_encodes) == 2 * 12  # same clip, trim, seed, model: latents come from the cache


def test_resume_matches_uninterrupted(run, tiny_generator, tmp_path) -> None:
    run("straight")
    pauses = iter([False, True])  # pause at the second checkpoint (step 20)
    with pytest.raises(Paused):
        run("resumed", pause=lambda: next(pauses, False))
    assert torch.load(tmp_path / "resumed.work" / CHECKPOINT_NAME, weights_only=True)["step"] == 20
    assert not (tmp_path / "resumed.safetensors").exists()
    run("resumed")
    a, _ = read_action(tmp_path / "straight.safetensors")
    b, _ = read_action(tmp_path / "resumed.safetensors")
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-6


def test_cancel_keeps_last_checkpoint(run, tiny_generator, tmp_path) -> None:
    updates = []
    with pytest.raises(Cancelled):
        run("cancel", progress=updates.append,
            cancel=lambda: any(u.get("step") == 25 for u in updates))
    assert max(u.get("step", 0) for u in updates) == 25
    assert torch.load(tmp_path / "cancel.work" / CHECKPOINT_NAME, weights_only=True)["step"] == 20
    assert not (tmp_path / "cancel.safetensors").exists()
    training = [u for u in updates if u.get("phase") == "training"]
    assert all({"step", "total", "loss", "steps_per_s", "eta_s"} <= set(u) for u in training)


def test_bad_trim_raises_media_error_and_writes_nothing(run, tiny_generator, tmp_path) -> None:
    with pytest.raises(MediaError):
        run("bad", start_s=1.8, end_s=2.0)
    assert not (tmp_path / "bad.safetensors").exists()


def test_published_pt_imports_without_retraining(tiny_generator, tmp_path, target_image) -> None:
    g = torch.Generator().manual_seed(5)
    published = {k: torch.randn(v.shape, generator=g) for k, v in tiny_generator.adapter.action_state_dict().items()}
    torch.save(published, tmp_path / "fae.pt")
    meta = import_published_action(tmp_path / "fae.pt", name="wave", caption="a person waves", out=tmp_path / "wave.safetensors")
    assert meta["name"] == "wave" and meta["source"] == "imported" and meta["num_layers"] == 2
    tokens, _ = read_action(tmp_path / "wave.safetensors")
    assert all(torch.equal(tokens[k], v) for k, v in published.items())
    a = tiny_generator.generate(target_image, "x", steps=3, action=tmp_path / "fae.pt")
    b = tiny_generator.generate(target_image, "x", steps=3, action=tmp_path / "wave.safetensors")
    assert np.array_equal(a.frames, b.frames)
    torch.save({"transformer_blocks.0.attn1.processor.lora_q.down.weight": torch.zeros(2, 2)}, tmp_path / "lora.pt")
    with pytest.raises(CheckpointError, match="motion_inversion_tokens"):
        import_published_action(tmp_path / "lora.pt", name="x", caption="x", out=tmp_path / "x.safetensors")
    assert not (tmp_path / "x.safetensors").exists()


def test_cli_extract_import_generate(tiny_model_dir, motion_clip, tmp_path, target_image, capsys) -> None:
    image = tmp_path / "target.png"
    target_image.save(image)
    action = tmp_path / "slide.safetensors"
    assert main(["extract", "--model", str(tiny_model_dir), "--device", "cpu", "--video", str(motion_clip), "--start", "0",
                 "--end", "2", "--caption", "a block slides", "--steps", "6", "--checkpoint-every", "3", "--out", str(action)]) == 0
    assert main(["extract", "--model", str(tiny_model_dir), "--device", "cpu", "--video", str(motion_clip), "--end", "2",
                 "--caption", "a block slides", "--steps", "6", "--out", str(action)]) == 2
    assert "--resume" in capsys.readouterr().err
    torch.save(dict(read_action(action)[0]), tmp_path / "published.pt")
    assert main(["import-action", str(tmp_path / "published.pt"), "--name", "slide", "--caption", "c", "--out", str(tmp_path / "imp.safetensors")]) == 0
    out = tmp_path / "video.mp4"
    assert main(["generate", "--model", str(tiny_model_dir), "--device", "cpu", "--action", str(tmp_path / "imp.safetensors"),
                 "--image", str(image), "--prompt", "a block slides", "--steps", "3", "--fps", "24", "--out", str(out)]) == 0
    from flexiact_backend.media import probe_video

    assert probe_video(out).frames == 27
    assert main(["generate", "--model", str(tiny_model_dir), "--image", str(tmp_path / "missing.png"), "--prompt", "p", "--out", str(out)]) == 2
