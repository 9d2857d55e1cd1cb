"""Installing FlexiAct on a CogVideoX transformer and managing its weights (per-call settings travel in `attention_kwargs`)."""

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
    """Handle on the FlexiAct processors of one transformer: load weights, fold the RefAdapter for inference."""

    def __init__(self, transformer: CogVideoXTransformer3DModel, processors: list[FlexiActAttnProcessor], *, rank: int, alpha: float, num_motion_tokens: int) -> None:
        self.transformer = transformer
        self.processors = processors
        self.rank = rank
        self.alpha = alpha
        self.num_motion_tokens = num_motion_tokens
        self.fused_weight = 0.0  # the LoRA weight folded into the projections (0 when none is)
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
        refold = self.fused_weight if what.startswith("RefAdapter") else 0.0
        if refold:
            self.unfuse_lora()
        with torch.no_grad():
            for key, target in current.items():
                target.copy_(state[key].to(device=target.device, dtype=target.dtype))
        if refold:
            self.fuse_lora(refold)

    def reset_action(self) -> None:
        """Zero the motion tokens, the state an extraction starts from."""
        with torch.no_grad():
            for p in self.processors:
                p.motion_inversion_tokens.zero_()

    def motion_parameters(self) -> list[nn.Parameter]:
        """The only parameters FAE extraction trains."""
        return [p.motion_inversion_tokens for p in self.processors]

    # ---- LoRA folding ----------------------------------------------------------------------------------------
    @property
    def lora_fused(self) -> bool:
        return bool(self._fused_originals)

    def fuse_lora(self, weight: float) -> None:
        """Fold the LoRA at `weight` into the projections, so each step costs plain CogVideoX.

        Originals are kept on the CPU and copied back by `unfuse_lora`, so restoring is exact.
        """
        if self.lora_fused:
            raise RuntimeError("the RefAdapter is already folded; unfuse_lora() first")
        if not weight:
            return
        self.fused_weight = float(weight)
        scale = self.alpha / self.rank * self.fused_weight
        with torch.no_grad():
            for p, attn in zip(self.processors, self._attentions()):
                for name, projection in _PROJECTIONS.items():
                    target = attn.get_submodule(projection).weight
                    self._fused_originals[target] = target.detach().to("cpu", copy=True)
                    delta = getattr(p, name).delta_weight().to(target.device)
                    target.copy_((target.float() + delta * scale).to(target.dtype))

    def unfuse_lora(self) -> None:
        """Restore the projection weights bit for bit."""
        with torch.no_grad():
            for weight, original in self._fused_originals.items():
                weight.copy_(original.to(weight.device))
        self._fused_originals.clear()
        self.fused_weight = 0.0

    @contextmanager
    def lora_fused_for_inference(self, weight: float) -> Iterator[None]:
        """Fold the LoRA at `weight` for a whole generation, and always unfold afterwards."""
        self.fuse_lora(weight)
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
