"""Run the service (and a local Ray cluster) as separate processes on loopback: for `bench serve` and the tests.

Why real processes: the fault tests kill them with SIGKILL and start them again on the same data dir.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """`python -m flexiact_backend serve --tiny` (or `--model`) on 127.0.0.1, output to data_dir/server.log."""

    def __init__(self, data_dir: Path, *, model_dir: Path | None = None, token: str | None = None,
                 extra_args: tuple[str, ...] = (), env: dict[str, str] | None = None, port: int | None = None) -> None:
        self.data_dir = Path(data_dir)
        self.model_dir, self.token, self.extra_args = model_dir, token, extra_args
        self.env = env or {}
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None
        self.log_path = self.data_dir / "server.log"

    def start(self, timeout_s: float = 600.0, *, loaded: bool = True) -> ServerProcess:
        """Start and wait until /v1/health says the model is loaded (or the process dies); `loaded=False`:
        return at once."""
        self.data_dir.mkdir(parents=True, exist_ok=True)
        model = ["--model", str(self.model_dir)] if self.model_dir else ["--tiny"]
        cmd = [sys.executable, "-m", "flexiact_backend", "serve", *model, "--data-dir", str(self.data_dir),
               "--port", str(self.port), *(["--token", self.token] if self.token else []), *self.extra_args]
        env = {**os.environ, **self.env}
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
        if loaded:
            self.wait_loaded(timeout_s)
        return self

    def health(self) -> dict | None:
        headers = {"Authorization": f"Bearer {self.token}"} if self.token else {}
        try:
            with urllib.request.urlopen(urllib.request.Request(self.url + "/v1/health", headers=headers),
                                        timeout=5) as r:
                return json.loads(r.read())
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            return None

    def wait_loaded(self, timeout_s: float) -> dict:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}; see {self.log_path}:\n{self.log_tail()}")
            h = self.health()
            if h and h["model"]["loaded"]:
                return h
            if h and h["status"] == "error":
                raise RuntimeError(f"model failed to load: {h['model']['error']}")
            time.sleep(0.2)
        raise TimeoutError(f"server not ready after {timeout_s} s; see {self.log_path}:\n{self.log_tail()}")

    def log_tail(self, n: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    def kill(self) -> None:
        """SIGKILL: no shutdown code runs, like a crash or a power cut of the process."""
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()

    def stop(self, timeout_s: float = 20.0) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.kill()

    def __enter__(self) -> ServerProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


#: A safety net for a node that never comes up; never a performance bound.
RAY_START_S = 120.0


class LocalRayCluster:
    """A real Ray cluster on this machine, every node a `ray start --block` child of ours, on loopback only.

    Ray rewrites 127.0.0.1 to the machine's routable address, so the nodes take other loopback addresses
    (127.0.0.2, 127.0.0.3, ...), which it keeps. Stopping a node signals only the `ray start` we spawned,
    which takes its own Ray processes down with it. Each node has `num_cpus` CPUs and a small object store.
    Ray's token authentication is on (unless `auth=False`), with a token of this cluster's own: pass `env` to
    every process that joins it (the service); nothing is read from or written to ~/.ray. Its processes have a
    temp dir of their own (`tmp_dir`, where actors keep their scratch folders); `ray_env` adds Ray settings
    (e.g. a shorter GCS timeout) to every node and to `env`.
    """

    def __init__(self, *, auth: bool = True, ray_env: dict[str, str] | None = None) -> None:
        self.temp_dir = Path(tempfile.mkdtemp(prefix="fr-", dir="/tmp"))  # short: Ray's socket paths have a limit
        self.tmp_dir = self.temp_dir / "tmp"
        self.tmp_dir.mkdir()
        self.port = free_port()
        self.address = f"127.0.0.2:{self.port}"
        self.nodes: list[subprocess.Popen] = []
        auth_env = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32)} if auth else {}
        self.env = {**auth_env, "RAY_USAGE_STATS_ENABLED": "0", **(ray_env or {})}
        self.ray = str(Path(sys.executable).with_name("ray"))
        self._logs = 0

    def add_node(self, num_cpus: int = 1) -> subprocess.Popen:
        """Start the next node and wait until it has joined."""
        ip = f"127.0.0.{len(self.nodes) + 2}"
        cmd = [self.ray, "start", "--block", "--disable-usage-stats", f"--node-ip-address={ip}", f"--num-cpus={num_cpus}",
               "--num-gpus=0", "--object-store-memory=80000000"]
        if self.nodes:
            cmd.append(f"--address={self.address}")
        else:
            cmd += ["--head", f"--port={self.port}", "--include-dashboard=false", f"--temp-dir={self.temp_dir}"]
        log_path = self.temp_dir / f"node-{self._logs}.log"
        self._logs += 1
        with open(log_path, "wb") as log:
            proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                    env={**os.environ, **self.env, "TMPDIR": str(self.tmp_dir)})
        self.nodes.append(proc)
        deadline = time.monotonic() + RAY_START_S
        while b"Ray runtime started" not in log_path.read_bytes():
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"Ray node {ip} did not start:\n{log_path.read_text(errors='replace')[-3000:]}")
            time.sleep(0.2)
        return proc

    def remove_node(self, proc: subprocess.Popen, timeout_s: float = 30.0) -> None:
        """SIGTERM our `ray start --block`, which stops its node's processes; SIGKILL its group if it hangs."""
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()

    def kill_node(self, proc: subprocess.Popen) -> None:
        """SIGKILL the node's whole process group at once: the machine's power cut, as Ray sees it."""
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()

    def restart(self) -> None:
        """Kill what is left of the cluster, then start as many nodes again, on the same address and token."""
        count = len(self.nodes)
        for proc in reversed(self.nodes):
            self.kill_node(proc)
        self.nodes = []
        for _ in range(count):
            self.add_node()

    def stop(self) -> None:
        for proc in reversed(self.nodes):
            self.remove_node(proc)
        shutil.rmtree(self.temp_dir, ignore_errors=True)

    def __enter__(self) -> LocalRayCluster:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
