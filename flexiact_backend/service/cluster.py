"""Studio mode (`serve --ray ADDRESS`): the service's workers as Ray actors, one per GPU of a Ray cluster.

Why Ray: a studio's GPUs sit on several machines. Ray places one actor per GPU (`num_gpus=1`) and carries
bytes through its object store, so the machines share no filesystem. The service stays the one front door: its
SQLite queue decides which job goes to which actor (worker.WorkerPool); the inputs go out as bytes, and the
output, the checkpoints and the latent cache come back as bytes, stored here atomically. A job whose actor dies
goes back to the queue and resumes elsewhere from the last checkpoint that reached the service.

Why no Ray in this process: Ray ends its driver's process when the head stays unreachable. The driver lives in
a child process (ray_driver.py) that this module supervises over a pipe: when the head is lost the child is
ended, /v1/health says `degraded` with the reason, the running jobs go back to the queue (new ones are
accepted and wait), and a new child connects once the head answers again (retried with a growing delay).
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..atomic import write_atomically
from ..errors import Cancelled, FlexiActError, Paused
from .config import ServiceConfig
from .executor import ClusterDown, Executor, RankPlace, WorkerLost, read_work, write_work
from .runner import Hooks, take_path

log = logging.getLogger("flexiact.service")

#: How often the service asks a busy actor for progress and passes on cancel and pause (well under a step).
POLL_S = 0.2
#: How often a wait on an actor's call asks the driver whether it has answered.
TICK_S = 0.01
#: An actor that answers nothing for this long is taken for lost: it is recreated, its job requeued.
LOST_AFTER_S = 20.0
#: How long the other ranks of a job and its leader may end apart before the one not ended is taken for stuck.
RANK_GRACE_S = 10.0
#: The errors every rank of a job raises together (the leader's stop wish, agreed at one step).
STOP_CODES = frozenset({"paused", "cancelled"})
#: How long one look at a starting (or restarting) actor waits before the worker thread looks around again.
LOAD_WAIT_S = 2.0
#: How often the head is checked; it is taken for lost after HEAD_MISSES checks in a row fail.
CHECK_EVERY_S = 1.0
HEAD_MISSES = 2
#: Reconnecting: the first retry after this long, each next one after twice as long, never more than the cap.
RETRY_FIRST_S, RETRY_MAX_S = 1.0, 30.0
#: How long one connection attempt (a new driver joining the cluster) may take.
CONNECT_TIMEOUT_S = 60.0
#: A request to the driver that takes longer than this means the driver is stuck: it is replaced.
REQUEST_TIMEOUT_S = 30.0
OPEN_CLUSTER_MESSAGE = (
    "the Ray cluster at {address} does not require token authentication: anyone who reaches its ports can run "
    "code on its machines. Restart every node of it with token authentication (`ray get-auth-token --generate`, "
    "then `RAY_AUTH_MODE=token ray start ...` on every machine, and RAY_AUTH_MODE=token for the service too), "
    "or, on a network you trust, start the service with --ray-allow-no-auth")
OPEN_CLUSTER_WARNING = ("the Ray cluster does not require token authentication (allowed by --ray-allow-no-auth): "
                        "anyone who reaches its ports can run code on its machines")

#: A call in flight on an actor: (the driver connection it belongs to, its id there).
Call = tuple[int, int]


def cluster_auth(address: str, timeout_s: float = 60.0) -> str | None:
    """'token' or 'open' for the cluster whose GCS is at `address`; None when it cannot be reached.

    Asked from a process of its own without the token (ray_driver.probe_auth): does the head answer a stranger?
    """
    if _reachable(address, require_port=True):  # down (or not host:port): Ray's client would wait a minute
        return None
    try:
        run = subprocess.run([sys.executable, "-m", "flexiact_backend.service.ray_driver", "--probe-auth", address],
                             capture_output=True, text=True, timeout=timeout_s, env=auth_probe_env(dict(os.environ)))
    except subprocess.TimeoutExpired:
        return None
    return run.stdout.strip() if run.returncode == 0 else None


def auth_probe_env(environ: dict[str, str]) -> dict[str, str]:
    """The environment of an authentication probe: the service's, with Ray's token and its mode taken out."""
    env = {k: v for k, v in environ.items() if k not in ("RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH")}
    return {**env, "RAY_AUTH_MODE": "disabled"}


def _driver_main(*args: object) -> None:
    """The driver child's entry: Ray is imported there, never in the service process."""
    from .ray_driver import main

    main(*args)  # type: ignore[arg-type]


def _reachable(address: str, timeout_s: float = 2.0, *, require_port: bool = False) -> str | None:
    """None when something listens at host:port, else why not (e.g. 'Connection refused').

    An address that is not host:port (e.g. 'auto') counts as reachable unless `require_port`: only the
    driver's own connection can tell.
    """
    host, _, port = address.rpartition(":")
    if not (host and port.isdigit()):
        return "not a host:port address" if require_port else None
    try:
        with socket.create_connection((host, int(port)), timeout=timeout_s):
            return None
    except OSError as exc:
        return exc.strerror or type(exc).__name__


class RemoteJobError(FlexiActError):
    """A job that failed inside an actor, with the actor's code and message."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


class _CallFailed(Exception):
    """The actor's method raised (the actor itself lives)."""


@dataclass
class _Link:
    """The service's end of one driver child: its process and pipe, and which connection it is."""

    epoch: int
    process: multiprocessing.process.BaseProcess
    conn: Any
    gcs_address: str


class RayCluster:
    """The connection to the cluster (supervised, reconnected), and the actors it should have."""

    def __init__(self, config: ServiceConfig, model_dir: Path, *, refadapter: Path | None,
                 memory_saving: bool) -> None:
        self.address = config.ray_address
        self.allow_no_auth = config.ray_allow_no_auth
        self.cpu_workers = config.ray_workers
        self.actor_args = (None if config.tiny else str(model_dir), config.checkpoint_every,
                           str(refadapter) if refadapter else None, memory_saving)
        self.resources = {"CPU": 1.0} if self.cpu_workers is not None else {"GPU": 1.0}
        self._lock = threading.Lock()  # one request at a time on the pipe
        self._link: _Link | None = None
        self._epoch = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.state, self.reason, self.since = "connecting", None, time.time()
        self.auth: str | None = None
        self.reconnects = 0
        self._warned = False
        self._largest: int | None = None  # actors the largest node holds, as last seen (None: not seen yet)

    # ---- supervision ---------------------------------------------------------------------------
    def start(self) -> None:
        self._thread = threading.Thread(target=self._supervise, name="flexiact-ray-link", daemon=True)
        self._thread.start()

    def shutdown(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(CONNECT_TIMEOUT_S)
        link, self._link = self._link, None
        if link is not None:
            with self._lock:
                try:
                    link.conn.send(("close", ()))
                    if link.conn.poll(REQUEST_TIMEOUT_S):
                        link.conn.recv()
                except (OSError, EOFError):
                    pass
            self._end(link)

    def _supervise(self) -> None:
        delay, attempt, misses = RETRY_FIRST_S, 0, 0
        while not self._stop.is_set():
            link = self._link
            if link is None:
                attempt += 1
                try:
                    self._connect()
                except ConnectionError as exc:
                    self._degrade(str(exc))
                    log.warning("connecting to the Ray cluster at %s failed (attempt %d): %s; next try in %.0f s",
                                self.address, attempt, exc, delay)
                    self._stop.wait(delay)
                    delay = min(2 * delay, RETRY_MAX_S)
                    continue
                if attempt > 1 or self.reconnects:
                    self.reconnects += 1
                    log.warning("reconnected to the Ray cluster at %s (attempt %d); queued jobs run again",
                                self.address, attempt)
                delay, attempt, misses = RETRY_FIRST_S, 0, 0
                continue
            problem = None if link.process.is_alive() else f"the Ray driver process ended (exit code " \
                f"{link.process.exitcode}; Ray ends it when the head stays unreachable)"
            if problem is None:
                why = _reachable(link.gcs_address)
                misses = misses + 1 if why else 0
                if misses >= HEAD_MISSES:
                    problem = f"lost the Ray head at {link.gcs_address} ({why})"
            if problem is not None:
                self._lose(link, problem)
                misses = 0
                continue
            self._stop.wait(CHECK_EVERY_S)

    def _connect(self) -> None:
        """Start a driver child and wait until it joined the cluster; ConnectionError says why not."""
        why = _reachable(self.address)
        if why:
            raise ConnectionError(f"the Ray head at {self.address} does not answer ({why})")
        parent, child = multiprocessing.Pipe()
        process = multiprocessing.get_context("spawn").Process(
            target=_driver_main, args=(child, self.address, self.actor_args, self.resources),
            name="flexiact-ray-driver", daemon=True)
        process.start()
        child.close()
        link = _Link(self._epoch + 1, process, parent, "")
        deadline = time.monotonic() + CONNECT_TIMEOUT_S
        while not parent.poll(0.5):
            if self._stop.is_set() or time.monotonic() > deadline:
                self._end(link)
                raise ConnectionError(f"joining the Ray cluster at {self.address} took over "
                                      f"{CONNECT_TIMEOUT_S:.0f} s" if not self._stop.is_set() else "stopping")
        try:
            kind, info = parent.recv()
        except (EOFError, OSError):
            kind, info = "error", f"the Ray driver process ended (exit code {process.exitcode})"
        if kind != "ready":
            self._end(link)
            raise ConnectionError(f"joining the Ray cluster at {self.address} failed: {info}")
        link.gcs_address = info["gcs_address"]
        auth = cluster_auth(link.gcs_address)
        if auth == "open" and not self.allow_no_auth:
            self._end(link)
            log.error("refusing the Ray cluster: %s", OPEN_CLUSTER_MESSAGE.format(address=self.address))
            raise ConnectionError(OPEN_CLUSTER_MESSAGE.format(address=self.address))
        if auth == "open":
            log.warning("%s", OPEN_CLUSTER_WARNING)
        self.auth = auth
        self._epoch = link.epoch
        self._link = link
        self.state, self.reason, self.since = "ok", None, time.time()
        log.info("connected to the Ray cluster at %s (driver pid %s, authentication: %s)", self.address,
                 info["pid"], auth or "unknown")

    def _lose(self, link: _Link, problem: str) -> None:
        log.warning("%s: the running jobs go back to the queue, new ones wait; reconnecting", problem)
        self._degrade(problem)
        self._link = None
        self._end(link)

    def _degrade(self, reason: str) -> None:
        if self.state != "degraded" or self.reason != reason:
            self.state, self.reason, self.since = "degraded", reason, time.time()

    @staticmethod
    def _end(link: _Link) -> None:
        """End a driver child for good: politely if it already finished, else SIGKILL (it may hang on the head)."""
        link.process.join(0.5)
        if link.process.is_alive():
            link.process.kill()
            link.process.join(5)
        link.conn.close()

    # ---- what the pool and its executors ask ------------------------------------------------
    @property
    def connected(self) -> bool:
        return self._link is not None

    @property
    def epoch(self) -> int:
        return self._epoch

    def head_lost(self) -> bool:
        """Whether the head is gone now (asked when an actor was lost: was it the head's loss?)."""
        link = self._link
        return link is None or _reachable(link.gcs_address) is not None

    def health(self) -> dict:
        return {"address": self.address, "status": self.state, "reason": self.reason, "since": self.since,
                "auth": self.auth, "reconnects": self.reconnects,
                "warning": OPEN_CLUSTER_WARNING if self.auth == "open" else None}

    def note(self) -> str | None:
        """What a client submitting a job now should know: None while the cluster is connected."""
        if self.state == "ok":
            return None
        return (f"the Ray cluster is unreachable ({self.reason or 'connecting'}); the job is queued and runs when "
                "the service has reconnected (it retries by itself)")

    def request(self, op: str, *args: object, epoch: int | None = None) -> Any:
        """One request to the driver; ClusterDown when it is gone (or, `epoch` given, was replaced since)."""
        link = self._link
        if link is None or (epoch is not None and epoch != link.epoch):
            raise ClusterDown(self.reason or "the connection to the Ray cluster was reset")
        with self._lock:
            try:
                link.conn.send((op, args))
                if not link.conn.poll(REQUEST_TIMEOUT_S):
                    raise ClusterDown(f"the Ray driver did not answer {op} within {REQUEST_TIMEOUT_S:.0f} s")
                kind, answer = link.conn.recv()
            except (EOFError, OSError) as exc:
                raise ClusterDown(f"the Ray driver process is gone ({type(exc).__name__})") from None
        if kind == "error":
            raise WorkerLost(f"the Ray driver could not {op}: {answer}")
        return answer

    def submit(self, key: int, method: str, *args: object, epoch: int | None = None, fresh: bool = False) -> Call:
        link_epoch = self._epoch
        return link_epoch, self.request("submit", key, method, args, fresh, epoch=epoch or link_epoch)

    def wait(self, call: Call, timeout_s: float) -> bool:
        """True once `call` has answered; False after `timeout_s`."""
        deadline = time.monotonic() + timeout_s
        while not self.request("ready", [call[1]], epoch=call[0]):
            if time.monotonic() >= deadline:
                return False
            time.sleep(TICK_S)
        return True

    def get(self, call: Call) -> Any:
        """A finished call's answer; WorkerLost when its actor died, _CallFailed when the method raised."""
        kind, answer = self.request("get", call[1], epoch=call[0])
        if kind == "lost":
            raise WorkerLost(answer)
        if kind == "failed":
            raise _CallFailed(answer)
        return answer

    def kill(self, key: int) -> None:
        try:
            self.request("kill", key)
        except WorkerLost:  # the cluster is gone: so is the actor
            pass

    def largest_node(self) -> tuple[int | None, str]:
        """How many GPUs (CPU workers) the cluster's largest node holds, as last seen, and which of the two;
        None before the cluster was first seen."""
        if self.cpu_workers is None:
            return self._largest, "GPUs"
        largest = None if self._largest is None else min(self._largest, self.cpu_workers)
        return largest, "CPUs for CPU workers"

    def new_executors(self, have: int) -> list[RayExecutor]:
        """Actors for the GPUs (or CPU workers) the cluster has beyond the `have` already started."""
        if not self.connected:
            return []
        capacity = self.request("capacity")
        self._largest = capacity["largest"]
        want = self.cpu_workers if self.cpu_workers is not None else capacity["total"]
        if want == 0 and not self._warned:
            log.warning("the Ray cluster has no GPUs yet; workers start when GPU nodes join (or pass "
                        "--ray-workers N for N CPU workers)")
            self._warned = True
        return [RayExecutor(self, key) for key in range(have, want)]


class RayExecutor:
    """The service's side of one worker's actor (worker `key`): ships a job's files out, polls, stores results."""

    def __init__(self, cluster: RayCluster, key: int) -> None:
        self.cluster, self.key = cluster, key
        self._epoch: int | None = None  # the connection the loaded actor belongs to
        self._loading: Call | None = None
        self._ping: tuple[Call, float] | None = None
        self._lost = False

    def load(self) -> dict | None:
        """The actor's {node, device, device_name, pid} once loaded; None while it starts, or while the
        cluster is unreachable. A lost actor is replaced by a new one, placed on the emptiest node."""
        if not self.cluster.connected:
            time.sleep(LOAD_WAIT_S)
            return None
        try:
            if self._loading is None:
                self._loading = self.cluster.submit(self.key, "load", fresh=self._lost)
                self._lost = False
            if not self.cluster.wait(self._loading, LOAD_WAIT_S):
                return None
            call, self._loading = self._loading, None
            where = self.cluster.get(call)
        except _CallFailed as exc:
            self._loading = None
            raise RuntimeError(str(exc)) from None
        except WorkerLost:  # died while loading, or the cluster went away: the next look starts again
            self._loading, self._lost = None, True
            return None
        self._epoch, self._ping = call[0], None
        return where

    def alive(self) -> bool:
        if self._lost or self._epoch != self.cluster.epoch or not self.cluster.connected:
            return False
        try:
            if self._ping is None:
                self._ping = (self.cluster.submit(self.key, "ping", epoch=self._epoch), time.monotonic())
                return True
            call, sent = self._ping
            if self.cluster.wait(call, 0):
                self._ping = None
                return bool(self.cluster.get(call))
        except (WorkerLost, _CallFailed):
            self._lost = True
            return False
        return time.monotonic() - sent < LOST_AFTER_S

    def lends_device(self) -> bool:
        return True

    def run(self, kind: str, params: dict, inputs: dict[str, Path | None], work_dir: Path | None, out: Path,
            hooks: Hooks, partners: Sequence[Executor] = ()) -> dict:
        """Run the job on this actor, or with `partners` on the gang of this actor (the leader, rank 0) and
        theirs, all on one node, forming one process group. A rank that is lost or fails alone leaves the others
        waiting in a collective: the whole gang is restarted, and the job goes back to the queue (WorkerLost)
        or fails with that rank's error."""
        sent = {name: (path.name, path.read_bytes()) if path else None for name, path in inputs.items()}
        work = read_work(work_dir)
        gang: list[RayExecutor] = [self, *partners]  # type: ignore[list-item]
        try:
            places = self._places(len(gang))
            calls = [member._submit("run", kind, params, sent, work, place) for member, place in zip(gang, places)]
            answer = self._follow(calls[0], kind, work_dir, hooks, list(zip(gang[1:], calls[1:])))
        except BaseException:
            if partners:
                for member in gang:
                    member._restart()
            raise
        if "error" in answer:
            raise self._error(answer["error"])
        write_atomically(out, lambda tmp: Path(tmp).write_bytes(answer["output"]))
        for i, data in enumerate(answer.get("takes") or (), start=1):  # a generation's other takes
            write_atomically(take_path(out, i), lambda tmp, data=data: Path(tmp).write_bytes(data))
        return answer["result"]

    def _places(self, size: int) -> list[RankPlace | None]:
        """Each gang member's rank and the leader's rendezvous port ([None]: a job on this actor alone)."""
        if size == 1:
            return [None]
        port = self._ask("rendezvous_port")
        return [RankPlace(rank, size, port) for rank in range(size)]

    def _follow(self, call: Call, kind: str, work_dir: Path | None, hooks: Hooks,
                followers: list[tuple[RayExecutor, Call]]) -> dict:
        """Wait for the leader's answer, passing on progress, work files and stop wishes, while watching the other
        ranks: one lost, or failed alone (its leader not answering within RANK_GRACE_S), fails the attempt."""
        poll: Call | None = None
        heard = time.monotonic()
        pending = list(followers)
        while not self._wait(call, POLL_S):
            for member, rank_call in list(pending):
                if member._wait(rank_call, 0):  # the others end first anyway: the leader writes the video
                    pending.remove((member, rank_call))
                    error = member._get(rank_call).get("error")  # WorkerLost when the rank died
                    if error and error["code"] not in STOP_CODES and not self._wait(call, RANK_GRACE_S):
                        raise self._error(error)  # failed alone: its leader waits in a collective for it
            if poll is not None and self._wait(poll, 0):
                self._apply(self._get(poll), work_dir, hooks)
                poll, heard = None, time.monotonic()
            if poll is None:
                extract = kind == "extract"
                poll = self._submit("poll", hooks.cancel(), extract and hooks.pause(), extract and hooks.finish())
            elif time.monotonic() - heard > LOST_AFTER_S:
                self._restart()
                raise WorkerLost(f"the actor did not answer for {LOST_AFTER_S:.0f} s")
        if poll is not None and self._wait(poll, LOST_AFTER_S):  # a poll in flight may hold files the actor
            self._apply(self._get(poll), work_dir, hooks)  # already counts as sent (a last preview): store them
        answer = self._get(call)
        self._apply(answer, work_dir, hooks)
        lost = None
        for member, rank_call in pending:  # the leader has answered: a rank that does not end now is stuck
            try:
                if member._wait(rank_call, RANK_GRACE_S):
                    member._get(rank_call)
                    continue
            except WorkerLost as exc:
                lost = exc
            member._restart()
        if lost is not None and answer.get("error", {}).get("code") not in (None, *STOP_CODES):
            raise WorkerLost(f"a rank of the job was lost ({lost}); its leader failed with it")
        return answer

    def _ask(self, method: str, *args: object) -> Any:
        """One short call on the actor, waited for."""
        call = self._submit(method, *args)
        if not self._wait(call, LOST_AFTER_S):
            self._restart()
            raise WorkerLost(f"the actor did not answer {method} within {LOST_AFTER_S:.0f} s")
        return self._get(call)

    def _submit(self, method: str, *args: object) -> Call:
        return self._lose_on_failure(lambda: self.cluster.submit(self.key, method, *args, epoch=self._epoch))

    def _wait(self, call: Call, timeout_s: float) -> bool:
        return self._lose_on_failure(lambda: self.cluster.wait(call, timeout_s))

    def _get(self, call: Call) -> dict:
        try:
            return self._lose_on_failure(lambda: self.cluster.get(call))
        except _CallFailed as exc:
            raise RemoteJobError("internal_error", str(exc)) from None

    def _lose_on_failure(self, do: Any) -> Any:
        try:
            return do()
        except WorkerLost:
            self._lost = True
            raise

    def _apply(self, answer: dict, work_dir: Path | None, hooks: Hooks) -> None:
        """Work files first, then progress: progress never runs ahead of the checkpoints stored here."""
        if work_dir is not None and answer["work"]:
            write_work(work_dir, answer["work"])
        for event in answer["events"]:
            hooks.progress(**event)

    def _error(self, error: dict) -> Exception:
        code, message = error["code"], error["message"]
        if code == "paused":
            return Paused(message)
        if code == "cancelled":
            return Cancelled(message)
        if code == "cuda_error":  # the device's context is unusable: a fresh process, the job fails alone
            self._restart()
        return RemoteJobError(code, message)

    def _restart(self) -> None:
        """End the actor; the worker's next load starts a new one."""
        self._lost = True
        self.cluster.kill(self.key)
