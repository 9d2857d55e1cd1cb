"""A user's first contact: the hub-shaped CogVideoX-5b-I2V folder through every CLI command and the service, and
the failures a fresh install meets (missing tokenizer packages, accelerate, a broken config, no GPU, no RefAdapter)
answered with the fix."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from flexiact_backend.extraction import encode_video, prepare_training_data
from flexiact_backend.generation import FlexiActGenerator, configure_vae
from flexiact_backend.media import read_clip
from flexiact_backend.service.process import ServerProcess, free_port
from flexiact_backend.tiny import TINY_HEIGHT, TINY_WIDTH
from flexiact_backend.tiny_hub import HubFolder, make_hub_folder
from flexiact_backend.tools.cli import main

from service_helpers import Client, clip_bytes, png_bytes, upload, wait_job

HIDE = Path(__file__).with_name("hide_modules.py")


def cli_without(modules: list[str], *args: str) -> subprocess.CompletedProcess:
    """The real CLI in a subprocess where `modules` cannot be imported."""
    return subprocess.run([sys.executable, str(HIDE), ",".join(modules), *args], capture_output=True, text=True,
                          timeout=600)


def doctor_args(model: Path, tmp_path: Path, *extra: str) -> list[str]:
    return ["doctor", "--model", str(model), "--data-dir", str(tmp_path), "--port", str(free_port()), *extra]


@pytest.fixture(scope="module")
def bare_hub(tmp_path_factory: pytest.TempPathFactory) -> HubFolder:
    """The hub folder as downloaded without the RefAdapter."""
    return make_hub_folder(tmp_path_factory.mktemp("bare-hub"), refadapter=False)


def test_the_folder_has_the_hubs_shape(hub_folder: HubFolder) -> None:
    model = hub_folder.model
    tokenizer = sorted(p.name for p in (model / "tokenizer").iterdir())
    assert tokenizer == ["added_tokens.json", "special_tokens_map.json", "spiece.model", "tokenizer_config.json"]
    assert json.loads((model / "tokenizer" / "tokenizer_config.json").read_text())["tokenizer_class"] == "T5Tokenizer"
    for part in ("transformer", "text_encoder"):
        index = json.loads(next((model / part).glob("*.safetensors.index.json")).read_text())
        shards = set(index["weight_map"].values())
        assert len(shards) >= 2, part
        with safe_open(str(model / part / sorted(shards)[0]), framework="pt") as f:
            assert f.get_tensor(next(iter(f.keys()))).dtype == torch.bfloat16
    assert json.loads((model / "scheduler" / "scheduler_config.json").read_text())["_class_name"] == "CogVideoXDDIMScheduler"
    assert not (model / "flexiact.json").exists()
    for pt in (hub_folder.refadapter, hub_folder.action):  # torch.save pickles (zip archives), as published
        assert pt.read_bytes()[:2] == b"PK"


def test_every_cli_command_runs_on_the_hub_folder(hub_folder: HubFolder, motion_clip: Path, target_image,
                                                  tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    model = str(hub_folder.model)
    assert main(doctor_args(hub_folder.model, tmp_path)) == 0
    out = capsys.readouterr().out
    assert "[OK  ] tokenizer: T5Tokenizer" in out and "refnetlora_step40000_model.pt loads and fits" in out
    assert "all checks passed" in out

    imported = tmp_path / "jump.safetensors"
    assert main(["import-action", str(hub_folder.action), "--name", "jump", "--caption", "a jump", "--out", str(imported)]) == 0
    image = tmp_path / "target.png"
    target_image.save(image)
    video = tmp_path / "dog.mp4"  # the published .pt as it is (the service test generates with the imported one)
    assert main(["generate", "--model", model, "--image", str(image), "--prompt", "a dog jumps", "--action",
                 str(hub_folder.action), "--steps", "2", "--out", str(video)]) == 0
    assert video.stat().st_size > 0 and imported.is_file()
    assert "RefAdapter refnetlora_step40000_model.pt at 0.7" in capsys.readouterr().out

    extracted = tmp_path / "slide.safetensors"
    assert main(["extract", "--model", model, "--video", str(motion_clip), "--end", "1.5", "--caption", "a block slides",
                 "--steps", "2", "--out", str(extracted)]) == 0
    assert extracted.stat().st_size > 0


def test_service_runs_on_the_hub_folder(hub_folder: HubFolder, tmp_path: Path) -> None:
    with ServerProcess(tmp_path / "server", model_dir=hub_folder.model) as server:
        client = Client(server.url)
        status, health = client.request("GET", "/v1/health")
        assert status == 200 and health["model"]["id"] == "THUDM/CogVideoX-5b-I2V" and not health["model"]["tiny"]
        clip = upload(client, clip_bytes(tmp_path / "clip.mp4"), "video/mp4", "clip.mp4")
        image = upload(client, png_bytes(3, (96, 64)), "image/png", "frame.png")
        pt = upload(client, hub_folder.action.read_bytes(), "application/octet-stream", "jump.pt")
        status, imported = client.request("POST", "/v1/actions/import", json_body={"name": "jump", "caption": "a jump",
                                                                                  "file": pt["id"]})
        assert status == 201, imported
        status, extraction = client.request("POST", "/v1/actions", json_body={
            "name": "slide", "caption": "a block slides", "video": clip["id"], "start_s": 0, "end_s": 1.5, "steps": 2,
            "preview_every": 0})
        assert status == 202, extraction
        assert wait_job(client, extraction["job"]["id"])["status"] == "succeeded"
        status, accepted = client.request("POST", "/v1/generations", json_body={
            "image": image["id"], "prompt": "a dog jumps", "action": imported["id"], "steps": 2})
        assert status == 202, accepted
        job = wait_job(client, accepted["job"]["id"])
        assert job["status"] == "succeeded", job
        assert job["result"]["refadapter"] == "refnetlora_step40000_model.pt" and job["result"]["lora_weight"] == 0.7
        for h in (0.5, 650):  # a fraction and a timestep, both under 0.7
            status, body = client.request("POST", "/v1/generations", json_body={
                "image": image["id"], "prompt": "a dog jumps", "steps": 2, "high_timesteps": h})
            assert status == 422 and body["error"]["code"] == "bad_transition", body
            assert "outside 0.7-1" in body["error"]["message"]


def test_missing_refadapter_is_refused_unless_asked_for(bare_hub: HubFolder, target_image, tmp_path: Path,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    """A real model without its RefAdapter: no silent weight-0 run that still reports 0.7."""
    model = str(bare_hub.model)
    assert main(doctor_args(bare_hub.model, tmp_path)) == 1
    out = capsys.readouterr().out
    assert "[FAIL] refadapter: no refadapter.safetensors or refnetlora_step40000_model.pt" in out
    image = tmp_path / "target.png"
    target_image.save(image)
    video = tmp_path / "out.mp4"
    args = ["generate", "--model", model, "--image", str(image), "--prompt", "a dog jumps", "--steps", "2", "--out", str(video)]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "no RefAdapter is loaded for THUDM/CogVideoX-5b-I2V, so RefAdapter weight 0.7 cannot run" in err
    assert "--no-refadapter" in err and not video.exists()
    assert main([*args, "--no-refadapter"]) == 0
    assert "; no RefAdapter" in capsys.readouterr().out and video.stat().st_size > 0

    generator = FlexiActGenerator.from_pretrained(bare_hub.model, device="cpu")
    result = generator.generate(target_image, "a dog jumps", steps=1, lora_weight=0.0)
    assert result.settings.lora_weight == 0.0 and result.settings.refadapter is None
    with_it = FlexiActGenerator.from_pretrained(bare_hub.model, device="cpu", refadapter=make_refadapter(bare_hub, tmp_path))
    ran = with_it.generate(target_image, "a dog jumps", steps=1).settings
    assert ran.refadapter == "refadapter.pt" and ran.lora_weight == 0.7

    with ServerProcess(tmp_path / "server", model_dir=bare_hub.model) as server:
        client = Client(server.url)
        image_id = upload(client, png_bytes(3, (96, 64)), "image/png", "frame.png")["id"]
        status, body = client.request("POST", "/v1/generations", json_body={"image": image_id, "prompt": "a dog jumps",
                                                                            "steps": 1})
        assert status == 422 and body["error"]["code"] == "refadapter_missing", body
        assert "lora_weight 0" in body["error"]["message"] and str(tmp_path) not in body["error"]["message"]
        status, body = client.request("POST", "/v1/generations", json_body={"image": image_id, "prompt": "a dog jumps",
                                                                            "steps": 1, "lora_weight": 0.0})
        assert status == 202, body
        job = wait_job(client, body["job"]["id"])
        assert job["status"] == "succeeded" and job["result"]["refadapter"] is None and job["result"]["lora_weight"] == 0


def make_refadapter(hub: HubFolder, tmp_path: Path) -> Path:
    from flexiact_backend.tiny_hub import published_refadapter

    path = tmp_path / "refadapter.pt"
    torch.save(published_refadapter(2, 32), path)
    return path


def test_missing_tokenizer_packages_are_named(hub_folder: HubFolder, target_image, tmp_path: Path) -> None:
    """Not transformers' "tiktoken is required": doctor and generate name sentencepiece/protobuf and the fix."""
    done = cli_without(["google.protobuf"], *doctor_args(hub_folder.model, tmp_path))
    assert done.returncode == 1, done.stdout + done.stderr
    assert "[FAIL] tokenizer packages: protobuf not installed" in done.stdout
    assert "fix: pip install protobuf" in done.stdout
    assert "[FAIL] tokenizer: T5Tokenizer in" in done.stdout  # it really tried to load it
    image = tmp_path / "target.png"
    target_image.save(image)
    done = cli_without(["sentencepiece"], "generate", "--model", str(hub_folder.model), "--image", str(image),
                       "--prompt", "a dog jumps", "--steps", "1", "--out", str(tmp_path / "out.mp4"))
    assert done.returncode == 2, done.stdout + done.stderr
    assert "transformers needs both sentencepiece and protobuf" in done.stderr
    assert "sentencepiece is not installed" in done.stderr and "pip install sentencepiece" in done.stderr
    assert "tiktoken" not in done.stderr and "Traceback" not in done.stderr


def test_doctor_fails_without_accelerate_for_memory_saving(hub_folder: HubFolder, tmp_path: Path) -> None:
    done = cli_without(["accelerate"], *doctor_args(hub_folder.model, tmp_path, "--memory-saving"))
    assert done.returncode == 1
    assert "[FAIL] accelerate: not installed: --memory-saving (model CPU offload) imports it" in done.stdout
    assert "fix: pip install accelerate" in done.stdout


def test_doctor_fails_on_a_broken_config_and_a_missing_shard(hub_folder: HubFolder, tmp_path: Path,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    broken = tmp_path / "model"
    shutil.copytree(hub_folder.model, broken)
    (broken / "vae" / "config.json").write_text('{"_class_name": "AutoencoderKLCogVideoX", "block_out_')
    assert main(doctor_args(broken, tmp_path)) == 1
    out = capsys.readouterr().out
    assert "[FAIL] weights: configs in" in out and "fix: re-run (it resumes): flexiact-backend download" in out
    shutil.copy(hub_folder.model / "vae" / "config.json", broken / "vae" / "config.json")
    shard = sorted((broken / "transformer").glob("*-00002-of-*.safetensors"))[0]
    shard.unlink()
    assert main(doctor_args(broken, tmp_path)) == 1
    assert f"names 1 missing shard(s), e.g. {shard.name}" in capsys.readouterr().out


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal is for machines without a CUDA GPU")
def test_memory_saving_without_a_gpu_says_so(hub_folder: HubFolder, tmp_path: Path, target_image,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    image = tmp_path / "target.png"
    target_image.save(image)
    assert main(["generate", "--model", str(hub_folder.model), "--memory-saving", "--image", str(image), "--prompt",
                 "a dog", "--steps", "1", "--out", str(tmp_path / "out.mp4")]) == 2
    assert "error: --memory-saving needs a CUDA GPU" in capsys.readouterr().err
    assert main(["serve", "--model", str(hub_folder.model), "--memory-saving", "--data-dir", str(tmp_path / "d"),
                 "--port", str(free_port())]) == 2
    assert "error: --memory-saving needs a CUDA GPU" in capsys.readouterr().err
    assert main(doctor_args(hub_folder.model, tmp_path, "--memory-saving")) == 1
    assert "[FAIL] memory saving: --memory-saving needs a CUDA GPU" in capsys.readouterr().out


def test_latents_are_tiled_as_the_authors_encode_them(hub_folder: HubFolder, motion_clip: Path, tmp_path: Path) -> None:
    """Every mode sets the VAE up with `configure_vae` before placing the model (memory saving itself needs a GPU):
    tiling and slicing are on; at the hub's ratio (tiles of half the frame, 240x360 at 720x480) tiling really runs
    and changes the latents, and the latent cache key records the tiling state."""
    generator = FlexiActGenerator.from_pretrained(hub_folder.model, device="cpu")
    vae = generator.pipe.vae
    assert vae.use_tiling and vae.use_slicing
    vae.enable_tiling(tile_sample_min_height=TINY_HEIGHT // 2, tile_sample_min_width=TINY_WIDTH // 2)
    configure_vae(vae)  # keeps the tiles, steps them by whole latents
    frames = read_clip(motion_clip, 0.0, 1.125, 9)
    torch.manual_seed(0)
    tiled, _ = encode_video(generator, frames)
    vae.disable_tiling()
    torch.manual_seed(0)
    plain, _ = encode_video(generator, frames)
    assert tiled.shape == plain.shape and not torch.equal(tiled, plain)  # tiling ran and changed the blend bands
    configure_vae(vae)
    torch.manual_seed(0)
    assert torch.equal(encode_video(generator, frames)[0], tiled)

    def cache_key() -> str:
        return prepare_training_data(generator, video=motion_clip, clip_sha256="c", start_s=0.0, end_s=1.5, caption="c",
                                     seed=0, num_crops=1, windows_per_crop=1, cache_dir=tmp_path)[1]["cache"]

    tiled_key = cache_key()
    vae.disable_tiling()
    assert cache_key() != tiled_key
