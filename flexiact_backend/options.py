"""Named choices the CLI, the API and the model share, in a module that imports nothing heavy: the CLI's parser
(and so `--help`) is built from these without loading torch or diffusers."""

from __future__ import annotations

#: How long the generated clip plays: as long as the action's motion lasted in its reference (the default),
#: or the model's own clip length (every generated frame shown once at the model's fps).
TEMPOS = ("reference", "model")

#: Exact biased-attention implementations (model/attention.py).
ATTENTION_BACKENDS = ("padded", "flex", "lse_merge")

#: Parallel extraction: "sequence": Ulysses forward and backward, the gradient of one device; "data": one window
#: per rank, gradients averaged.
EXTRACTION_MODES = ("sequence", "data")
