"""FlexiAct on diffusers' CogVideoX: `attach_flexiact(transformer)` returns a `FlexiActAdapter`."""

from .adapter import FlexiActAdapter, attach_flexiact
from .checkpoints import read_state_dict
from .processor import FlexiActAttnProcessor, biased_attention
from .schedule import reweight_schedule

__all__ = ["FlexiActAdapter", "FlexiActAttnProcessor", "attach_flexiact", "biased_attention", "read_state_dict", "reweight_schedule"]
