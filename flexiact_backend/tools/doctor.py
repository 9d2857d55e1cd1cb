"""`flexiact-backend doctor`: check this machine can serve FlexiAct and say how to fix what it cannot.

Each check prints OK, WARN or FAIL with its fix; the exit status is 1 when any check FAILs.
"""

from __future__ import annotations

import argparse
import json
import shutil
import socket
import subprocess
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from .hub import MODEL_FOLDER, default_weights_dir
from ..model_info import REFADAPTER_FILES, read_model_info
from ..service.config import DEFAULT_DATA_DIR

MIN_TORCH = (2, 5)
#: bf16 CogVideoX-5B-I2V with T5-XXL resident; below this use --memory-saving (offload, VAE tiling).
MIN_VRAM_GB = 24.0
MIN_FREE_DISK_GB = 10.0
PIPELINE_PARTS = ("transformer", "vae", "text_encoder", "tokenizer", "scheduler")


@dataclass(frozen=True)
class Check:
    """One line of the report: what was checked, its state, and what to do about it."""

    name: str
    status: str  # "OK" | "WARN" | "FAIL"
    detail: str
    fix: str = ""

    def line(self) -> str:
        text = f"[{self.status:4}] {self.name}: {self.detail}"
        return text + (f"\n       fix: {self.fix}" if self.fix and self.status != "OK" else "")


def check_torch() -> list[Check]:
    """torch version, CUDA and, per GPU, its memory (bf16 without offload needs about 24 GB)."""
    import torch

    version = torch.__version__.split("+")[0]
    parts = tuple(int(p) for p in version.split(".")[:2] if p.isdigit())
    checks = [Check("torch", "OK" if parts >= MIN_TORCH else "FAIL", torch.__version__,
                    "pip install -U 'torch>=2.5' (a CUDA build from https://pytorch.org for GPUs)")]
    if not torch.cuda.is_available():
        checks.append(Check("cuda", "WARN", "no CUDA device: only the tiny model is practical on the CPU",
                            "run the backend on a machine with an NVIDIA GPU and a CUDA build of torch"))
        return checks
    for i in range(torch.cuda.device_count()):
        props = torch.cuda.get_device_properties(i)
        gb = props.total_memory / 2**30
        checks.append(Check(f"cuda:{i}", "OK", f"{props.name}, {gb:.0f} GiB"))
    return checks


def check_vram(memory_saving: bool) -> Check | None:
    """The smallest GPU against MIN_VRAM_GB; None without CUDA (already reported)."""
    import torch

    if not torch.cuda.is_available():
        return None
    gb = min(torch.cuda.get_device_properties(i).total_memory for i in range(torch.cuda.device_count())) / 2**30
    if gb >= MIN_VRAM_GB or memory_saving:
        mode = "with --memory-saving" if memory_saving else "bf16, no offload"
        return Check("vram", "OK", f"{gb:.0f} GiB ({mode})")
    return Check("vram", "WARN", f"{gb:.0f} GiB is below {MIN_VRAM_GB:.0f} GiB for bf16 without offload",
                 "start the backend with `flexiact-backend serve --memory-saving ...`")


def check_disk(data_dir: Path) -> Check:
    existing = data_dir
    while not existing.exists():
        existing = existing.parent
    gb = shutil.disk_usage(existing).free / 1e9
    if gb < MIN_FREE_DISK_GB:
        return Check("disk", "WARN", f"{gb:.1f} GB free in {existing}",
                     f"free some space (uploads, actions and results go to {data_dir}) or pass --data-dir")
    return Check("disk", "OK", f"{gb:.1f} GB free in {existing}")


def check_weights(model_dir: Path) -> list[Check]:
    """The pipeline folder has every part's config, its configs parse, and a RefAdapter sits beside them."""
    fix = f"flexiact-backend download --dir {model_dir.parent}  (or pass --model DIR)"
    if not model_dir.is_dir():
        return [Check("weights", "FAIL", f"{model_dir} does not exist", fix)]
    missing = [p for p in PIPELINE_PARTS if not (model_dir / p).is_dir()]
    if missing:
        return [Check("weights", "FAIL", f"{model_dir} lacks {', '.join(missing)}", f"re-run (it resumes): {fix}")]
    try:
        info = read_model_info(model_dir)
    except (OSError, KeyError, ValueError) as e:
        return [Check("weights", "FAIL", f"configs in {model_dir} do not load: {e}", f"re-run (it resumes): {fix}")]
    if not any((model_dir / "transformer").glob("*.safetensors")):
        return [Check("weights", "FAIL", f"{model_dir / 'transformer'} holds no weights", f"re-run (it resumes): {fix}")]
    checks = [Check("weights", "OK", f"{info.id}: {info.width}x{info.height}, {info.frames} frames at {info.fps:g} fps"
                    + (" (tiny random model)" if info.tiny else ""))]
    named = json.loads((model_dir / "scheduler" / "scheduler_config.json").read_text()).get("_class_name", "?")
    checks.append(Check("sampling", "OK", f"the folder names {named}; generation samples with CogVideoXDPMScheduler "
                        "from its config, as the authors do. Reweighting: the paper's motion bias by default; "
                        "reweight_scale=null (--no-reweight) runs as the authors' released script, without it"))
    refadapter = next((n for n in REFADAPTER_FILES if (model_dir / n).is_file()), None)
    if refadapter:
        checks.append(Check("refadapter", "OK", str(model_dir / refadapter)))
    else:
        checks.append(Check("refadapter", "WARN", f"no {' or '.join(REFADAPTER_FILES)} in {model_dir}: generations "
                            "run without the RefAdapter", fix if not info.tiny else "expected for the tiny model"))
    return checks


def check_port(host: str, port: int) -> Check:
    """A FlexiAct backend answers on the port, or the port is free to start one."""
    url = f"http://{host}:{port}/v1/health"
    try:
        with urllib.request.urlopen(url, timeout=3) as r:
            health = json.loads(r.read())
        model = health.get("model", {})
        return Check("backend", "OK", f"a backend answers at {url}: {health.get('status')}, model {model.get('id')}")
    except (urllib.error.URLError, OSError, ValueError):
        pass
    with socket.socket() as s:
        try:
            s.bind((host, port))
        except OSError as e:
            return Check("backend", "FAIL", f"{host}:{port} is taken by something that is not a FlexiAct backend ({e})",
                         "pass another --port to `serve` (and to the add-on's preferences), or stop that program")
    return Check("backend", "OK", f"no backend running; {host}:{port} is free for `flexiact-backend serve`")


def check_ffmpeg() -> Check:
    fix = "pip install -U imageio-ffmpeg"
    try:
        import imageio_ffmpeg

        exe = imageio_ffmpeg.get_ffmpeg_exe()
        out = subprocess.run([exe, "-version"], capture_output=True, text=True, timeout=30, check=True).stdout
    except (ImportError, RuntimeError, OSError, subprocess.SubprocessError) as e:
        return Check("ffmpeg", "FAIL", f"no usable ffmpeg: {e}", fix)
    return Check("ffmpeg", "OK", out.splitlines()[0] if out else exe)


def run_checks(args: argparse.Namespace) -> list[Check]:
    checks = check_torch()
    vram = check_vram(args.memory_saving)
    if vram:
        checks.append(vram)
    checks.append(check_disk(args.data_dir))
    checks.extend(check_weights(args.model))
    checks.append(check_port(args.host, args.port))
    checks.append(check_ffmpeg())
    return checks


def run_doctor(args: argparse.Namespace) -> int:
    checks = run_checks(args)
    for c in checks:
        print(c.line())
    failed = [c.name for c in checks if c.status == "FAIL"]
    print(f"{len(failed)} problem(s): {', '.join(failed)}" if failed else "all checks passed")
    return 1 if failed else 0


def add_doctor_command(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register `doctor` (sets `func=run_doctor`)."""
    p = subparsers.add_parser("doctor", help="check torch, CUDA, VRAM, disk, weights, port and ffmpeg; print fixes",
                              description="Check this machine can run the backend. Exit status 1 when a check fails.")
    p.add_argument("--model", type=Path, default=default_weights_dir() / MODEL_FOLDER,
                   help="pipeline folder to check (default %(default)s, where `download` puts it)")
    p.add_argument("--data-dir", type=Path, default=DEFAULT_DATA_DIR, help="the backend's data dir (default %(default)s)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8765)
    p.add_argument("--memory-saving", action="store_true", help="you will serve with --memory-saving")
    p.set_defaults(func=run_doctor)
    return p
