"""CFG-parallel and Ulysses sequence-parallel CogVideoX + FlexiAct, as diffusers hooks around an unchanged model.

`parallelize(transformer, mesh)` registers three hooks, in the manner of diffusers' context-parallel plans:
- on the transformer: the guidance batch is split over the cfg group (gathered again on the way out); the RoPE
  table is cut to this rank's video tokens; `attention_kwargs["sequence_parallel"]` hands every FlexiAct processor
  the `UlyssesAttention` it calls around its attention (the processor's one hook);
- on `embedding_dropout` (the patch embedding's output, `[text | video]`): the video tokens are sharded;
- on `proj_out`: the shards are gathered back, so the transformer's output is whole on every rank.
Everything between runs per token on its shard (norms, feed-forward, gates); the text stream is replicated.
`parallel_generation` adds the VAE's decode, its tiles shared out over the ranks (`vae.py`).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from diffusers import CogVideoXTransformer3DModel
from diffusers.hooks import HookRegistry, ModelHook
from diffusers.models.modeling_outputs import Transformer2DModelOutput

from .ulysses import gather, heads_to_sequence, own_slice, sequence_to_heads, shard_sizes
from .util import Mesh, ParallelConfig, build_mesh
from .vae import split_vae_decode

TRANSFORMER_HOOK = "flexiact_parallel"
SHARD_HOOK = "flexiact_parallel_shard"
GATHER_HOOK = "flexiact_parallel_gather"


class UlyssesAttention:
    """Joint `[text | motion | video]` attention on H/N heads: video q/k/v by all-to-all (each rank then holds its
    heads of every video token), text and motion by slicing (every rank holds all of them), so the bias on
    (video rows, motion columns) and the softmax are exactly one device's, head by head."""

    def __init__(self, group: dist.ProcessGroup, video_sizes: list[int], heads: int) -> None:
        parts = dist.get_world_size(group)
        if heads % parts:
            raise ValueError(f"Ulysses over {parts} ranks needs the head count ({heads}) to divide by {parts}")
        self.group = group
        self.video_sizes = video_sizes
        self.head_sizes = [heads // parts] * parts

    @torch.compiler.disable  # collectives stay outside compiled block graphs (a graph break, never a wrong graph)
    def gather(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, video_start: int) -> tuple[torch.Tensor, ...]:
        """[B, H, joint + own video, D] each -> [B, H/N, joint + all video, D]."""
        return tuple(torch.cat([own_slice(t[:, :, :video_start], 1, self.head_sizes, self.group),
                                sequence_to_heads(t[:, :, video_start:], self.video_sizes, self.group)], dim=2)
                     for t in (query, key, value))

    @torch.compiler.disable
    def scatter(self, out: torch.Tensor, video_start: int) -> torch.Tensor:
        """[B, H/N, joint + all video, D] -> [B, H, joint + own video, D]."""
        return torch.cat([gather(out[:, :, :video_start], 1, self.head_sizes, self.group),
                          heads_to_sequence(out[:, :, video_start:], self.video_sizes, self.group)], dim=2)


@dataclass
class _CallState:
    """What one transformer call's hooks share: the text length and the video shard sizes."""

    text_len: int = 0
    video_sizes: list[int] = field(default_factory=list)


class _TransformerHook(ModelHook):
    def __init__(self, mesh: Mesh, state: _CallState) -> None:
        super().__init__()
        self.mesh, self.state = mesh, state
        self.cfg_split = False

    def pre_forward(self, module: CogVideoXTransformer3DModel, *args: Any, **kwargs: Any) -> tuple[tuple, dict]:
        if args:
            raise TypeError("the parallel CogVideoX transformer takes keyword arguments only")
        mesh = self.mesh
        batch = kwargs["hidden_states"].shape[0]
        self.cfg_split = mesh.cfg_group is not None and batch % mesh.config.cfg == 0
        if self.cfg_split:  # [uncond..., cond...]: rank c of the cfg group runs the c-th half
            part = batch // mesh.config.cfg
            for name in ("hidden_states", "encoder_hidden_states", "timestep", "ofs"):
                value = kwargs.get(name)
                if isinstance(value, torch.Tensor) and value.ndim and value.shape[0] == batch:
                    kwargs[name] = value[mesh.cfg_rank * part : (mesh.cfg_rank + 1) * part]
        if mesh.sp_group is not None:
            frames, _, height, width = kwargs["hidden_states"].shape[1:]
            p = module.config.patch_size
            sizes = shard_sizes(frames * (height // p) * (width // p), mesh.config.ulysses)
            self.state.video_sizes = sizes
            self.state.text_len = kwargs["encoder_hidden_states"].shape[1]
            rotary = kwargs.get("image_rotary_emb")
            if rotary is not None:  # RoPE rows of this rank's video tokens: each shard rotates its own positions
                start = sum(sizes[: mesh.sp_rank])
                kwargs["image_rotary_emb"] = tuple(r[start : start + sizes[mesh.sp_rank]] for r in rotary)
            kwargs["attention_kwargs"] = {
                **(kwargs.get("attention_kwargs") or {}),
                "sequence_parallel": UlyssesAttention(mesh.sp_group, sizes, module.config.num_attention_heads),
            }
        return args, kwargs

    def post_forward(self, module: torch.nn.Module, output: Any) -> Any:
        if not self.cfg_split:
            return output
        sample = output[0] if isinstance(output, tuple) else output.sample
        sample = gather(sample, 0, [sample.shape[0]] * self.mesh.config.cfg, self.mesh.cfg_group)
        return (sample, *output[1:]) if isinstance(output, tuple) else Transformer2DModelOutput(sample=sample)


class _ShardHook(ModelHook):
    """`[text | video]` -> `[text | own video shard]`."""

    def __init__(self, mesh: Mesh, state: _CallState) -> None:
        super().__init__()
        self.mesh, self.state = mesh, state

    def post_forward(self, module: torch.nn.Module, output: torch.Tensor) -> torch.Tensor:
        text = self.state.text_len
        video = own_slice(output[:, text:], 1, self.state.video_sizes, self.mesh.sp_group)
        return torch.cat([output[:, :text], video], dim=1)


class _GatherHook(ModelHook):
    """Own video shard -> every video token, on every rank."""

    def __init__(self, mesh: Mesh, state: _CallState) -> None:
        super().__init__()
        self.mesh, self.state = mesh, state

    def post_forward(self, module: torch.nn.Module, output: torch.Tensor) -> torch.Tensor:
        return gather(output, 1, self.state.video_sizes, self.mesh.sp_group)


@contextmanager
def parallelize(transformer: CogVideoXTransformer3DModel, mesh: Mesh) -> Iterator[None]:
    """While inside, every call of `transformer` runs split over `mesh` and returns what one device would."""
    if transformer.config.patch_size_t is not None:
        raise ValueError("sequence parallelism here supports CogVideoX 1.0 (no temporal patches)")
    state = _CallState()
    hooked = [(transformer, TRANSFORMER_HOOK, _TransformerHook(mesh, state))]
    if mesh.sp_group is not None:
        hooked += [(transformer.embedding_dropout, SHARD_HOOK, _ShardHook(mesh, state)),
                   (transformer.proj_out, GATHER_HOOK, _GatherHook(mesh, state))]
    for module, name, hook in hooked:
        HookRegistry.check_if_exists_or_initialize(module).register_hook(hook, name)
    try:
        yield
    finally:
        for module, name, _ in hooked:
            HookRegistry.check_if_exists_or_initialize(module).remove_hook(name, recurse=False)


@contextmanager
def parallel_generation(pipe: Any, gpus: int, guidance_scale: float) -> Iterator[None]:
    """`parallelize` `pipe`'s transformer over a generation's mesh of `gpus` ranks (both guidance branches apart
    where there are two and `gpus` is even, Ulysses over the rest), and its VAE's decode tiles over all of them
    (every rank calls it, once the world is up)."""
    mesh = build_mesh(ParallelConfig.for_generation(gpus, guidance=guidance_scale > 1))
    with parallelize(pipe.transformer, mesh), split_vae_decode(pipe.vae):
        yield
