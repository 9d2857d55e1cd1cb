"""Process groups for one job on several devices: the world, and its CFG x Ulysses mesh of sub-groups.

Ranks come from `torchrun`'s environment (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT) or are given; NCCL on CUDA,
gloo on the CPU. Rendezvous is on loopback unless an address is given: every rank of a job lives on one node.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

LOOPBACK = "127.0.0.1"
#: How long a collective may wait for a lost rank before the job fails (a hung job is worse than a failed one).
DEFAULT_TIMEOUT = timedelta(minutes=10)


def free_port(host: str = LOOPBACK) -> int:
    """A port free on `host` now (bound to 0 and released), for one job's rendezvous."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def backend_for(device: torch.device) -> str:
    return "nccl" if device.type == "cuda" else "gloo"


def init_distributed(
    rank: int | None = None,
    world_size: int | None = None,
    *,
    addr: str | None = None,
    port: int | None = None,
    device: torch.device | None = None,
    timeout: timedelta = DEFAULT_TIMEOUT,
) -> torch.device:
    """Join the job's process group and return this rank's device (cuda:LOCAL_RANK, or the CPU).

    Unset arguments are read from torchrun's variables; the address defaults to loopback.
    """
    env = os.environ
    rank = int(env["RANK"]) if rank is None else rank
    world_size = int(env["WORLD_SIZE"]) if world_size is None else world_size
    addr = addr or env.get("MASTER_ADDR", LOOPBACK)
    port = port if port is not None else int(env["MASTER_PORT"])
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside a world of {world_size}")
    if device is None:
        local_rank = int(env.get("LOCAL_RANK", rank))
        device = torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(backend_for(device), init_method=f"tcp://{addr}:{port}", rank=rank, world_size=world_size,
                            timeout=timeout, device_id=device if device.type == "cuda" else None)
    return device


def destroy_distributed() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


@dataclass(frozen=True)
class ParallelConfig:
    """How one job's ranks split its work: `cfg` guidance branches (1 or 2) x `ulysses` sequence shards.

    Extraction uses `ulysses` ("sequence" mode: same math, shorter step) or `data` (N windows per step, the
    authors' multi-GPU semantics); generation uses `cfg` x `ulysses`.
    """

    cfg: int = 1
    ulysses: int = 1
    data: int = 1

    def __post_init__(self) -> None:
        if self.cfg not in (1, 2):
            raise ValueError(f"cfg parallel degree is 1 or 2 (the two guidance branches), got {self.cfg}")
        if min(self.ulysses, self.data) < 1:
            raise ValueError("parallel degrees are at least 1")

    @property
    def world_size(self) -> int:
        return self.cfg * self.ulysses * self.data

    @classmethod
    def for_generation(cls, gpus: int, guidance: bool = True) -> ParallelConfig:
        """The split of `gpus` ranks for a generation: both guidance branches apart first, the rest Ulysses."""
        cfg = 2 if guidance and gpus % 2 == 0 else 1
        return cls(cfg=cfg, ulysses=gpus // cfg)

    @classmethod
    def for_extraction(cls, gpus: int, mode: str) -> ParallelConfig:
        if mode not in EXTRACTION_MODES:
            raise ValueError(f"extraction parallel mode must be one of {EXTRACTION_MODES}, got {mode!r}")
        return cls(ulysses=gpus) if mode == "sequence" else cls(data=gpus)


#: "sequence": Ulysses forward and backward, the gradient of one device; "data": one window per rank, gradients averaged.
EXTRACTION_MODES = ("sequence", "data")


@dataclass(frozen=True)
class Mesh:
    """This rank's place in the job: its coordinates and the groups it talks over.

    Ranks are laid out data-major, then cfg, then Ulysses (`rank = (d * cfg + c) * ulysses + u`), so the ranks of
    one Ulysses group, which exchange the most, are neighbours.
    """

    config: ParallelConfig
    rank: int
    cfg_rank: int
    sp_rank: int
    data_rank: int
    cfg_group: dist.ProcessGroup | None
    sp_group: dist.ProcessGroup | None
    data_group: dist.ProcessGroup | None


def build_mesh(config: ParallelConfig) -> Mesh:
    """Create the sub-groups of `config` on the initialised world (every rank calls this, in the same order)."""
    world = dist.get_world_size()
    if world != config.world_size:
        raise ValueError(f"the world has {world} ranks but {config} needs {config.world_size}")
    rank = dist.get_rank()
    u, c = config.ulysses, config.cfg
    coords = lambda r: (r // (u * c), (r // u) % c, r % u)  # noqa: E731  (data, cfg, ulysses)
    groups: dict[str, dist.ProcessGroup | None] = {}
    for axis, size in (("data", config.data), ("cfg", c), ("sp", u)):
        groups[axis] = None
        if size == 1:
            continue
        index = {"data": 0, "cfg": 1, "sp": 2}[axis]
        buckets: dict[tuple, list[int]] = {}
        for r in range(world):
            key = tuple(x for i, x in enumerate(coords(r)) if i != index)
            buckets.setdefault(key, []).append(r)
        for members in buckets.values():
            group = dist.new_group(members)  # collective: every rank creates every group
            if rank in members:
                groups[axis] = group
    d, cr, s = coords(rank)
    return Mesh(config, rank, cr, s, d, groups["cfg"], groups["sp"], groups["data"])
