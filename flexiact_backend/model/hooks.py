"""diffusers hooks around the CogVideoX transformer: the step's reweighting bias, the step cache, regional compile.

The bias in force is a function of the timestep the transformer is called at, so a hook on the transformer reads
`timestep` and hands the bias to every `attn1` through `attention_kwargs` (which CogVideoX forwards to each block's
attention); nothing is set on the processors between steps. The step cache is diffusers' TaylorSeer cache, enabled
only past the reweight window: the steps that carry the motion always compute in full.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from diffusers import CogVideoXTransformer3DModel
from diffusers.hooks import HookRegistry, ModelHook, TaylorSeerCacheConfig
from diffusers.models.embeddings import get_3d_rotary_pos_embed
from diffusers.pipelines.cogvideo.pipeline_cogvideox_image2video import get_resize_crop_region_for_grid

REWEIGHT_HOOK = "flexiact_reweight"
BLOCK_PROBE_HOOK = "flexiact_block_probe"


class ReweightHook(ModelHook):
    """Puts the bias scheduled for the call's timestep into `attention_kwargs["reweight"]`, as a 0-dim tensor.

    A tensor (not a Python float) so a compiled block takes each step's value without recompiling.
    """

    def __init__(self, biases: Mapping[int, float | None]) -> None:
        super().__init__()
        self.biases = dict(biases)

    def pre_forward(self, module: torch.nn.Module, *args: Any, **kwargs: Any) -> tuple[tuple, dict]:
        timestep = kwargs["timestep"]
        t = int(timestep.flatten()[0]) if isinstance(timestep, torch.Tensor) else int(timestep)
        if t not in self.biases:
            raise RuntimeError(f"the transformer ran at timestep {t}, which is not in this generation's schedule")
        attention_kwargs = dict(kwargs.get("attention_kwargs") or {})
        if self.biases[t] is not None:
            attention_kwargs["reweight"] = torch.tensor(self.biases[t], dtype=torch.float32, device=kwargs["hidden_states"].device)
        kwargs["attention_kwargs"] = attention_kwargs
        return args, kwargs


@contextmanager
def reweighting(transformer: CogVideoXTransformer3DModel, timesteps: Sequence[int], biases: Sequence[float | None]) -> Iterator[None]:
    """While inside, every transformer call gets the bias scheduled for its timestep."""
    registry = HookRegistry.check_if_exists_or_initialize(transformer)
    registry.register_hook(ReweightHook(dict(zip(timesteps, biases, strict=True))), REWEIGHT_HOOK)
    try:
        yield
    finally:
        registry.remove_hook(REWEIGHT_HOOK, recurse=False)


class _BlockProbe(ModelHook):
    """Counts the block forwards that really ran (it sits inside the cache's hook, so cached calls skip it)."""

    def __init__(self, cache: StepCache) -> None:
        super().__init__()
        self.cache = cache

    def pre_forward(self, module: torch.nn.Module, *args: Any, **kwargs: Any) -> tuple[tuple, dict]:
        self.cache.blocks_run += 1
        return args, kwargs


class StepCache:
    """diffusers' TaylorSeer cache on the transformer blocks, acting only from step `first_step` on.

    Steps before `first_step` compute in full; from it on, one step in `interval` computes and the others are
    predicted from the last computed ones (first-order Taylor). `cached_steps` lists the steps where some block did
    not run, observed (not derived from the config) by a probe inside the cache's hook.
    """

    def __init__(self, transformer: CogVideoXTransformer3DModel, first_step: int, interval: int = 3) -> None:
        self.transformer = transformer
        self.blocks = list(transformer.transformer_blocks)
        self.config = TaylorSeerCacheConfig(
            cache_interval=interval, disable_cache_before_step=first_step, max_order=1,
            taylor_factors_dtype=transformer.dtype, cache_identifiers=[r"transformer_blocks\.\d+"],
        )
        self.blocks_run = 0
        self.cached_steps: list[int] = []

    def __enter__(self) -> StepCache:
        for block in self.blocks:
            HookRegistry.check_if_exists_or_initialize(block).register_hook(_BlockProbe(self), BLOCK_PROBE_HOOK)
        self.transformer.enable_cache(self.config)
        return self

    def end_step(self, step: int) -> None:
        """Called after each denoising step: records whether the cache served part of it."""
        if self.blocks_run < len(self.blocks):
            self.cached_steps.append(step)
        self.blocks_run = 0

    def __exit__(self, *exc: object) -> None:
        self.transformer.disable_cache()
        HookRegistry.check_if_exists_or_initialize(self.transformer).remove_hook(BLOCK_PROBE_HOOK, recurse=True)


def compile_blocks(transformer: CogVideoXTransformer3DModel, **options: Any) -> None:
    """Regional compile: each block's `forward` is compiled (all blocks share one code object, so one graph per
    input signature). Hooks registered later (reweighting, step cache) wrap the compiled forward and stay outside
    the graph, so adding or removing them never recompiles."""
    for block in transformer.transformer_blocks:
        block.forward = torch.compile(block.forward, **options)


def rotary_embeddings(
    transformer: CogVideoXTransformer3DModel, height: int, width: int, latent_frames: int, vae_scale: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """CogVideoX 1.0's 3D RoPE (cos, sin) for a `height` x `width` video of `latent_frames`, with diffusers' public
    helpers, as its image-to-video pipeline builds them."""
    config = transformer.config
    grid_height = height // (vae_scale * config.patch_size)
    grid_width = width // (vae_scale * config.patch_size)
    crops = get_resize_crop_region_for_grid((grid_height, grid_width), config.sample_width // config.patch_size,
                                            config.sample_height // config.patch_size)
    return get_3d_rotary_pos_embed(embed_dim=config.attention_head_dim, crops_coords=crops, grid_size=(grid_height, grid_width),
                                   temporal_size=latent_frames, device=device)
