"""One job on several ranks (gloo on the CPU, loopback): CFG-parallel, Ulysses and both equal one process.

The tiny model is built with 4 heads so Ulysses can split them over 4 ranks. Motion tokens, the RefAdapter and the
reweighting bias are all on; 4 denoising steps put two inside the bias window (999 with the full bias, 749 on its
cosine) and two past it. Each world size is started once per module and runs every check it serves.
"""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from flexiact_backend.extraction import ExtractionConfig, FAETrainer, prepare_training_data
from flexiact_backend.generation import FlexiActGenerator
from flexiact_backend.parallel.extraction import extraction_ranks
from flexiact_backend.parallel.launch import run_ranks
from flexiact_backend.parallel.sequence_parallel import parallelize
from flexiact_backend.parallel.ulysses import gather, heads_to_sequence, own_slice, sequence_to_heads, shard_sizes
from flexiact_backend.parallel.util import ParallelConfig, build_mesh
from flexiact_backend.tiny import make_tiny_model

STEPS = 4
#: 6 steps: two biased (999, 833), then the step cache may serve from step 3 on.
CACHE_STEPS = 6
TIMEOUT_S = 240
GENERATION_CONFIGS = {2: [ParallelConfig(cfg=2), ParallelConfig(ulysses=2)],
                      4: [ParallelConfig(ulysses=4), ParallelConfig(cfg=2, ulysses=2)]}


def _image() -> Image.Image:
    y, x = np.mgrid[0:64, 0:96]
    return Image.fromarray(np.stack([x * 255 // 95, y * 255 // 63, (x // 8 + y // 8) % 2 * 255], -1).astype(np.uint8))


def _load(model_dir: Path, device: torch.device) -> FlexiActGenerator:
    """The tiny generator with random (seeded, so every rank agrees) motion tokens and a non-zero RefAdapter."""
    generator = FlexiActGenerator.from_pretrained(model_dir, device=device)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for key, value in generator.adapter.refadapter_state_dict().items():
            value.copy_(torch.randn(value.shape, generator=g) * 0.2)
    return generator


def _action(generator: FlexiActGenerator) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(2)
    return {k: torch.randn(v.shape, generator=g) for k, v in generator.adapter.action_state_dict().items()}


def _latents(generator: FlexiActGenerator, steps: int = STEPS, **options) -> tuple[list[np.ndarray], np.ndarray, list[int]]:
    """Each step's latents (read off the scheduler), the frames and the step-cached steps of one generation."""
    scheduler = generator.pipe.scheduler
    seen: list[np.ndarray] = []
    step = scheduler.step

    @functools.wraps(step)  # the pipeline passes `generator` only to a step whose signature names it
    def recording(*args, **kwargs):
        out = step(*args, **kwargs)
        seen.append(out[0].float().numpy().copy())
        return out

    scheduler.step = recording
    try:
        result = generator.generate(_image(), "a person walks", action=_action(generator), steps=steps, seed=3, **options)
    finally:
        del scheduler.step
    return seen, result.frames, result.cached_steps


def _training_data(generator: FlexiActGenerator, clip: Path, cache: Path):
    return prepare_training_data(generator, video=clip, clip_sha256="slide", start_s=0.0, end_s=2.0, caption="a block slides",
                                 seed=0, num_crops=2, windows_per_crop=2, cache_dir=cache)[0]


def _extraction_step(generator: FlexiActGenerator, trainer: FAETrainer) -> dict:
    """One training step (selective recompute on, as `extract_action` runs it): loss, clipped gradient, new tokens."""
    transformer = generator.pipe.transformer
    for p in trainer.params:
        p.requires_grad_(True)
    transformer.enable_gradient_checkpointing()
    try:
        loss = trainer.train_step()
    finally:
        transformer.disable_gradient_checkpointing()
    return {"loss": loss, "grad": torch.cat([p.grad.flatten() for p in trainer.params]).numpy(),
            "tokens": torch.cat([p.detach().flatten() for p in trainer.params]).numpy()}


def _on_rank(device: torch.device, model_dir: Path, configs: list[ParallelConfig], clip: Path, cache: Path) -> dict:
    """Every check one world size serves: generations on each mesh, a sequence- and a data-parallel step."""
    generator = _load(model_dir, device)
    world = torch.distributed.get_world_size()
    results: dict = {"generation": [], "attention_inputs": []}
    seen = results["attention_inputs"]  # (batch, video tokens) each attention really ran on: proof of the split
    generator.pipe.transformer.transformer_blocks[0].attn1.register_forward_pre_hook(
        lambda module, args, kwargs: seen.append(tuple(kwargs["hidden_states"].shape[:2])), with_kwargs=True)
    for config in configs:
        with parallelize(generator.pipe.transformer, build_mesh(config)):
            results["generation"].append(_latents(generator))
    if world == 2:  # test time: the step cache on 2 ranks, the extraction modes on 4
        with parallelize(generator.pipe.transformer, build_mesh(configs[-1])):  # each rank caches its own shard
            results["step_cache"] = _latents(generator, steps=CACHE_STEPS, step_cache=True)
        results["attention_inputs"] = sorted(set(seen))
        return results
    data = _training_data(generator, clip, cache)
    for mode, config in (("sequence", ParallelConfig(ulysses=world)), ("data", ParallelConfig(data=world))):
        generator.adapter.load_action(_action(generator))
        ranks = extraction_ranks(build_mesh(config))
        trainer = ranks.trainer(generator, data, ExtractionConfig(seed=5, windows_per_step=world))
        with ranks.training(generator):
            results[mode] = _extraction_step(generator, trainer)
    results["attention_inputs"] = sorted(set(seen))
    return results


def _uneven_round_trip(device: torch.device) -> dict:
    """All-to-all and gathers on 7 tokens over 2 ranks (shards of 4 and 3), forward and backward."""
    group = torch.distributed.group.WORLD
    rank = torch.distributed.get_rank()
    full = torch.arange(1 * 4 * 7 * 2, dtype=torch.float32).view(1, 4, 7, 2)
    sizes = shard_sizes(7, 2)
    mine = full[:, :, sum(sizes[:rank]) : sum(sizes[: rank + 1])].clone().requires_grad_(True)
    heads = sequence_to_heads(mine, sizes, group)
    back = heads_to_sequence(heads, sizes, group)
    (heads * (rank + 1)).sum().backward()
    replicated = torch.randn(3, 4, generator=torch.Generator().manual_seed(0), requires_grad=True)
    sliced = own_slice(replicated, 1, [2, 2], group)
    gather(sliced * 2, 1, [2, 2], group).sum().backward()
    return {"heads": heads.detach(), "back": back.detach(), "grad": mine.grad, "replicated_grad": replicated.grad}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("models") / "tiny4", heads=4)


@pytest.fixture(scope="module")
def single(model_dir: Path, motion_clip: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """One process: the generation, and one extraction step on 1, 2 and 4 windows (cache shared with the ranks)."""
    generator = _load(model_dir, torch.device("cpu"))
    cache = tmp_path_factory.mktemp("cache")
    data = _training_data(generator, motion_clip, cache)
    steps = {}
    for windows in (4,):
        generator.adapter.load_action(_action(generator))
        steps[windows] = _extraction_step(generator, FAETrainer(generator, data, ExtractionConfig(seed=5, windows_per_step=windows)))
    return {"generation": _latents(generator), "step_cache": _latents(generator, steps=CACHE_STEPS, step_cache=True),
            "extraction": steps, "cache": cache}


def test_uneven_shards_round_trip() -> None:
    ranks = run_ranks(_uneven_round_trip, 2, timeout_s=TIMEOUT_S)
    full = np.arange(56, dtype=np.float32).reshape(1, 4, 7, 2)
    assert [r["heads"].shape for r in ranks] == [(1, 2, 7, 2)] * 2
    for rank, r in enumerate(ranks):
        np.testing.assert_array_equal(r["heads"], full[:, 2 * rank : 2 * rank + 2])
        own = slice(0, 4) if rank == 0 else slice(4, 7)
        np.testing.assert_array_equal(r["back"], full[:, :, own])
        # d/d(own tokens) of sum over ranks j of (j+1) * heads_j: heads 0-1 weigh 1, heads 2-3 weigh 2
        np.testing.assert_array_equal(r["grad"], np.broadcast_to(np.array([1, 1, 2, 2.0]).reshape(1, 4, 1, 1), r["grad"].shape))
        np.testing.assert_array_equal(r["replicated_grad"], np.full((3, 4), 2.0))


@pytest.fixture(scope="module")
def ranks(model_dir: Path, motion_clip: Path, single: dict):
    """`ranks(world)`: every rank's results of `_on_rank`, each world size started once for the module."""
    started: dict[int, list[dict]] = {}

    def results(world: int) -> list[dict]:
        if world not in started:
            started[world] = run_ranks(_on_rank, world, (model_dir, GENERATION_CONFIGS[world], motion_clip, single["cache"]),
                                       timeout_s=TIMEOUT_S)
        return started[world]

    return results


@pytest.mark.parametrize("world", [2, 4])
def test_generation_on_ranks_equals_one_process(single: dict, ranks, world: int) -> None:
    results = ranks(world)
    assert len(single["generation"][0]) == STEPS
    tokens = 3 * 4 * 6  # the tiny model's video tokens: 3 latent frames of 4 x 6 patches
    shapes = {(2, tokens // c.ulysses) if c.cfg == 1 else (1, tokens // c.ulysses) for c in GENERATION_CONFIGS[world]}
    if world == 4:
        shapes |= {(1, tokens // world), (1, tokens)}  # the sequence-parallel and the data-parallel extraction step
    assert all(set(map(tuple, r["attention_inputs"])) == shapes for r in results)
    runs = [(config, i) for i, config in enumerate(GENERATION_CONFIGS[world])]
    if world == 2:
        runs.append((f"{GENERATION_CONFIGS[world][-1]} + step cache", None))
    for config, index in runs:
        expected = single["generation"] if index is not None else single["step_cache"]
        for rank, result in enumerate(results):
            got_steps, got_frames, cached = result["generation"][index] if index is not None else result["step_cache"]
            assert cached == expected[2]
            for i, (a, b) in enumerate(zip(got_steps, expected[0], strict=True)):
                assert np.abs(a - b).max() <= 1e-5, f"{config} rank {rank} step {i}: {np.abs(a - b).max()}"
            assert np.abs(got_frames.astype(int) - expected[1].astype(int)).max() <= 1, f"{config} rank {rank} frames"
    assert single["step_cache"][2], "the step cache served no step: the check above would prove nothing about it"


@pytest.mark.parametrize("mode", ["sequence", "data"])
def test_extraction_step_on_ranks_equals_one_process(single: dict, ranks, mode: str) -> None:
    """Sequence mode: each rank's gradient is one process's on the same windows. Data mode: the ranks' summed
    share equals one process's mean over the same 4 windows (drawn in the same order). On 4 ranks."""
    world = 4
    results = ranks(world)
    expected = single["extraction"][world]
    scale = np.abs(expected["grad"]).max()
    assert scale > 1e-6  # a real gradient reaches the motion tokens
    for rank, result in enumerate(results):
        got = result[mode]
        assert abs(got["loss"] - expected["loss"]) <= 1e-5 * max(1.0, abs(expected["loss"])), f"{mode} rank {rank} loss"
        error = np.abs(got["grad"] - expected["grad"]).max()
        print(f"{mode} world {world} rank {rank}: gradient max {scale:.3g}, max error {error:.3g}")
        assert error <= min(1e-5, 1e-4 * scale), f"{mode} rank {rank}: {error}"  # the tiny model's gradients are small
        assert np.abs(got["tokens"] - expected["tokens"]).max() <= 1e-5


@pytest.mark.slow
def test_cli_data_parallel_extraction_equals_one_process_with_as_many_windows(motion_clip: Path, tmp_path: Path) -> None:
    """`extract --gpus 2 --parallel data` (two CPU ranks: the leader prepares the cache, reports and writes) gives
    the action one process trains with `--windows-per-step 2`; `--gpus 0` is refused before anything loads."""
    from safetensors.torch import load_file

    from flexiact_backend.tools.cli import build_parser, main

    common = ["extract", "--tiny", "--video", str(motion_clip), "--end", "2", "--caption", "a block slides", "--steps", "2"]
    assert main([*common, "--windows-per-step", "2", "--out", str(tmp_path / "one.safetensors")]) == 0
    assert main([*common, "--gpus", "2", "--parallel", "data", "--out", str(tmp_path / "two.safetensors")]) == 0
    one, two = load_file(tmp_path / "one.safetensors"), load_file(tmp_path / "two.safetensors")
    assert one.keys() == two.keys()
    assert max(float(one[k].abs().max()) for k in one) > 0  # the tokens trained
    assert max(float((one[k] - two[k]).abs().max()) for k in one) <= 1e-5
    with pytest.raises(SystemExit):
        build_parser().parse_args([*common, "--gpus", "0", "--out", str(tmp_path / "x.safetensors")])


def _compiled_on_rank(device: torch.device, model_dir: Path) -> dict:
    """The blocks compiled (inductor) as `--compile` does, then a Ulysses-2 generation; dynamo's graph count."""
    from torch._dynamo.utils import counters

    from flexiact_backend.model.hooks import compile_blocks

    generator = _load(model_dir, device)
    compile_blocks(generator.pipe.transformer, dynamic=False)
    with parallelize(generator.pipe.transformer, build_mesh(ParallelConfig(ulysses=2))):
        steps, _frames, _cached = _latents(generator)
    return {"steps": steps, "graphs": counters["stats"]["unique_graphs"]}


@pytest.mark.slow
def test_compiled_blocks_under_ulysses_equal_one_eager_process(single: dict, model_dir: Path) -> None:
    """Compile keeps working on several ranks: the collectives stay outside the compiled graphs (a graph break)."""
    results = run_ranks(_compiled_on_rank, 2, (model_dir,), timeout_s=3 * TIMEOUT_S)
    for rank, result in enumerate(results):
        assert result["graphs"] > 0, "nothing was compiled: the comparison would prove nothing"
        for i, (a, b) in enumerate(zip(result["steps"], single["generation"][0], strict=True)):
            error = np.abs(a - b).max()
            print(f"compiled ulysses 2, rank {rank}, step {i}: max error {error:.3g}")
            assert error <= 1e-5, f"rank {rank} step {i}: {error}"
