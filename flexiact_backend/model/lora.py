"""The RefAdapter's low-rank branch, named as in the published checkpoints (`lora_q.down.weight`, ...)."""

from __future__ import annotations

import torch
from torch import nn


class LoRAPair(nn.Module):
    """`up(down(x))`: down is normal(std 1/rank), up is zeros, so a fresh adapter changes nothing."""

    def __init__(self, features: int, rank: int) -> None:
        super().__init__()
        self.down = nn.Linear(features, rank, bias=False)
        self.up = nn.Linear(rank, features, bias=False)
        nn.init.normal_(self.down.weight, std=1.0 / rank)
        nn.init.zeros_(self.up.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(self.down(x))

    def delta_weight(self) -> torch.Tensor:
        """The dense [out, in] update `up @ down`, in float32 so folding loses nothing avoidable."""
        return self.up.weight.float() @ self.down.weight.float()
