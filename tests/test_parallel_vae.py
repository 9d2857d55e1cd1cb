"""The VAE's tiled decode split over 2 and 4 CPU ranks (gloo, loopback) equals one process's tiled decode.

The tiny VAE gets tiles of half its frame each way and overlaps of one latent, so its 96x64 frame is a 3 x 3 grid
of tiles, as the hub VAE's 720x480 is; each rank must decode only its own tiles (counted at the decoder).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist

from flexiact_backend.generation import FlexiActGenerator
from flexiact_backend.parallel.launch import run_ranks
from flexiact_backend.parallel.vae import split_vae_decode, tile_origins
from flexiact_backend.tiny import make_tiny_model

TIMEOUT_S = 240


def _tiled_vae(model_dir: Path) -> torch.nn.Module:
    vae = FlexiActGenerator.from_pretrained(model_dir, device="cpu").pipe.vae
    vae.enable_tiling(tile_sample_min_height=32, tile_sample_min_width=48, tile_overlap_factor_height=1 / 4,
                      tile_overlap_factor_width=1 / 6)
    return vae


def _latents(vae: torch.nn.Module) -> torch.Tensor:
    channels = vae.config.latent_channels
    return torch.randn(1, channels, 3, 8, 12, generator=torch.Generator().manual_seed(4))


def _decode_on_rank(device: torch.device, model_dir: Path) -> dict:
    vae = _tiled_vae(model_dir)
    calls = []
    vae.decoder.register_forward_pre_hook(lambda module, args: calls.append(1))
    z = _latents(vae)
    with torch.no_grad(), split_vae_decode(vae):
        video = vae.decode(z).sample
    return {"video": video, "decoder_calls": len(calls), "rank": dist.get_rank()}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("models") / "tiny")


@pytest.fixture(scope="module")
def single(model_dir: Path) -> tuple[np.ndarray, int]:
    """One process: diffusers' own tiled decode, and how many decoder calls it makes."""
    vae = _tiled_vae(model_dir)
    z = _latents(vae)
    grid = tile_origins(vae, z.shape[3], z.shape[4])
    assert [len(row) for row in grid] == [3, 3, 3]  # the hub's 3 x 3 grid of tiles
    calls = []
    vae.decoder.register_forward_pre_hook(lambda module, args: calls.append(1))
    with torch.no_grad():
        video = vae.decode(z).sample
    return video.numpy(), len(calls)


@pytest.mark.parametrize("world", [2, 4])
def test_split_tiled_decode_equals_one_process(model_dir: Path, single: tuple[np.ndarray, int], world: int) -> None:
    expected, calls = single
    per_tile = calls // 9
    results = run_ranks(_decode_on_rank, world, (model_dir,), timeout_s=TIMEOUT_S)
    for r in results:
        assert r["video"].shape == expected.shape
        assert np.abs(r["video"] - expected).max() <= 1e-6, (world, r["rank"], np.abs(r["video"] - expected).max())
        own_tiles = len(range(r["rank"], 9, world))  # tiles rank, rank + N, ...
        assert r["decoder_calls"] == own_tiles * per_tile, (world, r["rank"], r["decoder_calls"])
    assert sum(r["decoder_calls"] for r in results) == calls
