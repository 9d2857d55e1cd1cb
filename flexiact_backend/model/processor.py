"""FlexiAct joint attention for one CogVideoX `attn1`: RefAdapter LoRA, motion tokens, biased video->motion logits.

The sequence is `[text | motion | video]`; RoPE touches the video part of q and k only; the motion rows of the
output are dropped. The reweighting bias is exact yet never builds an L x L mask (see `attention.py`).
Per-call settings (the step's bias, the LoRA weight) arrive as keyword arguments through diffusers'
`attention_kwargs`, which CogVideoX forwards to every `attn1`; the processor itself holds only weights.
"""

from __future__ import annotations

from typing import Protocol

import torch
from diffusers.models.attention_processor import Attention
from diffusers.models.embeddings import apply_rotary_emb
from torch import nn

from .attention import biased_attention
from .lora import LoRAPair

#: Published names of the four LoRA branches, in the order of the projections they adapt.
LORA_NAMES = ("lora_q", "lora_k", "lora_v", "lora_proj")


class SequenceExchange(Protocol):
    """How a sequence-parallel job lays attention out (`parallel.sequence_parallel.UlyssesAttention`): `gather`
    turns this rank's tokens with all heads into all tokens with its heads, `scatter` undoes it."""

    def gather(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, video_start: int) -> tuple[torch.Tensor, ...]: ...

    def scatter(self, out: torch.Tensor, video_start: int) -> torch.Tensor: ...


class FlexiActAttnProcessor(nn.Module):
    """Processor holding one layer's RefAdapter LoRA and motion tokens; no per-call state.

    Parameter names match the published checkpoints once installed as `transformer_blocks.{i}.attn1.processor`.
    """

    def __init__(self, dim: int, rank: int, alpha: float, num_motion_tokens: int) -> None:
        super().__init__()
        self.lora_q = LoRAPair(dim, rank)
        self.lora_k = LoRAPair(dim, rank)
        self.lora_v = LoRAPair(dim, rank)
        self.lora_proj = LoRAPair(dim, rank)
        # float32 master copy: extraction trains these with AdamW; forward casts to the compute dtype.
        self.motion_inversion_tokens = nn.Parameter(torch.zeros(1, num_motion_tokens, dim, dtype=torch.float32))
        self.lora_scale = alpha / rank

    def _project(self, linear: nn.Linear, lora: LoRAPair, x: torch.Tensor, lora_weight: float) -> torch.Tensor:
        out = linear(x)
        if lora_weight:
            out = out + lora(x) * (self.lora_scale * lora_weight)
        return out

    def forward(
        self,
        attn: Attention,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        image_rotary_emb: torch.Tensor | tuple[torch.Tensor, torch.Tensor] | None = None,
        reweight: torch.Tensor | float | None = None,
        lora_weight: float = 0.0,
        attention_backend: str = "padded",
        sequence_parallel: SequenceExchange | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """`reweight`: this step's logit bias on video-query x motion-key attention (a 0-dim tensor, so compiled
        graphs take new values without recompiling; None for none). `lora_weight`: RefAdapter strength computed as
        a branch (0 when off, or when the adapter has folded it into the projections). `sequence_parallel`: set
        when `hidden_states` is this rank's shard of the video tokens (and the RoPE table its rows)."""
        if attention_mask is not None:
            raise ValueError("FlexiAct attention takes no attention_mask (CogVideoX never passes one)")
        batch = hidden_states.shape[0]
        text_len = encoder_hidden_states.shape[1]
        motion = self.motion_inversion_tokens.to(hidden_states.dtype).expand(batch, -1, -1)
        video_start = text_len + motion.shape[1]
        tokens = torch.cat([encoder_hidden_states, motion, hidden_states], dim=1)

        query = self._project(attn.to_q, self.lora_q, tokens, lora_weight)
        key = self._project(attn.to_k, self.lora_k, tokens, lora_weight)
        value = self._project(attn.to_v, self.lora_v, tokens, lora_weight)
        head_dim = key.shape[-1] // attn.heads
        query, key, value = (t.unflatten(-1, (attn.heads, head_dim)).transpose(1, 2) for t in (query, key, value))
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        if image_rotary_emb is not None:
            query = torch.cat([query[:, :, :video_start], apply_rotary_emb(query[:, :, video_start:], image_rotary_emb)], dim=2)
            if not attn.is_cross_attention:
                key = torch.cat([key[:, :, :video_start], apply_rotary_emb(key[:, :, video_start:], image_rotary_emb)], dim=2)

        if sequence_parallel is not None:  # from here to the output projection: this rank's heads, every token
            query, key, value = sequence_parallel.gather(query, key, value, video_start)
        out = biased_attention(
            query, key, value, bias=reweight, rows=slice(video_start, None), columns=slice(text_len, video_start),
            backend=attention_backend,
        )
        if sequence_parallel is not None:
            out = sequence_parallel.scatter(out, video_start)
        out = out.transpose(1, 2).flatten(2)
        # Output projection is row-wise: drop the motion rows first instead of projecting and discarding them.
        out = torch.cat([out[:, :text_len], out[:, video_start:]], dim=1)
        out = self._project(attn.to_out[0], self.lora_proj, out, lora_weight)
        out = attn.to_out[1](out)
        return out[:, text_len:], out[:, :text_len]

    # diffusers' Attention passes only the keyword arguments named in `processor.__call__`'s signature; the
    # generic nn.Module.__call__ names none, which would silently drop `image_rotary_emb`.
    __call__ = forward
