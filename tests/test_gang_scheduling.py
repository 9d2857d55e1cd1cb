"""How the pool schedules jobs on several GPUs (gangs), on a real SQLite queue and a real pool whose worker
threads are not started: the decisions alone, for a node of GPU workers (their devices are never touched).

A job on N GPUs takes N-1 idle workers of its claimer's node along; while it cannot start, the node's workers
are held for it instead of taking later, smaller jobs; a job no node can hold does not block the others; an
extraction yields to a waiting generation only when that frees what the generation needs.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from flexiact_backend.model_info import ModelInfo
from flexiact_backend.service.config import ServiceConfig
from flexiact_backend.service.db import Database, GpuRoom
from flexiact_backend.service.storage import FileStore
from flexiact_backend.service.worker import LocalExecutor, Worker, WorkerPool


@pytest.fixture
def db(tmp_path: Path) -> Database:
    return Database(tmp_path / "state.sqlite3")


def queue(db: Database, gpus: int) -> str:
    """A queued generation on `gpus` GPUs; its id."""
    return db.create_generation({"prompt": "p", "gpus": gpus}, 4, None)["id"]


def test_a_job_the_idle_gpus_cannot_start_holds_the_node_but_not_a_node_too_small(db: Database) -> None:
    big, small = queue(db, 2), queue(db, 1)
    assert db.claim_next("w0", GpuRoom(node=2, idle=1)) is None  # held: the 2-GPU job comes first
    assert db.claim_next("w0", GpuRoom(node=1, idle=1))["id"] == small  # a 1-GPU node can never hold it
    assert db.claim_next("w1", GpuRoom(node=2, idle=2))["id"] == big
    assert db.claim_next("w2", GpuRoom(node=2, idle=2)) is None  # nothing left


def test_cpu_workers_lend_nothing_and_take_jobs_in_queue_order(db: Database) -> None:
    first, _second = queue(db, 4), queue(db, 1)
    assert db.claim_next("cpu")["id"] == first  # its ranks are CPU processes of its own


@pytest.fixture
def pool(db: Database, tmp_path: Path) -> WorkerPool:
    """Two GPU workers on one node and one on another, idle; the pool's threads never start."""
    config = ServiceConfig(data_dir=tmp_path, tiny=True, devices=("cuda:0", "cuda:1", "cuda:2"))
    info = ModelInfo(id="tiny", tiny=True, width=96, height=64, frames=9, fps=8.0)
    pool = WorkerPool(config, db, FileStore(tmp_path), tmp_path, info)
    for i, place in enumerate(("node-a", "node-a", "node-b")):
        executor = LocalExecutor(f"cuda:{i}", tmp_path, checkpoint_every=2, refadapter=None, memory_saving=False)
        pool.workers.append(Worker(f"worker-{i}", executor, node=place, place=place, state="idle"))
    return pool


def test_a_claimed_two_gpu_job_reserves_an_idle_partner_of_the_same_node(pool: WorkerPool, db: Database) -> None:
    a0, a1, b0 = pool.workers
    job = queue(db, 2)
    assert pool._next_job(b0) is None  # node-b has one GPU: the job waits for node-a
    claimed, partners = pool._next_job(a1)
    assert claimed["id"] == job and partners == [a0]
    assert (a0.state, a0.job, a1.state, a1.job) == ("busy", job, "busy", job)
    assert pool._next_job(a0) is None  # lent to the gang: it claims nothing of its own


def test_an_extraction_yields_only_when_that_lets_the_waiting_generation_start(pool: WorkerPool, db: Database) -> None:
    a0, a1, b0 = pool.workers
    a0.state = "busy"  # running an extraction on node-a, alone
    assert not pool.should_pause_extraction(a0, 1)  # no generation waits
    queue(db, 1)
    assert not pool.should_pause_extraction(a0, 1)  # a1 and b0 are idle: it starts there
    a1.state = b0.state = "busy"
    assert pool.should_pause_extraction(a0, 1)  # no worker idle: the old rule
    db.claim_next("w")  # that generation started elsewhere
    queue(db, 2)
    a1.state = "idle"
    assert pool.should_pause_extraction(a0, 1)  # a1 idle alone cannot start it; a1 + a0 can
    assert not pool.should_pause_extraction(b0, 1)  # yielding b0 would not help: node-b has one GPU


@pytest.mark.parametrize("gpu_id, visible, index", [
    ("3", None, 3),  # the node shows every GPU: Ray's id is torch's index
    ("3", "", 3),
    ("6", "4,5,6,7", 2),  # a node started with CUDA_VISIBLE_DEVICES=4,5,6,7: the id's place in that list
    (5, "4, 5", 1),
])
def test_an_actor_that_sees_its_whole_node_finds_its_own_gpu(gpu_id, visible: str | None, index: int) -> None:
    pytest.importorskip("ray", reason="studio mode needs the [cluster] extra (make setup installs it)")
    from flexiact_backend.service.actor import cuda_index

    assert cuda_index(gpu_id, visible) == index
