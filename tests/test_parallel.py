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

from flexiact_backend.generation import FlexiActGenerator
from flexiact_backend.parallel.launch import run_ranks
from flexiact_backend.parallel.sequence_parallel import parallelize
from flexiact_backend.parallel.ulysses import gather, heads_to_sequence, own_slice, sequence_to_heads, shard_sizes
from flexiact_backend.parallel.util import ParallelConfig, build_mesh
from flexiact_backend.tiny import make_tiny_model

STEPS = 4
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


def _latents(generator: FlexiActGenerator, **options) -> tuple[list[np.ndarray], np.ndarray]:
    """Each step's latents (read off the scheduler) and the frames of one generation."""
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
        result = generator.generate(_image(), "a person walks", action=_action(generator), steps=STEPS, seed=3, **options)
    finally:
        del scheduler.step
    return seen, result.frames


def _generate_on_rank(device: torch.device, model_dir: Path, configs: list[ParallelConfig]) -> list:
    generator = _load(model_dir, device)
    results = []
    for config in configs:
        with parallelize(generator.pipe.transformer, build_mesh(config)):
            results.append(_latents(generator))
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
def single(model_dir: Path) -> tuple[list[np.ndarray], np.ndarray]:
    return _latents(_load(model_dir, torch.device("cpu")))


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


@pytest.mark.parametrize("world", [2, 4])
def test_generation_on_ranks_equals_one_process(model_dir: Path, single, world: int) -> None:
    ranks = run_ranks(_generate_on_rank, world, (model_dir, GENERATION_CONFIGS[world]), timeout_s=TIMEOUT_S)
    steps, frames = single
    assert len(steps) == STEPS
    for config_index, config in enumerate(GENERATION_CONFIGS[world]):
        for rank, results in enumerate(ranks):
            got_steps, got_frames = results[config_index]
            for i, (a, b) in enumerate(zip(got_steps, steps, strict=True)):
                assert np.abs(a - b).max() <= 1e-5, f"{config} rank {rank} step {i}: {np.abs(a - b).max()}"
            assert np.abs(got_frames.astype(int) - frames.astype(int)).max() <= 1, f"{config} rank {rank} frames"
