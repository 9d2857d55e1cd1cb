"""Exact softmax attention with an additive bias on one (query rows x key columns) block, never an L x L mask.

Three interchangeable ways to compute the same numbers (parity tests hold each to 1e-4 in fp32); which is fastest
depends on the GPU, so `flexiact-backend bench attention` measures them side by side:

- `padded` (default): the bias rides in two extra head dimensions (query column = bias / scale on the biased
  rows, split into a high and a low part so bf16 carries it to about 1e-5; key column = 1 on the biased columns),
  so attention stays one `scaled_dot_product_attention` call without `attn_mask`; head dims are padded to a
  multiple of 8 for fused kernels (64 -> 72 at full size).
- `flex`: FlexAttention with a `score_mod` that adds the bias inside the kernel (compiled on CUDA).
- `lse_merge`: attention over the unbiased keys (FlexAttention, returning its log-sum-exp) and over the few biased
  columns (explicit: rows x columns logits, not L x L), merged exactly by their log-sum-exps.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch.nn.attention.flex_attention import AuxRequest, flex_attention

from ..options import ATTENTION_BACKENDS


Bias = torch.Tensor | float | None


#: FlexAttention compiled where its fused kernel exists (CUDA); on the CPU its eager form is exact (and slow).
_FLEX: Callable[..., torch.Tensor] = torch.compile(flex_attention, dynamic=False) if torch.cuda.is_available() else flex_attention


def _padded(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, bias: Bias, rows: slice, columns: slice, scale: float) -> torch.Tensor:
    head_dim = query.shape[-1]
    pad = -(head_dim + 2) % 8 + 2
    coefficient = torch.as_tensor(bias, device=query.device).to(torch.float64) / scale
    high = coefficient.to(query.dtype)
    low = (coefficient - high.to(torch.float64)).to(query.dtype)
    query = F.pad(query, (0, pad))
    key = F.pad(key, (0, pad))
    value = F.pad(value, (0, pad))
    query[:, :, rows, head_dim] = high
    query[:, :, rows, head_dim + 1] = low
    key[:, :, columns, head_dim : head_dim + 2] = 1
    out = F.scaled_dot_product_attention(query, key, value, scale=scale)
    return out[..., :head_dim]


def _flex_score_mod(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, bias: Bias, rows: slice, columns: slice, scale: float) -> torch.Tensor:
    length = query.shape[2]
    r0, r1, _ = rows.indices(length)
    c0, c1, _ = columns.indices(key.shape[2])
    bias = torch.as_tensor(bias, device=query.device, dtype=torch.float32)

    def add_bias(score, b, h, q_idx, kv_idx):
        inside = (q_idx >= r0) & (q_idx < r1) & (kv_idx >= c0) & (kv_idx < c1)
        return score + torch.where(inside, bias.to(score.dtype), 0.0)

    return _FLEX(query, key, value, score_mod=add_bias, scale=scale)


def _lse_merge(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, bias: Bias, rows: slice, columns: slice, scale: float) -> torch.Tensor:
    c0, c1, _ = columns.indices(key.shape[2])
    rest_k = torch.cat([key[:, :, :c0], key[:, :, c1:]], dim=2)
    rest_v = torch.cat([value[:, :, :c0], value[:, :, c1:]], dim=2)
    out_rest, aux = _FLEX(query, rest_k, rest_v, scale=scale, return_aux=AuxRequest(lse=True))
    lse_rest = aux.lse
    logits = (query @ key[:, :, c0:c1].transpose(-1, -2)).float() * scale  # rows x biased columns only
    logits[:, :, rows] += torch.as_tensor(bias, device=query.device, dtype=torch.float32)
    lse_cols = torch.logsumexp(logits, dim=-1)
    out_cols = torch.softmax(logits, dim=-1).to(value.dtype) @ value[:, :, c0:c1]
    lse = torch.logaddexp(lse_rest.float(), lse_cols)
    merged = out_rest.float() * (lse_rest.float() - lse).exp().unsqueeze(-1) + out_cols.float() * (lse_cols - lse).exp().unsqueeze(-1)
    return merged.to(query.dtype)


_BACKENDS = {"padded": _padded, "flex": _flex_score_mod, "lse_merge": _lse_merge}


def biased_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    *,
    bias: Bias,
    rows: slice,
    columns: slice,
    backend: str = "padded",
) -> torch.Tensor:
    """Softmax attention with `bias` added to the logits of (`rows` queries x `columns` keys), exactly.

    `bias` is a number or a 0-dim tensor (a tensor lets compiled graphs take new values); None is plain attention.
    """
    scale = query.shape[-1] ** -0.5
    if bias is None:
        return F.scaled_dot_product_attention(query, key, value, scale=scale)
    if backend not in _BACKENDS:
        raise ValueError(f"unknown attention backend {backend!r}; choose one of {', '.join(ATTENTION_BACKENDS)}")
    return _BACKENDS[backend](query, key, value, bias, rows, columns, scale)
