"""Action files: the motion tokens of one FAE extraction as safetensors, with published key names and metadata.

Published FAE `.pt` files import into this format unchanged (no retraining): same keys, plus metadata.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .atomic import write_atomically
from .errors import CheckpointError
from .model.checkpoints import StateDict, check_state_dict, read_state_dict

FORMAT_VERSION = 1
_TOKEN_KEY = re.compile(r"^transformer_blocks\.(\d+)\.attn1\.processor\.motion_inversion_tokens$")


#: what action tokens may be stored as; they are used in float32
TOKEN_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def expected_action_shapes(num_layers: int, num_motion_tokens: int, inner_dim: int) -> dict[str, torch.Size]:
    """The keys and shapes an action must have to be used by a model of this size."""
    shape = torch.Size([1, num_motion_tokens, inner_dim])
    return {f"transformer_blocks.{i}.attn1.processor.motion_inversion_tokens": shape for i in range(num_layers)}


def check_action_tokens(tensors: Mapping[str, torch.Tensor], expected: Mapping[str, torch.Size] | None = None) -> None:
    """Keys are `transformer_blocks.{0..n-1}.attn1.processor.motion_inversion_tokens`, all [1, N, D] alike,
    float32/16/bf16 and finite; with `expected`, exactly those keys and shapes."""
    layers = sorted(int(m.group(1)) for k in tensors if (m := _TOKEN_KEY.match(k)))
    foreign = [k for k in tensors if not _TOKEN_KEY.match(k)]
    if foreign or not layers:
        raise CheckpointError(f"not a FlexiAct action: expected only motion_inversion_tokens keys, found {foreign[:3] or 'none'}")
    if layers != list(range(len(layers))):
        raise CheckpointError(f"not a FlexiAct action: layers {layers[:5]}... are not 0..{len(layers) - 1}")
    shapes = {tuple(v.shape) for v in tensors.values()}
    if len(shapes) != 1 or len(next(iter(shapes))) != 3 or next(iter(shapes))[0] != 1:
        raise CheckpointError(f"not a FlexiAct action: token tensors must all be [1, N, D], found {sorted(shapes)[:3]}")
    bad_dtype = sorted({str(v.dtype) for v in tensors.values() if v.dtype not in TOKEN_DTYPES})
    if bad_dtype:
        raise CheckpointError(f"not a FlexiAct action: tokens are {', '.join(bad_dtype)}; expected float32, float16 "
                              "or bfloat16")
    not_finite = [k for k, v in tensors.items() if not torch.isfinite(v).all()]
    if not_finite:
        raise CheckpointError(f"not a usable FlexiAct action: {len(not_finite)} token tensor(s) hold NaN or "
                              f"infinite values, e.g. {not_finite[0]}")
    if expected is not None:
        check_state_dict(dict(tensors), expected, "FlexiAct action")


def write_action(path: str | Path, tokens: Mapping[str, torch.Tensor], metadata: Mapping[str, object]) -> Path:
    """Write the tokens and metadata atomically (temp file in the same folder, then rename)."""
    path = Path(path)
    check_action_tokens(tokens)
    meta = {"format_version": FORMAT_VERSION, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), **metadata}
    tensors = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in tokens.items()}
    write_atomically(path, lambda tmp: save_file(tensors, tmp, metadata={"flexiact": json.dumps(meta, sort_keys=True)}))
    return path


def read_action_metadata(path: str | Path) -> dict:
    """The metadata of an action file, without loading its tensors."""
    try:
        with safe_open(str(path), framework="pt") as f:
            raw = (f.metadata() or {}).get("flexiact")
    except Exception as e:  # safetensors raises several types for foreign bytes
        raise CheckpointError(f"{path} is not a FlexiAct action file ({e})") from e
    return json.loads(raw) if raw else {}


def motion_duration_s(metadata: Mapping[str, object], model_duration_s: float) -> float:
    """How long the action's motion lasts in its reference: recorded at extraction, else the model's clip length.

    Actions extracted before `duration_s` was recorded learned their whole trim resampled to the model's frames,
    so their trim's length is their duration; published actions (no metadata) count as the model's clip.
    """
    if metadata.get("duration_s"):
        return float(metadata["duration_s"])  # type: ignore[arg-type]
    trim = metadata.get("trim")
    if metadata.get("source") == "extracted" and isinstance(trim, list) and len(trim) == 2:
        return float(trim[1]) - float(trim[0])
    return float(model_duration_s)


def read_action(path: str | Path) -> tuple[StateDict, dict]:
    """Tokens and metadata of an action file (the project's safetensors or a published `.pt`)."""
    tensors = read_state_dict(path)
    check_action_tokens(tensors)
    try:
        metadata = read_action_metadata(path)
    except CheckpointError:
        metadata = {}
    return tensors, metadata


def import_published_action(
    src: str | Path,
    *,
    name: str,
    caption: str,
    out: str | Path,
    base_model: str = "THUDM/CogVideoX-5b-I2V",
    expected: Mapping[str, torch.Size] | None = None,
    model_duration_s: float | None = None,
) -> dict:
    """Convert a published FAE `.pt` (or re-label a project action) into an action file; returns its metadata.

    `model_duration_s` (the model's clip length) becomes the `duration_s` of an action that records none.
    """
    tensors, previous = read_action(src)
    check_action_tokens(tensors, expected)
    shape = next(iter(tensors.values())).shape
    metadata = {
        **previous,
        "name": name,
        "caption": caption,
        "base_model": previous.get("base_model", base_model),
        "source": previous.get("source", "imported"),
        "num_layers": len(tensors),
        "num_motion_tokens": int(shape[1]),
        "width": int(shape[2]),
    }
    if model_duration_s is not None:
        metadata["duration_s"] = motion_duration_s(previous, model_duration_s)
    metadata.pop("created", None)
    write_action(out, tensors, metadata)
    return read_action_metadata(out)
