"""Run the service as a separate process on loopback: used by `bench serve` and by the service tests.

Why a real process: the fault tests kill it with SIGKILL and start it again on the same data dir.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """`python -m flexiact_backend.service serve --tiny` (or `--model`) on 127.0.0.1, output to data_dir/server.log."""

    def __init__(self, data_dir: Path, *, model_dir: Path | None = None, token: str | None = None,
                 extra_args: tuple[str, ...] = (), env: dict[str, str] | None = None, port: int | None = None) -> None:
        self.data_dir = Path(data_dir)
        self.model_dir, self.token, self.extra_args = model_dir, token, extra_args
        self.env = env or {}
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None
        self.log_path = self.data_dir / "server.log"

    def start(self, timeout_s: float = 600.0) -> ServerProcess:
        """Start and wait until /v1/health says the model is loaded (or the process dies)."""
        self.data_dir.mkdir(parents=True, exist_ok=True)
        model = ["--model", str(self.model_dir)] if self.model_dir else ["--tiny"]
        cmd = [sys.executable, "-m", "flexiact_backend.service", "serve", *model, "--data-dir", str(self.data_dir),
               "--port", str(self.port), *(["--token", self.token] if self.token else []), *self.extra_args]
        env = {**os.environ, **self.env}
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
        self.wait_loaded(timeout_s)
        return self

    def health(self) -> dict | None:
        try:
            with urllib.request.urlopen(self.url + "/v1/health", timeout=5) as r:
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
