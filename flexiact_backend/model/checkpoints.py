"""Reading RefAdapter and action weights: published `.pt` pickles (weights_only) or the project's safetensors."""

from __future__ import annotations

import zipfile
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from ..errors import CheckpointError

StateDict = dict[str, torch.Tensor]


def read_state_dict(src: str | Path | Mapping[str, torch.Tensor]) -> StateDict:
    """A plain dict of tensors from a path (`.safetensors` or a torch pickle) or a mapping, else CheckpointError."""
    if isinstance(src, Mapping):
        state = dict(src)
        where = "the given state dict"
    else:
        path = Path(src)
        where = str(path)
        if not path.is_file():
            raise CheckpointError(f"{path}: no such file; check the path to the checkpoint")
        state = _read_safetensors(path) if _is_safetensors(path) else _read_pickle(path)
    bad = [k for k, v in state.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
    if bad:
        raise CheckpointError(f"{where} must map parameter names to tensors; entries {bad[:3]!r} are not")
    return state


def _is_safetensors(path: Path) -> bool:
    if path.suffix == ".safetensors":
        return True
    with path.open("rb") as f:
        head = f.read(9)
    # safetensors starts with an 8-byte little-endian header length followed by '{'.
    return len(head) == 9 and head[8:9] == b"{"


def _read_safetensors(path: Path) -> StateDict:
    try:
        return load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{path} is not a readable safetensors file ({e})") from e


def _read_pickle(path: Path) -> StateDict:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # weights_only unpickling fails in many ways on foreign bytes; none runs code
        first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(
            f"{path} is not a FlexiAct checkpoint: it is not a plain dict of tensors that loads with "
            f"weights_only=True ({first_line})"
        ) from e
    if not isinstance(state, dict):
        raise CheckpointError(f"{path} holds a {type(state).__name__}, not a dict of tensors")
    return state


def check_torch_archive(path: str | Path, max_unpacked_bytes: int) -> None:
    """Refuse a torch.save zip that would unpack past `max_unpacked_bytes`, before anything is unpickled.

    torch.save stores its entries uncompressed, so a real checkpoint unpacks to at most its own size; a
    compressed entry (an archive bomb) or sizes that do not fit in the file are refused as they are.
    """
    path = Path(path)
    try:
        with zipfile.ZipFile(path) as archive:
            entries = archive.infolist()
    except (zipfile.BadZipFile, OSError) as e:
        raise CheckpointError(f"{path.name} is not a readable checkpoint archive ({e})") from e
    compressed = [e.filename for e in entries if e.compress_type != zipfile.ZIP_STORED]
    if compressed:
        raise CheckpointError(f"{path.name} compresses {len(compressed)} entries (e.g. {compressed[0]}); torch.save "
                              "writes checkpoints uncompressed, so it is refused before unpacking")
    total = sum(e.file_size for e in entries)
    if total > path.stat().st_size:
        raise CheckpointError(f"{path.name} claims {total} bytes of content in a {path.stat().st_size}-byte file; "
                              "the archive is damaged or forged")
    if total > max_unpacked_bytes:
        raise CheckpointError(f"{path.name} unpacks to {total} bytes; the limit is {max_unpacked_bytes}")


def check_state_dict(state: StateDict, expected: Mapping[str, torch.Size], what: str) -> None:
    """Raise CheckpointError naming every missing, unknown or mis-shaped key; accept only an exact match."""
    missing = sorted(set(expected) - set(state))
    unknown = sorted(set(state) - set(expected))
    wrong = [f"{k}: {tuple(state[k].shape)} (expected {tuple(expected[k])})" for k in expected if k in state and state[k].shape != expected[k]]
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing key(s), e.g. {missing[:3]}")
    if unknown:
        problems.append(f"{len(unknown)} unknown key(s), e.g. {unknown[:3]}")
    if wrong:
        problems.append(f"{len(wrong)} wrong shape(s), e.g. {wrong[:3]}")
    if problems:
        raise CheckpointError(f"not a {what} for this model: " + "; ".join(problems))
    non_float = [k for k, v in state.items() if not v.is_floating_point()]
    if non_float:
        raise CheckpointError(f"not a {what}: tensors must be floating point, {non_float[:3]} are not")
    not_finite = [k for k, v in state.items() if not torch.isfinite(v).all()]
    if not_finite:
        raise CheckpointError(f"not a usable {what}: {not_finite[:3]} hold NaN or infinite values")
