"""The model options every command that loads a pipeline shares (`--model`/`--tiny`, device, compile, attention)."""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from ..options import ATTENTION_BACKENDS


def add_model_args(p: argparse.ArgumentParser) -> None:
    group = p.add_mutually_exclusive_group(required=True)
    group.add_argument("--model", type=Path, help="diffusers folder of CogVideoX-5B-I2V (or any FlexiAct-ready pipeline)")
    group.add_argument("--tiny", action="store_true", help="the built-in tiny random model (built in a cache folder)")
    p.add_argument("--device", help="compute device (default: CUDA if available, else CPU)")
    p.add_argument("--refadapter", type=Path, help="RefAdapter checkpoint (.pt or .safetensors) if not in the model folder")
    p.add_argument("--memory-saving", action="store_true",
                   help="offload idle sub-models to CPU memory (needs a CUDA GPU and accelerate)")
    p.add_argument("--compile", action="store_true", help="torch.compile the transformer blocks (warmed up at load)")
    p.add_argument("--attention-backend", choices=ATTENTION_BACKENDS, default="padded",
                   help="how the biased attention is computed (all exact; `bench attention` compares them)")


def load_generator(args: argparse.Namespace):
    from ..generation import FlexiActGenerator
    from ..tiny import ensure_tiny_model

    model = args.model or ensure_tiny_model(Path(tempfile.gettempdir()) / "flexiact-tiny")
    return FlexiActGenerator.from_pretrained(model, device=args.device, refadapter=args.refadapter, compile=args.compile,
                                             memory_saving=args.memory_saving,
                                             attention_backend=args.attention_backend)
