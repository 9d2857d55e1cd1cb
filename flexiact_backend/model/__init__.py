"""FlexiAct on diffusers' CogVideoX: `attach_flexiact(transformer)` returns a `FlexiActAdapter`."""

from .adapter import FlexiActAdapter, attach_flexiact
from .attention import ATTENTION_BACKENDS, biased_attention
from .checkpoints import read_state_dict
from .hooks import StepCache, compile_blocks, reweighting, rotary_embeddings
from .processor import FlexiActAttnProcessor
from .schedule import reweight_schedule

__all__ = [
    "ATTENTION_BACKENDS", "FlexiActAdapter", "FlexiActAttnProcessor", "StepCache", "attach_flexiact", "biased_attention",
    "compile_blocks", "read_state_dict", "reweight_schedule", "reweighting", "rotary_embeddings",
]
