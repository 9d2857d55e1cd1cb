"""Ulysses collectives with autograd: sequence shards <-> head shards, and the replicated-tensor boundaries.

Convention (what makes the backward exact): a tensor every rank holds whole (the text and motion streams, the
transformer's output) carries its whole gradient on every rank; a sharded tensor carries its shard's gradient.
So slicing a replicated tensor all-gathers in the backward, and gathering into one takes the own slice back.
Sequence shards may differ in length by one (`shard_sizes`): 17,550 video tokens split over 4 or 8 ranks with
no padding, so no padded key ever enters the softmax.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def shard_sizes(length: int, parts: int) -> list[int]:
    """`torch.tensor_split`'s sizes: the first `length % parts` shards one longer."""
    return [length // parts + (1 if i < length % parts else 0) for i in range(parts)]


def _all_gather(x: torch.Tensor, dim: int, sizes: list[int], group: dist.ProcessGroup) -> torch.Tensor:
    """Concatenate every rank's `x` along `dim`; rank j's has `sizes[j]` there (padded to the largest on the wire)."""
    x = x.movedim(dim, 0)
    longest = max(sizes)
    padded = torch.cat([x, x.new_zeros(longest - x.shape[0], *x.shape[1:])]) if x.shape[0] < longest else x
    parts = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(parts, padded.contiguous(), group=group)
    return torch.cat([p[:n] for p, n in zip(parts, sizes)]).movedim(0, dim)


def _own(x: torch.Tensor, dim: int, sizes: list[int], rank: int) -> torch.Tensor:
    start = sum(sizes[:rank])
    return x.narrow(dim, start, sizes[rank]).contiguous()


class _Gather(torch.autograd.Function):
    """Forward: all-gather along `dim` (into a replicated tensor). Backward: this rank's slice of the gradient."""

    @staticmethod
    def forward(ctx, x, dim, sizes, rank, group):
        ctx.args = (dim, sizes, rank)
        return _all_gather(x, dim, sizes, group)

    @staticmethod
    def backward(ctx, grad):
        dim, sizes, rank = ctx.args
        return _own(grad, dim, sizes, rank), None, None, None, None


class _Slice(torch.autograd.Function):
    """Forward: this rank's slice of a replicated tensor. Backward: all-gather the slices' gradients."""

    @staticmethod
    def forward(ctx, x, dim, sizes, rank, group):
        ctx.args = (dim, sizes, group)
        return _own(x, dim, sizes, rank)

    @staticmethod
    def backward(ctx, grad):
        dim, sizes, group = ctx.args
        return _all_gather(grad.contiguous(), dim, sizes, group), None, None, None, None


def _sequence_to_heads(x: torch.Tensor, sizes: list[int], rank: int, group: dist.ProcessGroup) -> torch.Tensor:
    """[B, H, s_rank, D] (all heads, own tokens) -> [B, H/N, S, D] (own heads, all tokens)."""
    n = len(sizes)
    b, heads, s, d = x.shape
    send = x.reshape(b, n, heads // n, s, d).transpose(0, 1).contiguous()  # chunk j goes to rank j
    recv = x.new_empty(b * (heads // n) * sum(sizes) * d)
    per_token = b * (heads // n) * d
    dist.all_to_all_single(recv, send.flatten(), [per_token * m for m in sizes], [per_token * sizes[rank]] * n, group=group)
    chunks = recv.split([per_token * m for m in sizes])
    return torch.cat([c.view(b, heads // n, m, d) for c, m in zip(chunks, sizes)], dim=2)


def _heads_to_sequence(x: torch.Tensor, sizes: list[int], rank: int, group: dist.ProcessGroup) -> torch.Tensor:
    """[B, H/N, S, D] -> [B, H, s_rank, D]: the inverse of `_sequence_to_heads`."""
    n = len(sizes)
    b, h, _, d = x.shape
    send = torch.cat([c.flatten() for c in x.split(sizes, dim=2)])
    per_token = b * h * d
    recv = x.new_empty(n * per_token * sizes[rank])
    dist.all_to_all_single(recv, send, [per_token * sizes[rank]] * n, [per_token * m for m in sizes], group=group)
    return recv.view(n, b, h, sizes[rank], d).transpose(0, 1).reshape(b, n * h, sizes[rank], d)


class _SequenceToHeads(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, sizes, rank, group):
        ctx.args = (sizes, rank, group)
        return _sequence_to_heads(x, sizes, rank, group)

    @staticmethod
    def backward(ctx, grad):
        return _heads_to_sequence(grad.contiguous(), *ctx.args), None, None, None


class _HeadsToSequence(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, sizes, rank, group):
        ctx.args = (sizes, rank, group)
        return _heads_to_sequence(x, sizes, rank, group)

    @staticmethod
    def backward(ctx, grad):
        return _sequence_to_heads(grad.contiguous(), *ctx.args), None, None, None


def gather(x: torch.Tensor, dim: int, sizes: list[int], group: dist.ProcessGroup) -> torch.Tensor:
    """All shards of `x` along `dim`, on every rank (backward: this rank's slice)."""
    return _Gather.apply(x, dim, sizes, dist.get_rank(group), group)


def own_slice(x: torch.Tensor, dim: int, sizes: list[int], group: dist.ProcessGroup) -> torch.Tensor:
    """This rank's slice of a replicated `x` along `dim` (backward: the gradients all-gathered)."""
    return _Slice.apply(x, dim, sizes, dist.get_rank(group), group)


def sequence_to_heads(x: torch.Tensor, sizes: list[int], group: dist.ProcessGroup) -> torch.Tensor:
    """Ulysses' first all-to-all on [B, H, tokens, D]: own tokens, all heads -> all tokens, own heads."""
    return _SequenceToHeads.apply(x, sizes, dist.get_rank(group), group)


def heads_to_sequence(x: torch.Tensor, sizes: list[int], group: dist.ProcessGroup) -> torch.Tensor:
    """Ulysses' second all-to-all: all tokens, own heads -> own tokens, all heads."""
    return _HeadsToSequence.apply(x, sizes, dist.get_rank(group), group)
