"""One extraction on several ranks, in either of two modes (`util.EXTRACTION_MODES`).

- "sequence": every rank trains on the same window, its video tokens sharded by Ulysses in the forward and the
  backward; the motion tokens' gradient is one device's, so the run is the single-device run, each step shorter.
- "data": the authors' multi-GPU semantics: `windows_per_step` windows per step (drawn in order from one
  generator, as one process would), rank r computing windows r, r+N, ...; gradients and losses are summed over
  ranks, so a step equals one process's step on the mean loss of the same windows, on any number of ranks.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext

import torch
import torch.distributed as dist

from ..extraction import ExtractionConfig, ExtractionRanks, FAETrainer, StepDraw, TrainingData
from ..generation import FlexiActGenerator
from .sequence_parallel import parallelize
from .util import Mesh


class DataParallelTrainer(FAETrainer):
    """FAE trainer that computes its share of each step's windows and all-reduces the gradients."""

    def __init__(self, generator: FlexiActGenerator, data: TrainingData, config: ExtractionConfig,
                 group: dist.ProcessGroup | None) -> None:
        size = dist.get_world_size(group)
        if config.windows_per_step < size:
            raise ValueError(f"data-parallel extraction over {size} ranks needs at least {size} windows per step, "
                             f"got {config.windows_per_step}")
        super().__init__(generator, data, config)
        self.group, self.rank, self.size = group, dist.get_rank(group), size

    def own_draws(self, draws: list[StepDraw]) -> list[StepDraw]:
        return draws[self.rank :: self.size]

    def reduce(self, loss: torch.Tensor) -> torch.Tensor:
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in self.params]
        flat = torch.cat([g.flatten() for g in grads] + [loss.reshape(1).to(grads[0].dtype)])
        dist.all_reduce(flat, group=self.group)  # one collective for all layers' tokens and the loss
        for p, g in zip(self.params, flat[:-1].split([g.numel() for g in grads])):
            p.grad = g.view_as(p)
        return flat[-1]


class _RankGroup(ExtractionRanks):
    def __init__(self, mesh: Mesh) -> None:
        self.mesh = mesh
        self.leader = dist.get_rank() == 0

    def agree(self, flag: bool) -> bool:
        value = torch.tensor([int(bool(flag))])
        dist.broadcast(value, src=0)
        return bool(value.item())

    def leader_first(self, fn: Callable[[], object]) -> object:
        if self.leader:
            result = fn()
            dist.barrier()
            return result
        dist.barrier()
        return fn()


class SequenceParallelRanks(_RankGroup):
    """Ulysses over the mesh's sequence group: same windows, same gradient, shorter steps."""

    def training(self, generator: FlexiActGenerator) -> AbstractContextManager:
        return parallelize(generator.pipe.transformer, self.mesh)


class DataParallelRanks(_RankGroup):
    """A share of each step's windows per rank, gradients summed over the mesh's data group."""

    def trainer(self, generator: FlexiActGenerator, data: TrainingData, config: ExtractionConfig) -> FAETrainer:
        return DataParallelTrainer(generator, data, config, self.mesh.data_group)

    def training(self, generator: FlexiActGenerator) -> AbstractContextManager:
        return nullcontext()


def extraction_ranks(mesh: Mesh) -> ExtractionRanks:
    """The ranks object `extract_action` takes for this mesh (sequence or data, by which axis it splits)."""
    if mesh.config.data > 1 and mesh.config.ulysses == 1 and mesh.config.cfg == 1:
        return DataParallelRanks(mesh)
    if mesh.config.data == 1 and mesh.config.cfg == 1:
        return SequenceParallelRanks(mesh)
    raise ValueError(f"an extraction splits over one axis, sequence or data, not {mesh.config}")
