"""Installing FlexiAct on a CogVideoX transformer and managing its weights and per-call settings."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

import torch
from diffusers import CogVideoXTransformer3DModel
from torch import nn

from .checkpoints import StateDict, check_state_dict, read_state_dict
from .lora import LoRAPair
from .processor import LORA_NAMES, FlexiActAttnProcessor

_PROJECTIONS = {"lora_q": "to_q", "lora_k": "to_k", "lora_v": "to_v", "lora_proj": "to_out.0"}


class FlexiActAdapter:
    """Handle on the FlexiAct processors of one transformer: load weights, set LoRA weight and reweighting."""

    def __init__(self, transformer: CogVideoXTransformer3DModel, processors: list[FlexiActAttnProcessor], *, rank: int, alpha: float, num_motion_tokens: int) -> None:
        self.transformer = transformer
        self.processors = processors
        self.rank = rank
        self.alpha = alpha
        self.num_motion_tokens = num_motion_tokens
        self.lora_weight = 0.0
        self.reweight: float | None = None
        self._fused_originals: dict[nn.Parameter, torch.Tensor] = {}

    # ---- names -------------------------------------------------------------------------------------------
    @staticmethod
    def _prefix(i: int) -> str:
        return f"transformer_blocks.{i}.attn1.processor."

    def action_state_dict(self) -> StateDict:
        """Motion tokens under their published names (`...attn1.processor.motion_inversion_tokens`)."""
        return {self._prefix(i) + "motion_inversion_tokens": p.motion_inversion_tokens.detach() for i, p in enumerate(self.processors)}

    def refadapter_state_dict(self) -> StateDict:
        """RefAdapter LoRA weights under their published names (`...processor.lora_q.down.weight`, ...)."""
        state = {}
        for i, p in enumerate(self.processors):
            for name in LORA_NAMES:
                lora: LoRAPair = getattr(p, name)
                state[f"{self._prefix(i)}{name}.down.weight"] = lora.down.weight.detach()
                state[f"{self._prefix(i)}{name}.up.weight"] = lora.up.weight.detach()
        return state

    # ---- loading ---------------------------------------------------------------------------------------------
    def load_refadapter(self, src: str | Path | Mapping[str, torch.Tensor]) -> None:
        """Load RefAdapter LoRA weights (published `.pt` or safetensors); all or nothing."""
        self._load(src, self.refadapter_state_dict(), "RefAdapter checkpoint")

    def load_action(self, src: str | Path | Mapping[str, torch.Tensor]) -> None:
        """Load an action's motion tokens (published FAE `.pt` or the project's action safetensors); all or nothing."""
        self._load(src, self.action_state_dict(), "FlexiAct action")

    def _load(self, src: str | Path | Mapping[str, torch.Tensor], current: StateDict, what: str) -> None:
        state = read_state_dict(src)
        check_state_dict(state, {k: v.shape for k, v in current.items()}, what)
        refold = self.lora_fused
        if refold and what.startswith("RefAdapter"):
            self.unfuse_lora()
        with torch.no_grad():
            for key, target in current.items():
                target.copy_(state[key].to(device=target.device, dtype=target.dtype))
        if refold and not self.lora_fused:
            self.fuse_lora()

    def reset_action(self) -> None:
        """Zero the motion tokens, the state an extraction starts from."""
        with torch.no_grad():
            for p in self.processors:
                p.motion_inversion_tokens.zero_()

    def motion_parameters(self) -> list[nn.Parameter]:
        """The only parameters FAE extraction trains."""
        return [p.motion_inversion_tokens for p in self.processors]

    # ---- settings --------------------------------------------------------------------------------------------
    def set_lora_weight(self, weight: float) -> None:
        """RefAdapter strength for following forward calls (0.7 to generate, 0 during extraction)."""
        refold = self.lora_fused
        if refold:
            self.unfuse_lora()
        self.lora_weight = float(weight)
        for p in self.processors:
            p.lora_weight = self.lora_weight
        if refold:
            self.fuse_lora()

    def set_reweight(self, scale: float | None) -> None:
        """Additive logit bias on video-query x motion-key attention for following calls; None for no bias."""
        self.reweight = None if scale is None else float(scale)
        for p in self.processors:
            p.reweight = self.reweight

    # ---- LoRA folding ----------------------------------------------------------------------------------------
    @property
    def lora_fused(self) -> bool:
        return bool(self._fused_originals)

    def fuse_lora(self) -> None:
        """Fold the LoRA at the current weight into the projections, so each step costs plain CogVideoX.

        Originals are kept on the CPU and copied back by `unfuse_lora`, so restoring is exact.
        """
        if self.lora_fused or not self.lora_weight:
            return
        scale = self.alpha / self.rank * self.lora_weight
        with torch.no_grad():
            for p, attn in zip(self.processors, self._attentions()):
                for name, projection in _PROJECTIONS.items():
                    weight = attn.get_submodule(projection).weight
                    self._fused_originals[weight] = weight.detach().to("cpu", copy=True)
                    delta = getattr(p, name).delta_weight().to(weight.device)
                    weight.copy_((weight.float() + delta * scale).to(weight.dtype))
                p.lora_fused = True

    def unfuse_lora(self) -> None:
        """Restore the projection weights bit for bit."""
        with torch.no_grad():
            for weight, original in self._fused_originals.items():
                weight.copy_(original.to(weight.device))
        self._fused_originals.clear()
        for p in self.processors:
            p.lora_fused = False

    @contextmanager
    def lora_fused_for_inference(self) -> Iterator[None]:
        """Fold the LoRA for a whole generation (its weight fixed), and always unfold afterwards."""
        self.fuse_lora()
        try:
            yield
        finally:
            self.unfuse_lora()

    def _attentions(self) -> list[nn.Module]:
        return [block.attn1 for block in self.transformer.transformer_blocks]


def attach_flexiact(
    transformer: CogVideoXTransformer3DModel, rank: int = 64, alpha: float = 32, num_motion_tokens: int = 226
) -> FlexiActAdapter:
    """Install FlexiAct attention on every `attn1` of a CogVideoX transformer and return its adapter.

    The processors become submodules, so the transformer's own state dict carries the published key names.
    """
    blocks = transformer.transformer_blocks
    if any(isinstance(block.attn1.processor, FlexiActAttnProcessor) for block in blocks):
        raise RuntimeError("FlexiAct is already attached to this transformer; use the adapter attach_flexiact returned")
    reference = next(transformer.parameters())
    dim = blocks[0].attn1.to_q.in_features
    processors = []
    for block in blocks:
        processor = FlexiActAttnProcessor(dim, rank, alpha, num_motion_tokens)
        for name in LORA_NAMES:
            getattr(processor, name).to(device=reference.device, dtype=reference.dtype)
        processor.motion_inversion_tokens.data = processor.motion_inversion_tokens.data.to(reference.device)
        processor.requires_grad_(False)
        block.attn1.set_processor(processor)
        processors.append(processor)
    return FlexiActAdapter(transformer, processors, rank=rank, alpha=alpha, num_motion_tokens=num_motion_tokens)
