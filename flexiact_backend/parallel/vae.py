"""The VAE's tiled decode split over a job's ranks: each rank decodes its share of the tiles, and every rank ends
with the whole video, blended exactly as one device blends it.

Why tiles: at 720x480 the CogVideoX VAE decodes 9 overlapping tiles one after another (diffusers'
`tiled_decode`), each through every frame batch (the causal convolutions carry a cache from batch to batch, so the
frames cannot be split, but the tiles are independent). Here tile t goes to rank t mod N, each tile is broadcast
from its rank, and the seams are blended with the VAE's own `blend_v`/`blend_h` on the same tile grid. Without
tiling (a frame that fits one tile) every rank decodes the whole video, as before.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from functools import partial

import torch
import torch.distributed as dist
from diffusers import AutoencoderKLCogVideoX
from diffusers.models.autoencoders.vae import DecoderOutput


def tile_origins(vae: AutoencoderKLCogVideoX, height: int, width: int) -> list[list[tuple[int, int]]]:
    """The latent (row, column) where each tile starts, row by row: the grid diffusers' tiled decode walks."""
    step_h = int(vae.tile_latent_min_height * (1 - vae.tile_overlap_factor_height))
    step_w = int(vae.tile_latent_min_width * (1 - vae.tile_overlap_factor_width))
    return [[(i, j) for j in range(0, width, step_w)] for i in range(0, height, step_h)]


def decode_tile(vae: AutoencoderKLCogVideoX, z: torch.Tensor, i: int, j: int) -> torch.Tensor:
    """One tile through every frame batch, the causal convolutions' cache carried from batch to batch."""
    frames, batch = z.shape[2], vae.num_latent_frames_batch_size
    remaining = frames % batch
    cache, parts = None, []
    for k in range(max(frames // batch, 1)):
        start, end = batch * k + (0 if k == 0 else remaining), batch * (k + 1) + remaining
        tile = z[:, :, start:end, i : i + vae.tile_latent_min_height, j : j + vae.tile_latent_min_width]
        if vae.post_quant_conv is not None:
            tile = vae.post_quant_conv(tile)
        tile, cache = vae.decoder(tile, conv_cache=cache)
        parts.append(tile)
    return torch.cat(parts, dim=2)


def _share(tile: torch.Tensor | None, owner: int, group: dist.ProcessGroup | None, like: torch.Tensor) -> torch.Tensor:
    """`tile` as its owner decoded it, on every rank of `group` (its shape first: tiles at the edges are smaller)."""
    source = dist.get_global_rank(group, owner) if group is not None else owner
    shape = torch.tensor(tile.shape if tile is not None else [0] * 5, dtype=torch.long, device=like.device)
    dist.broadcast(shape, src=source, group=group)
    if tile is None:
        tile = torch.empty(torch.Size(shape.tolist()), dtype=like.dtype, device=like.device)
    dist.broadcast(tile.contiguous(), src=source, group=group)
    return tile


def split_tiled_decode(vae: AutoencoderKLCogVideoX, z: torch.Tensor, return_dict: bool = True, *,
                       group: dist.ProcessGroup | None = None) -> DecoderOutput | tuple[torch.Tensor]:
    """`vae.tiled_decode(z)` with the tiles shared out over `group` (the job's ranks, all holding the same `z`)."""
    rank, size = dist.get_rank(group), dist.get_world_size(group)
    grid = tile_origins(vae, z.shape[3], z.shape[4])
    flat = [origin for row in grid for origin in row]
    mine = {origin: decode_tile(vae, z, *origin) for t, origin in enumerate(flat) if t % size == rank}
    decoded = {origin: _share(mine.get(origin), t % size, group, z) for t, origin in enumerate(flat)}
    rows = [[decoded[origin] for origin in row] for row in grid]

    blend_h = int(vae.tile_sample_min_height * vae.tile_overlap_factor_height)
    blend_w = int(vae.tile_sample_min_width * vae.tile_overlap_factor_width)
    limit_h, limit_w = vae.tile_sample_min_height - blend_h, vae.tile_sample_min_width - blend_w
    result_rows = []
    for i, row in enumerate(rows):
        result_row = []
        for j, tile in enumerate(row):
            if i > 0:
                tile = vae.blend_v(rows[i - 1][j], tile, blend_h)
            if j > 0:
                tile = vae.blend_h(row[j - 1], tile, blend_w)
            result_row.append(tile[:, :, :, :limit_h, :limit_w])
        result_rows.append(torch.cat(result_row, dim=4))
    video = torch.cat(result_rows, dim=3)
    return DecoderOutput(sample=video) if return_dict else (video,)


@contextmanager
def split_vae_decode(vae: AutoencoderKLCogVideoX, group: dist.ProcessGroup | None = None) -> Iterator[None]:
    """While inside, the VAE's tiled decodes are split over `group` (default: the world); its encodes are not."""
    vae.tiled_decode = partial(split_tiled_decode, vae, group=group)
    try:
        yield
    finally:
        del vae.tiled_decode
