"""What each way of running needs beyond the core install, checked before the work that needs it.

Why: a missing optional package otherwise surfaces deep inside transformers or diffusers with a message that
points elsewhere (transformers 5 names `tiktoken` when the hub's SentencePiece tokenizer cannot be converted).
`generate`, `serve` and `doctor` ask these same functions, so doctor passing means loading will not trip on them.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import TYPE_CHECKING

from .errors import FlexiActError

if TYPE_CHECKING:  # a type only: doctor and the CLI's parser import this module without loading torch
    import torch

#: transformers 5 converts the hub's `tokenizer/spiece.model` (no tokenizer.json) with both of these.
TOKENIZER_PACKAGES = {"sentencepiece": "sentencepiece", "google.protobuf": "protobuf"}
INSTALL = "pip install {packages}  (dependencies of the backend: pip install -e . in the FlexiAct clone installs them)"


class MissingPackage(FlexiActError):
    """A package some way of running needs is not installed; the message names it and the pip command."""

    code = "missing_package"


def missing(modules: dict[str, str]) -> list[str]:
    """The pip names of the modules (module -> pip name) that cannot be imported here."""
    absent = []
    for module, package in modules.items():
        try:
            found = importlib.util.find_spec(module) is not None
        except (ImportError, ValueError):  # a parent package missing, or a module blocked on purpose
            found = False
        if not found:
            absent.append(package)
    return absent


def needs_sentencepiece(model_dir: str | Path) -> bool:
    """The folder's tokenizer is the hub's SentencePiece model without a converted tokenizer.json."""
    tokenizer = Path(model_dir) / "tokenizer"
    return (tokenizer / "spiece.model").is_file() and not (tokenizer / "tokenizer.json").is_file()


def require_tokenizer_packages(model_dir: str | Path) -> None:
    """Refuse, naming the packages, when the folder's tokenizer cannot be loaded without them."""
    absent = missing(TOKENIZER_PACKAGES) if needs_sentencepiece(model_dir) else []
    if absent:
        raise MissingPackage(
            f"the tokenizer in {Path(model_dir) / 'tokenizer'} is a SentencePiece model (spiece.model, no "
            f"tokenizer.json); transformers needs both sentencepiece and protobuf to load it, and "
            f"{' and '.join(absent)} {'is' if len(absent) == 1 else 'are'} not installed. Fix: "
            + INSTALL.format(packages=" ".join(absent)))


def require_memory_saving(device: torch.device) -> None:
    """Model CPU offload (diffusers' `enable_model_cpu_offload`) needs a CUDA GPU and the accelerate package."""
    if device.type != "cuda":
        raise FlexiActError(f"--memory-saving needs a CUDA GPU: it offloads idle sub-models from the GPU to CPU "
                            f"memory, and this run's device is {device}. Leave --memory-saving out on a machine "
                            "without a GPU.")
    if missing({"accelerate": "accelerate"}):
        raise MissingPackage("--memory-saving needs the accelerate package (diffusers' model CPU offload uses it). "
                             "Fix: " + INSTALL.format(packages="accelerate"))


def require_cluster() -> None:
    """Studio mode (`serve --ray`) needs Ray, from the `cluster` extra."""
    if missing({"ray": "ray"}):
        raise MissingPackage("--ray needs Ray, which is not installed: pip install -e '.[cluster]' in the FlexiAct "
                             "clone (the same version on every machine of the cluster)")
