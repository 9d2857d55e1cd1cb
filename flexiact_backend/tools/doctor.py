"""`flexiact-backend doctor`: check this machine can serve FlexiAct and say how to fix what it cannot.

Each check prints OK, WARN or FAIL with its fix; the exit status is 1 when any check FAILs. It proves what it
claims: it loads the tokenizer and every config as generation will, imports what each mode needs (memory
saving: accelerate and a CUDA GPU; studio mode: ray) and compares torch's CUDA build with the driver, so a
passing doctor means `generate` and `serve` will start.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import socket
import subprocess
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from ..errors import FlexiActError
from .hub import MODEL_FOLDER, default_weights_dir
from ..model_info import REFADAPTER_FILES, ModelInfo, find_refadapter, read_model_info
from ..requirements import TOKENIZER_PACKAGES, missing, needs_sentencepiece, require_cluster
from ..service.config import DEFAULT_DATA_DIR

MIN_TORCH = (2, 5)
#: bf16 CogVideoX-5B-I2V with T5-XXL resident peaks near 26 GB (estimate) plus context; below, --memory-saving.
MIN_VRAM_GB = 32.0
MIN_FREE_DISK_GB = 10.0
PIPELINE_PARTS = ("transformer", "vae", "text_encoder", "tokenizer", "scheduler")
TORCH_INDEX = "https://download.pytorch.org/whl/cu{cuda}"
#: The CUDA builds of torch in the README's table, newest first.
TORCH_BUILDS = ((13, 0), (12, 8), (12, 6))


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
    driver = driver_cuda_version()
    build = torch.version.cuda
    if driver is not None:
        checks.append(check_cuda_build(build, driver, torch.__version__))
    if not torch.cuda.is_available():
        if driver is None:
            checks.append(Check("cuda", "WARN", "no CUDA device: only the tiny model is practical on the CPU",
                                "run the backend on a machine with an NVIDIA GPU and a CUDA build of torch"))
        return checks
    for i in range(torch.cuda.device_count()):
        props = torch.cuda.get_device_properties(i)
        gb = props.total_memory / 2**30
        checks.append(Check(f"cuda:{i}", "OK", f"{props.name}, {gb:.0f} GiB"))
    return checks


def driver_cuda_version() -> tuple[int, int] | None:
    """The newest CUDA the installed NVIDIA driver supports (from `nvidia-smi`), or None without a driver."""
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return None
    try:
        out = subprocess.run([exe], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    found = re.search(r"CUDA Version:\s*(\d+)\.(\d+)", out)
    return (int(found.group(1)), int(found.group(2))) if found else None


def check_cuda_build(build: str | None, driver: tuple[int, int], version: str) -> Check:
    """torch's CUDA build (`torch.version.cuda`) against what the driver supports."""
    supported = f"{driver[0]}.{driver[1]}"
    fitting = next((b for b in TORCH_BUILDS if b <= driver), None)
    if fitting is None:
        fix = (f"update the NVIDIA driver: torch's CUDA builds need CUDA {TORCH_BUILDS[-1][0]}.{TORCH_BUILDS[-1][1]} "
               "or newer (README: 'Which torch build')")
    else:
        index = TORCH_INDEX.format(cuda=f"{fitting[0]}{fitting[1]}")
        fix = (f"pip install torch --index-url {index}  (a build for CUDA {fitting[0]}.{fitting[1]}; README: "
               "'Which torch build'), or update the NVIDIA driver")
    if build is None:
        return Check("cuda build", "FAIL", f"torch {version} is a CPU-only build, but an NVIDIA driver (CUDA "
                     f"{supported}) is installed: the GPU would go unused", fix)
    major_minor = tuple(int(p) for p in build.split(".")[:2])
    if major_minor[0] > driver[0]:
        return Check("cuda build", "FAIL", f"torch {version} is built for CUDA {build}; the driver supports CUDA "
                     f"{supported} at most, so CUDA cannot start", fix)
    if major_minor > driver:  # same major: minor-version compatibility runs it, but new kernels may not load
        return Check("cuda build", "WARN", f"torch is built for CUDA {build}, newer than the driver's {supported}: "
                     "it runs by minor-version compatibility, some kernels (compiled ones, fp8) may not", fix)
    return Check("cuda build", "OK", f"torch built for CUDA {build}; the driver supports CUDA {supported}")


def check_packages(model_dir: Path, memory_saving: bool, cluster: bool) -> list[Check]:
    """The packages the folder's tokenizer and the chosen modes import."""
    checks = []
    if needs_sentencepiece(model_dir):
        absent = missing(TOKENIZER_PACKAGES)
        checks.append(Check("tokenizer packages", "FAIL", f"{' and '.join(absent)} not installed: the folder's "
                            "SentencePiece tokenizer (spiece.model) cannot be loaded", f"pip install {' '.join(absent)}")
                      if absent else Check("tokenizer packages", "OK", "sentencepiece and protobuf installed"))
    if memory_saving:
        import torch

        fix = "pip install accelerate"
        checks.append(Check("accelerate", "FAIL", "not installed: --memory-saving (model CPU offload) imports it", fix)
                      if missing({"accelerate": "accelerate"}) else Check("accelerate", "OK", "installed"))
        if not torch.cuda.is_available():
            checks.append(Check("memory saving", "FAIL", "--memory-saving needs a CUDA GPU: it offloads idle "
                                "sub-models from the GPU to CPU memory, and there is no CUDA device",
                                "run on a CUDA GPU, or leave --memory-saving out"))
    if cluster:
        try:
            require_cluster()
            checks.append(Check("ray", "OK", "installed"))
        except FlexiActError as e:
            checks.append(Check("ray", "FAIL", str(e), "pip install -e '.[cluster]' in the FlexiAct clone"))
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


def load_configs(model_dir: Path) -> list[str]:
    """Load every part's config as the pipeline will, and check that each shard an index names is there;
    returns what was loaded, raises on the first problem."""
    import diffusers
    import transformers

    index = json.loads((model_dir / "model_index.json").read_text())
    loaded = []
    for part in PIPELINE_PARTS:
        library, name = index[part]
        cls = getattr(diffusers if library == "diffusers" else transformers, name)
        if part == "tokenizer":
            continue  # loaded in full by check_tokenizer
        if part == "text_encoder":
            cls.config_class.from_pretrained(model_dir / part)
        else:
            cls.load_config(model_dir / part)
        for index_file in (model_dir / part).glob("*.safetensors.index.json"):
            shards = set(json.loads(index_file.read_text())["weight_map"].values())
            absent = sorted(s for s in shards if not (model_dir / part / s).is_file())
            if absent:
                raise FileNotFoundError(f"{index_file.name} names {len(absent)} missing shard(s), e.g. {absent[0]}")
        loaded.append(f"{part} ({name})")
    return loaded


def check_tokenizer(model_dir: Path) -> Check:
    """Load the tokenizer in full, with the class the folder names, and encode a prompt."""
    import transformers

    name = json.loads((model_dir / "model_index.json").read_text())["tokenizer"][1]
    try:
        tokenizer = getattr(transformers, name).from_pretrained(model_dir / "tokenizer")
        ids = tokenizer("a person waves", padding="max_length", max_length=tokenizer.model_max_length).input_ids
    except Exception as e:  # anything transformers raises here stops generation at load time
        absent = missing(TOKENIZER_PACKAGES) if needs_sentencepiece(model_dir) else []
        fix = f"pip install {' '.join(absent)}" if absent else "re-run `flexiact-backend download` (it resumes)"
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        return Check("tokenizer", "FAIL", f"{name} in {model_dir / 'tokenizer'} does not load: {first}", fix)
    return Check("tokenizer", "OK", f"{name}, {len(tokenizer)} tokens, prompts padded to {len(ids)}")


def check_refadapter(model_dir: Path, info: ModelInfo, refadapter: Path | None, fix: str) -> Check:
    """The RefAdapter is found, loads weights-only and fits the model; a real model without one FAILs,
    since generation refuses RefAdapter weight > 0 without it."""
    path = find_refadapter(model_dir, refadapter)
    if path is None:
        if info.tiny:
            return Check("refadapter", "OK", "none (expected for the tiny model: it runs at weight 0)")
        return Check("refadapter", "FAIL", f"no {' or '.join(REFADAPTER_FILES)} in {model_dir}: generations with "
                     "RefAdapter weight above 0 are refused", f"{fix}; or pass --refadapter FILE; or generate with "
                     "lora_weight 0 (--no-refadapter) on purpose")
    expected = {}
    for i in range(info.num_layers):
        for name in ("lora_q", "lora_k", "lora_v", "lora_proj"):
            prefix = f"transformer_blocks.{i}.attn1.processor.{name}"
            expected[f"{prefix}.down.weight"] = (info.rank, info.inner_dim)
            expected[f"{prefix}.up.weight"] = (info.inner_dim, info.rank)
    try:
        from ..model.checkpoints import check_state_dict, read_state_dict  # torch: not for the CLI's --help

        check_state_dict(read_state_dict(path), expected, "RefAdapter checkpoint")
    except FlexiActError as e:
        return Check("refadapter", "FAIL", str(e), f"replace {path} ({fix})")
    return Check("refadapter", "OK", f"{path} loads and fits ({info.num_layers} layers, rank {info.rank})")


def check_weights(model_dir: Path, refadapter: Path | None = None) -> list[Check]:
    """The pipeline folder has every part, its configs and tokenizer load, its shards are there, and its
    RefAdapter loads."""
    fix = f"flexiact-backend download --dir {model_dir.parent}  (or pass --model DIR)"
    if not model_dir.is_dir():
        return [Check("weights", "FAIL", f"{model_dir} does not exist", fix)]
    missing_parts = [p for p in PIPELINE_PARTS if not (model_dir / p).is_dir()]
    if missing_parts:
        return [Check("weights", "FAIL", f"{model_dir} lacks {', '.join(missing_parts)}", f"re-run (it resumes): {fix}")]
    try:
        info = read_model_info(model_dir)
        loaded = load_configs(model_dir)
    except (OSError, KeyError, ValueError, TypeError, AttributeError) as e:
        return [Check("weights", "FAIL", f"configs in {model_dir} do not load: {type(e).__name__}: {e}",
                      f"re-run (it resumes): {fix}")]
    if not any((model_dir / "transformer").glob("*.safetensors")):
        return [Check("weights", "FAIL", f"{model_dir / 'transformer'} holds no weights", f"re-run (it resumes): {fix}")]
    checks = [Check("weights", "OK", f"{info.id}: {info.width}x{info.height}, {info.frames} frames at {info.fps:g} fps"
                    + (" (tiny random model)" if info.tiny else "") + f"; configs loaded: {', '.join(loaded)}")]
    checks.append(check_tokenizer(model_dir))
    named = json.loads((model_dir / "scheduler" / "scheduler_config.json").read_text()).get("_class_name", "?")
    checks.append(Check("sampling", "OK", f"the folder names {named}; generation samples with CogVideoXDPMScheduler "
                        "from its config, as the authors do. Reweighting: the paper's motion bias by default; "
                        "reweight_scale=null (--no-reweight) runs as the authors' released script, without it"))
    checks.append(check_refadapter(model_dir, info, refadapter, fix))
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
    checks.extend(check_packages(args.model, args.memory_saving, args.ray))
    checks.extend(check_weights(args.model, args.refadapter))
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
    p = subparsers.add_parser("doctor", help="check torch and its CUDA build, packages, VRAM, disk, weights (configs, tokenizer, "
                              "RefAdapter), port and ffmpeg; print fixes",
                              description="Check this machine can run the backend. Exit status 1 when a check fails.")
    p.add_argument("--model", type=Path, default=default_weights_dir() / MODEL_FOLDER,
                   help="pipeline folder to check (default %(default)s, where `download` puts it)")
    p.add_argument("--data-dir", type=Path, default=DEFAULT_DATA_DIR, help="the backend's data dir (default %(default)s)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8765)
    p.add_argument("--memory-saving", action="store_true", help="you will serve with --memory-saving")
    p.add_argument("--ray", action="store_true", help="you will serve in studio mode (--ray): check Ray is installed")
    p.add_argument("--refadapter", type=Path, help="the RefAdapter you will pass to serve, if not in the model folder")
    p.set_defaults(func=run_doctor)
    return p
