"""Selective recompute for extraction: keep attention's outputs, recompute everything else in the backward pass.

Full gradient checkpointing recomputes each block's forward, attention included, which at 18,002 tokens is most
of the block's cost; saving only the attention outputs (a few GB for 42 layers) skips that recompute.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

_aten = torch.ops.aten
_ATTENTION_OPS = {
    _aten._scaled_dot_product_flash_attention.default,
    _aten._scaled_dot_product_efficient_attention.default,
    _aten._scaled_dot_product_cudnn_attention.default,
    _aten._scaled_dot_product_flash_attention_for_cpu.default,
}


def _policy(ctx, op, *args, **kwargs) -> CheckpointPolicy:
    return CheckpointPolicy.MUST_SAVE if op in _ATTENTION_OPS else CheckpointPolicy.PREFER_RECOMPUTE


def selective_checkpointing() -> Callable:
    """A `gradient_checkpointing_func` for diffusers' `enable_gradient_checkpointing` that saves attention outputs."""
    return functools.partial(checkpoint, use_reentrant=False,
                             context_fn=functools.partial(create_selective_checkpoint_contexts, _policy))
