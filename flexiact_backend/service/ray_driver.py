"""The Ray driver of studio mode, in a child process of the service: it alone connects to the cluster.

Why a child process: Ray ends its driver's process when the cluster's head (GCS) stays unreachable ("Failed
to connect to GCS within 60 seconds... The program will terminate"). Here that ends only this child; the
service (cluster.RayCluster) notices, says so in /v1/health, keeps the queue, and starts a new child once the
head is back. The child answers requests from a pipe, one at a time, none of which waits on the cluster for
long: `submit` an actor call, ask which calls are `ready`, `get` one's answer, `kill` an actor.

Actors are created here, one per worker key, each on the alive node that has the fewest of ours (so workers
spread over the nodes again whenever one is recreated); a lost actor is recreated by the next `load`, not by
Ray's restarts, so that placement is decided in this one place.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections import Counter
from multiprocessing.connection import Connection
from typing import Any

import ray
from ray.exceptions import RayActorError, RayTaskError
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from .actor import ACTOR_ENV, JobActor

#: What `probe_auth` prints for a cluster that answers a client without a token.
OPEN = "open"
TOKEN = "token"
#: What the service may ask (Driver's methods of those names); "close" ends the child.
REQUESTS = frozenset({"capacity", "submit", "ready", "get", "kill"})
#: How long a graceful end of the actors may take when the service stops.
CLOSE_WAIT_S = 5.0


class Driver:
    """The actors of one connection to the cluster and the calls in flight to them."""

    def __init__(self, actor_args: tuple, resources: dict[str, float]) -> None:
        self.actor_class = ray.remote(JobActor)
        self.actor_args, self.resources = actor_args, resources
        self.actors: dict[int, ray.actor.ActorHandle] = {}
        self.nodes: dict[int, str] = {}  # worker key -> node id it was placed on (as its load reported)
        self.calls: dict[int, tuple[ray.ObjectRef, int, str]] = {}
        self._next = 0

    def capacity(self) -> dict[str, int]:
        """How many actors of ours the cluster holds: in all, and on its largest alive node (a job's gang of
        actors shares one node, so that bounds the GPUs one job may ask for)."""
        need = self._need()
        per_node = [int(n["Resources"].get(need, 0) // self.resources[need]) for n in ray.nodes() if n["Alive"]]
        return {"total": int(ray.cluster_resources().get(need, 0) // self.resources[need]),
                "largest": max(per_node, default=0)}

    def submit(self, key: int, method: str, args: tuple, fresh: bool = False) -> int:
        """Call `method` on worker `key`'s actor, created (or recreated, `fresh`) first; returns a call id."""
        if fresh and key in self.actors:
            self.kill(key)
        if key not in self.actors:
            self.actors[key] = self._create(key)
        ref = getattr(self.actors[key], method).remote(*args)
        self._next += 1
        self.calls[self._next] = (ref, key, method)
        return self._next

    def ready(self, ids: list[int]) -> list[int]:
        """Which of the calls `ids` have answered (or failed); never waits."""
        known = [i for i in ids if i in self.calls]
        if not known:
            return [i for i in ids if i not in self.calls]
        refs = [self.calls[i][0] for i in known]
        done, _ = ray.wait(refs, num_returns=len(refs), timeout=0, fetch_local=True)
        done_set = set(done)
        return [i for i in known if self.calls[i][0] in done_set]

    def get(self, call: int) -> tuple[str, Any]:
        """A finished call's ('ok', answer); ('lost', why) when its actor died, ('failed', why) when the method
        raised; the call is forgotten."""
        if call not in self.calls:
            return "lost", "the call is unknown to this connection to the cluster"
        ref, key, method = self.calls.pop(call)
        try:
            answer = ray.get(ref, timeout=0)
        except RayActorError as exc:
            return "lost", str(exc).strip().splitlines()[0]
        except RayTaskError as exc:
            return "failed", str(exc.cause if exc.cause is not None else exc)
        if method == "load":
            self.nodes[key] = answer["node_id"]
        return "ok", answer

    def kill(self, key: int) -> None:
        """End worker `key`'s actor for good; the next `submit` to the key starts a new one."""
        actor = self.actors.pop(key, None)
        self.nodes.pop(key, None)
        if actor is not None:
            ray.kill(actor, no_restart=True)

    def close(self) -> None:
        """End every actor gracefully (its scratch folder goes with it), then disconnect."""
        ends = [actor.__ray_terminate__.remote() for actor in self.actors.values()]
        ray.wait(ends, num_returns=len(ends), timeout=CLOSE_WAIT_S)
        ray.shutdown()

    def _create(self, key: int) -> ray.actor.ActorHandle:
        node = self._emptiest_node()
        if node:
            self.nodes[key] = node  # counted at once, so the next actor created goes elsewhere
        strategy = NodeAffinitySchedulingStrategy(node, soft=True) if node else "SPREAD"
        return self.actor_class.options(max_restarts=0, max_task_retries=0, max_concurrency=4,
                                        scheduling_strategy=strategy, runtime_env={"env_vars": ACTOR_ENV},
                                        **self._options()).remote(*self.actor_args)

    def _need(self) -> str:
        return "GPU" if "GPU" in self.resources else "CPU"

    def _options(self) -> dict[str, float]:
        return {"num_gpus": self.resources["GPU"]} if "GPU" in self.resources else {"num_cpus": self.resources["CPU"]}

    def _emptiest_node(self) -> str | None:
        """The alive node able to hold an actor with the fewest of our actors on it (ties: the first)."""
        need = self._need()
        nodes = [n["NodeID"] for n in ray.nodes() if n["Alive"] and n["Resources"].get(need, 0) >= self.resources[need]]
        if not nodes:
            return None
        ours = Counter(self.nodes[k] for k in self.actors if k in self.nodes)
        return min(nodes, key=lambda n: ours[n])


def main(conn: Connection, address: str, actor_args: tuple, resources: dict[str, float]) -> None:
    """The child's life: connect, say 'ready' (or why not), then answer requests until the pipe closes."""
    logging.basicConfig(level=logging.WARNING)
    try:
        ray.init(address=address, namespace="flexiact", logging_level=logging.WARNING)
        gcs = ray.get_runtime_context().gcs_address
    except Exception as exc:  # the service reports it and tries again later
        conn.send(("error", f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc) else ''}"))
        return
    driver = Driver(actor_args, resources)
    conn.send(("ready", {"gcs_address": gcs, "pid": os.getpid()}))
    while True:
        try:
            op, args = conn.recv()
        except (EOFError, OSError):  # the service is gone: so are we
            break
        if op == "close":
            driver.close()
            conn.send(("ok", None))
            break
        try:
            if op not in REQUESTS:
                raise ValueError(f"no such request: {op}")
            conn.send(("ok", getattr(driver, op)(*args)))
        except Exception as exc:  # a failed request is answered, the child lives on
            conn.send(("error", f"{type(exc).__name__}: {exc}"))
    conn.close()


def probe_auth(address: str) -> str:
    """'token' when the GCS at `address` refuses a client without a token, 'open' when it answers one.

    Run in a process of its own with token authentication off (cluster.auth_probe_env): Ray reads the mode
    once per process, and the service's own environment has it on.
    """
    from ray._raylet import GcsClient
    from ray.exceptions import AuthenticationError

    try:
        GcsClient(address=address).internal_kv_get(b"flexiact-probe", None, timeout=10)
    except AuthenticationError:
        return TOKEN
    return OPEN


if __name__ == "__main__":  # python -m flexiact_backend.service.ray_driver --probe-auth ADDRESS
    parser = argparse.ArgumentParser(description=probe_auth.__doc__)
    parser.add_argument("--probe-auth", metavar="ADDRESS", required=True)
    try:
        print(probe_auth(parser.parse_args().probe_auth))
    except Exception as exc:  # unreachable, or not a Ray GCS
        print(f"unreachable: {type(exc).__name__}: {exc}", file=sys.stderr)
        sys.exit(2)
