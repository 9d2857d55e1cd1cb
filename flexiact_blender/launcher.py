"""Optional local backend process started from the preferences; stopped with Blender."""

from __future__ import annotations

import atexit
import os
import shlex
import subprocess
import time

from .client import BackendClient, BackendError

#: A command that serves the quick test model on the default URL, from a checkout with `make setup` done.
EXAMPLE_COMMAND = "flexiact-backend serve --tiny --port 8765"


class Launcher:
    """Owns at most one backend process, with its output going to a log file."""

    def __init__(self) -> None:
        self.process: subprocess.Popen[bytes] | None = None
        self.log_path = ""

    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def start(self, command: str, log_path: str) -> None:
        """Start `command` (a shell-style command line); raise BackendError if it cannot be started."""
        if self.running():
            return
        argv = shlex.split(command)
        if not argv:
            raise BackendError("Set the Local Backend Command in the FlexiAct preferences first, e.g. "
                               f"`{EXAMPLE_COMMAND}`.", "no_command")
        os.makedirs(os.path.dirname(log_path), exist_ok=True)
        self.log_path = log_path
        with open(log_path, "ab") as log:
            try:
                self.process = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT,
                                                stdin=subprocess.DEVNULL)
            except OSError as exc:
                raise BackendError(f"Cannot start {argv[0]!r}: {exc}", "launch_failed") from exc

    def wait_healthy(self, client: BackendClient, timeout_s: float) -> dict:
        """Poll /v1/health until the model is loaded; fail early if the process dies (the log says why)."""
        deadline = time.monotonic() + timeout_s
        while True:
            if self.process is not None and self.process.poll() is not None:
                raise BackendError(f"The backend exited with code {self.process.returncode}; "
                                   f"see its log: {self.log_path}", "launch_failed")
            try:
                health = client.health()
            except BackendError:
                health = None
            model = (health or {}).get("model") or {}
            if health is not None and health.get("status") == "error":
                raise BackendError(f"The backend could not load its model: {model.get('error')}", "load_failed")
            if health is not None and model.get("loaded", True):
                return health
            if time.monotonic() > deadline:
                raise BackendError(f"The backend was not ready within {timeout_s:.0f} s; "
                                   f"see its log: {self.log_path}", "launch_timeout")
            time.sleep(0.25)

    def stop(self) -> None:
        """Terminate the process (kill it if it ignores that for 10 s)."""
        proc, self.process = self.process, None
        if proc is None or proc.poll() is not None:
            return
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


LAUNCHER = Launcher()
atexit.register(LAUNCHER.stop)
