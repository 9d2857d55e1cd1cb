"""What a pipeline folder generates (size, frames, fps) and which FlexiAct adapter settings it uses."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

#: Optional file in a pipeline folder with FlexiAct settings; absent for the hub's CogVideoX-5B-I2V.
ADAPTER_CONFIG_NAME = "flexiact.json"
REAL_MODEL_ID = "THUDM/CogVideoX-5b-I2V"
#: The RefAdapter LoRA in a pipeline folder: the converted file, else the authors' released checkpoint.
REFADAPTER_FILES = ("refadapter.safetensors", "refnetlora_step40000_model.pt")


@dataclass(frozen=True)
class ModelInfo:
    """The model as clients see it: `width`x`height`, `frames` at `fps` (720x480, 49, 8 for the real one)."""

    id: str
    tiny: bool
    width: int
    height: int
    frames: int
    fps: float
    rank: int = 64
    alpha: float = 32
    num_motion_tokens: int = 226
    text_length: int = 226
    #: transformer blocks, each with one [1, num_motion_tokens, inner_dim] action token tensor
    num_layers: int = 42
    inner_dim: int = 3072

    @property
    def duration_s(self) -> float:
        return self.frames / self.fps

    def to_dict(self) -> dict:
        return asdict(self)


def read_model_info(model_dir: str | Path) -> ModelInfo:
    """Read size and settings from the folder's configs without loading any weights."""
    model_dir = Path(model_dir)
    transformer = json.loads((model_dir / "transformer" / "config.json").read_text())
    vae = json.loads((model_dir / "vae" / "config.json").read_text())
    spatial = 2 ** (len(vae["block_out_channels"]) - 1)
    extra_path = model_dir / ADAPTER_CONFIG_NAME
    extra = json.loads(extra_path.read_text()) if extra_path.is_file() else {}
    return ModelInfo(
        id=extra.get("model_id", REAL_MODEL_ID if not extra else model_dir.name),
        tiny=bool(extra.get("tiny", False)),
        width=transformer["sample_width"] * spatial,
        height=transformer["sample_height"] * spatial,
        frames=transformer["sample_frames"],
        fps=float(extra.get("fps", 8)),
        rank=int(extra.get("rank", 64)),
        alpha=float(extra.get("alpha", 32)),
        num_motion_tokens=int(extra.get("num_motion_tokens", 226)),
        text_length=int(transformer.get("max_text_seq_length", 226)),
        num_layers=int(transformer["num_layers"]),
        inner_dim=int(transformer["num_attention_heads"]) * int(transformer["attention_head_dim"]),
    )


def find_refadapter(model_dir: str | Path, refadapter: str | Path | None = None) -> Path | None:
    """The RefAdapter to load: the one given, else one of REFADAPTER_FILES at the folder's root, else None."""
    if refadapter is not None:
        return Path(refadapter)
    return next((Path(model_dir) / n for n in REFADAPTER_FILES if (Path(model_dir) / n).is_file()), None)
