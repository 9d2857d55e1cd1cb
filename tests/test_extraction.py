"""FAE extraction on the tiny model: it learns, encodes once, resumes exactly, cancels safely, writes action files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from flexiact_backend.actions import import_published_action, read_action
from flexiact_backend.tools.cli import main
from flexiact_backend.errors import Cancelled, CheckpointError, MediaError, Paused
from flexiact_backend.extraction import CHECKPOINT_NAME, ExtractionConfig, FAETrainer, extract_action, prepare_training_data
from flexiact_backend.media import probe_video, read_clip, write_mp4


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
    assert len(stored["sampling"]["crops"]) == 12 and stored["duration_s"] == pytest.approx(1.125)
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
    run("first", steps=15, end_s=1.0, cache_dir=tmp_path / "own-cache")
    assert len(count_vae_encodes) == 2 * 12  # each crop's clip and its frame 0, once per extraction
    run("second", steps=15, end_s=1.0, cache_dir=tmp_path / "own-cache")
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
                 "--end", "2", "--caption", "a block slides", "--steps", "6", "--checkpoint-every", "3", "--preview-every", "3",
                 "--out", str(action)]) == 0
    assert sorted(p.name for p in (tmp_path / "slide.safetensors.previews").iterdir()) == ["step_000003.mp4", "step_000006.mp4"]
    printed = capsys.readouterr()
    assert "last step's loss" in printed.out and "training" in printed.err  # the bar names the phase it is in
    assert main(["extract", "--model", str(tiny_model_dir), "--device", "cpu", "--video", str(motion_clip), "--end", "2",
                 "--caption", "a block slides", "--steps", "6", "--out", str(action)]) == 2
    assert "--resume" in capsys.readouterr().err
    torch.save(dict(read_action(action)[0]), tmp_path / "published.pt")
    assert main(["import-action", str(tmp_path / "published.pt"), "--name", "slide", "--caption", "c", "--out", str(tmp_path / "imp.safetensors")]) == 0
    out = tmp_path / "video.mp4"
    assert main(["generate", "--model", str(tiny_model_dir), "--device", "cpu", "--action", str(tmp_path / "imp.safetensors"),
                 "--image", str(image), "--prompt", "a block slides", "--steps", "3", "--fps", "24", "--out", str(out)]) == 0
    assert probe_video(out).frames == 27
    # the action files get the mode the video gets (not mkstemp's 0600)
    assert {f.stat().st_mode & 0o777 for f in (action, tmp_path / "imp.safetensors")} == {out.stat().st_mode & 0o777}
    assert main(["generate", "--model", str(tiny_model_dir), "--image", str(tmp_path / "missing.png"), "--prompt", "p", "--out", str(out)]) == 2


@pytest.fixture(scope="module")
def long_clip(tmp_path_factory) -> Path:
    """Four seconds at 24 fps of a block crossing the frame once: every window of it shows another stretch."""
    frames = np.zeros((96, 64, 96, 3), np.uint8)
    for i in range(96):
        frames[i, 20:40, i * 76 // 95 : i * 76 // 95 + 20] = 255
    path = tmp_path_factory.mktemp("long") / "cross.mp4"
    write_mp4(path, frames, 24)
    return path


def test_short_trim_keeps_its_duration_long_trim_trains_from_windows(run, tiny_generator, long_clip, tmp_path,
                                                                   count_vae_encodes) -> None:
    """0.5 s (shorter than the tiny model's 1.125 s clip) is resampled and recorded as 0.5 s; 3 s is taken at
    8 fps and learned from a bounded set of 1.125 s windows per crop, each encoded once."""
    short = run("short", end_s=0.5, steps=2)
    assert short["duration_s"] == pytest.approx(0.5)
    assert short["sampling"]["windowed"] is False and short["sampling"]["sampled_frames"] == 9
    assert short["sampling"]["windows"] == [[0.0]] * 12
    assert read_action(tmp_path / "short.safetensors")[1]["duration_s"] == pytest.approx(0.5)

    count_vae_encodes.clear()
    long = run("long", video=long_clip, start_s=0.5, end_s=3.5, steps=2, cache_dir=tmp_path / "long-cache")
    assert long["duration_s"] == pytest.approx(1.125)
    sampling = long["sampling"]
    assert sampling["windowed"] is True and sampling["sampled_frames"] == 24  # 3 s at the model's 8 fps
    windows = sampling["windows"]
    assert len(windows) == 12 and all(len(w) == 4 == len(set(w)) for w in windows)
    assert all(0 <= s <= 3.0 - 1.125 and (s * 8) == pytest.approx(round(s * 8)) for w in windows for s in w)
    assert len({s for w in windows for s in w}) > 4  # crops draw their own windows
    assert len(count_vae_encodes) == 2 * 12 * 4  # each window of each crop once, then never again
    assert all(shape[2] == 9 for shape in count_vae_encodes[::2])  # windows of the model's 9 frames

    data, _ = prepare_training_data(
        tiny_generator, video=long_clip, clip_sha256=long["clip_sha256"], start_s=0.5, end_s=3.5,
        caption="a block slides", seed=3, num_crops=12, windows_per_crop=4, cache_dir=tmp_path / "long-cache")
    assert len(count_vae_encodes) == 2 * 12 * 4
    assert data.latents.shape[:3] == (12, 4, 3) and data.image_latents.shape[:3] == (12, 4, 1)
    assert not torch.equal(data.latents[0, 0], data.latents[0, 3])  # the windows show different stretches
    trainer = FAETrainer(tiny_generator, data, ExtractionConfig(seed=1))
    assert {trainer.draw().window for _ in range(100)} == {0, 1, 2, 3}


def test_each_step_trains_on_its_drawn_window_and_caption(run, tiny_generator, long_clip, tmp_path) -> None:
    """What the transformer receives is the drawn window of the drawn crop, noised, and the caption embedding
    or (caption dropout) the empty one; caption dropout happens in about 10% of steps."""
    data, _ = prepare_training_data(
        tiny_generator, video=long_clip, clip_sha256="windows", start_s=0.5, end_s=3.5, caption="a block slides",
        seed=3, num_crops=12, windows_per_crop=4, cache_dir=tmp_path)
    assert not torch.equal(data.prompt_embeds, data.empty_prompt_embeds)
    trainer = FAETrainer(tiny_generator, data, ExtractionConfig(seed=11))
    dropped = [trainer.draw().drop_caption for _ in range(4000)]
    assert 0.085 <= np.mean(dropped) <= 0.115

    seen = []
    hook = tiny_generator.pipe.transformer.register_forward_pre_hook(
        lambda m, a, kw: seen.append((kw["hidden_states"].detach(), kw["encoder_hidden_states"].detach())), with_kwargs=True)
    try:
        captions = set()
        for _ in range(40):
            d = trainer.draw()
            with torch.no_grad():
                trainer.loss(d)
            hidden, text = seen[-1]
            a = trainer.alphas_cumprod[d.timestep]
            expected = a.sqrt() * data.latents[d.crop, d.window] + (1 - a).sqrt() * d.noise[0]
            assert torch.allclose(hidden[0, :, :4], expected, atol=1e-5)
            assert torch.equal(text[0], (data.empty_prompt_embeds if d.drop_caption else data.prompt_embeds)[0])
            captions.add(d.drop_caption)
        assert captions == {True, False}
    finally:
        hook.remove()


def test_generation_with_a_short_action_lasts_its_duration(run, tiny_generator, target_image, tmp_path) -> None:
    """The 0.5 s action's clip plays 0.5 s at 24 and 29.97 fps; tempo "model" and published actions: 1.125 s."""
    run("brief", end_s=0.5, steps=2)
    action = tmp_path / "brief.safetensors"
    result = tiny_generator.generate(target_image, "a block slides", steps=2, action=action)
    assert result.duration_s == pytest.approx(0.5)
    for fps, frames in ((24.0, 12), (30000 / 1001, 15)):
        info = probe_video(result.write_mp4(tmp_path / f"brief-{fps:.2f}.mp4", fps=fps))
        assert info.frames == frames and info.duration_s == pytest.approx(0.5, abs=0.5 / fps)
    model = tiny_generator.generate(target_image, "a block slides", steps=2, action=action, tempo="model")
    assert model.duration_s == pytest.approx(1.125) and np.array_equal(model.frames, result.frames)
    assert probe_video(model.write_mp4(tmp_path / "model.mp4", fps=24)).frames == 27
    torch.save(dict(read_action(action)[0]), tmp_path / "published.pt")
    assert tiny_generator.generate(target_image, "x", steps=1, action=tmp_path / "published.pt").duration_s == pytest.approx(1.125)
    with pytest.raises(ValueError, match="tempo"):
        tiny_generator.generate(target_image, "x", steps=1, tempo="slow")


def test_previews_render_the_tokens_so_far_and_change_nothing(run, tiny_generator, tmp_path, motion_clip) -> None:
    """Previews come at each preview step, show the action as trained so far, and leave the training exact."""
    previews: list[tuple[int, object]] = []
    phases: list[str] = []
    meta = run("previewed", steps=6, checkpoint_every=3, preview_every=2,
               preview=lambda step, result: previews.append((step, result)),
               progress=lambda u: phases.append(u["phase"]))
    run("plain", steps=6, checkpoint_every=3)
    assert [step for step, _ in previews] == [2, 4, 6]
    assert phases.count("previewing") == 3
    info = tiny_generator.info
    for _, result in previews:
        assert result.frames.shape == (info.frames, info.height, info.width, 3)
        assert result.settings.steps == 10 and result.settings.seed == 3
        assert result.settings.refadapter is None and result.settings.lora_weight == 0.0  # the tiny model has none
        assert result.reweights[0] == 1.0  # the reweighting is on, as in a real generation
    a, _ = read_action(tmp_path / "previewed.safetensors")
    b, _ = read_action(tmp_path / "plain.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a), "rendering previews changed the trained tokens"
    assert meta["steps_trained"] == 6
    # the last preview is the finished action performed by the trim's first frame, at the preview's settings
    first_frame = Image.fromarray(read_clip(motion_clip, 0.0, 2.0, 1)[0])
    final = tiny_generator.generate(first_frame, "a block slides", action=tmp_path / "previewed.safetensors",
                                    seed=3, steps=10)
    assert np.array_equal(previews[-1][1].frames, final.frames)
    assert not np.array_equal(previews[0][1].frames, previews[-1][1].frames)  # the action moved between previews


def test_finish_writes_the_action_from_the_tokens_so_far(run, tmp_path) -> None:
    """Finish stops at the next step boundary: the action equals a run asked for that many steps."""
    updates: list[dict] = []
    meta = run("early", steps=40, progress=updates.append,
               finish=lambda: any(u.get("step") == 7 for u in updates))
    assert meta["steps"] == 40 and meta["steps_trained"] == 7 and len(meta["losses"]) == 7
    tokens, stored = read_action(tmp_path / "early.safetensors")
    assert stored["steps_trained"] == 7
    run("seven", steps=7)
    expected, _ = read_action(tmp_path / "seven.safetensors")
    assert all(torch.equal(tokens[k], expected[k]) for k in tokens)
