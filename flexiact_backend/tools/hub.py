"""`flexiact-backend download`: fetch CogVideoX-5B-I2V and the FlexiAct checkpoints from the Hugging Face hub.

Layout written (DIR defaults to the service's data dir + /weights):
  DIR/CogVideoX-5b-I2V/                         the diffusers pipeline, with the RefAdapter placed at its root
  DIR/CogVideoX-5b-I2V/refnetlora_step40000_model.pt   (found there by `FlexiActGenerator.from_pretrained`)
  DIR/actions/...                               the published FAE actions (.pt), as laid out in the hub repo
Re-running resumes: the hub client skips complete files and continues partial ones.
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import sys
from pathlib import Path
from urllib.parse import urlparse

from ..errors import FlexiActError
from ..model_info import REAL_MODEL_ID, REFADAPTER_FILES
from ..service.config import DEFAULT_DATA_DIR

FLEXIACT_REPO = "shiyi0408/FlexiAct"
REFADAPTER_NAME = REFADAPTER_FILES[1]  # the published file name
MODEL_FOLDER = REAL_MODEL_ID.split("/")[1]
LICENSE_NAME = "CogVideoX License"
LICENSE_URL = f"https://huggingface.co/{REAL_MODEL_ID}/blob/main/LICENSE"
#: CogVideoX-5B-I2V (about 20 GB) + RefAdapter + the published actions, with some margin.
REQUIRED_BYTES = 25 * 10**9
CONNECT_TIMEOUT_S = 5.0
INSTALL_HINT = "pip install 'flexiact-backend[download]'"


def default_weights_dir() -> Path:
    return DEFAULT_DATA_DIR / "weights"


def _hub_api():
    """The huggingface_hub module, imported only when a download is asked for (it is an optional extra)."""
    try:
        import huggingface_hub
    except ImportError as e:
        raise FlexiActError(f"the download needs huggingface_hub: {INSTALL_HINT}") from e
    return huggingface_hub


def _folder_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path.is_dir() else 0


def check_disk(directory: Path, required: int = REQUIRED_BYTES) -> int:
    """Free bytes where `directory` will live; refuse when less than what is still missing is free."""
    existing = directory
    while not existing.exists():
        existing = existing.parent
    free = shutil.disk_usage(existing).free
    missing = max(0, required - _folder_bytes(directory))
    if free < missing:
        raise FlexiActError(f"not enough free disk in {existing}: {free / 1e9:.1f} GB free, about "
                            f"{missing / 1e9:.1f} GB still to download; free some space or pass --dir elsewhere")
    return free


def check_network(endpoint: str | None = None, timeout_s: float = CONNECT_TIMEOUT_S) -> None:
    """Fail at once, with the reason, when the hub cannot be reached (instead of retrying for minutes)."""
    if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on"):
        raise FlexiActError("HF_HUB_OFFLINE is set: unset it to download")
    url = urlparse(endpoint or os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    host, port = url.hostname or "huggingface.co", url.port or (443 if url.scheme == "https" else 80)
    try:
        socket.create_connection((host, port), timeout=timeout_s).close()
    except OSError as e:
        raise FlexiActError(f"cannot reach {host}:{port} ({e}); check the network or proxy (HTTPS_PROXY), "
                            "or download on another machine and copy the folder with --dir") from e


def confirm_license(accepted: bool) -> None:
    """Show the CogVideoX weights' licence; go on only with --accept-license or an interactive yes."""
    print(f"The CogVideoX-5B-I2V weights ({REAL_MODEL_ID}) are released under the {LICENSE_NAME}, not Apache-2.0:\n"
          f"  {LICENSE_URL}\nRead it before using the weights.", file=sys.stderr)
    if accepted:
        return
    if not sys.stdin.isatty():
        raise FlexiActError("pass --accept-license to accept the CogVideoX License (no terminal to ask on)")
    if input("Accept the CogVideoX License and download? [y/N] ").strip().lower() not in ("y", "yes"):
        raise FlexiActError("licence not accepted: nothing downloaded")


def download(directory: Path, *, accept_license: bool = False) -> Path:
    """Download everything into `directory`; returns the model folder to pass to `serve --model`."""
    directory = Path(directory).expanduser()
    hub = _hub_api()
    check_disk(directory)
    check_network()
    confirm_license(accept_license)
    model_dir = directory / MODEL_FOLDER
    actions_dir = directory / "actions"
    print(f"[1/3] {REAL_MODEL_ID} -> {model_dir}", file=sys.stderr)
    hub.snapshot_download(REAL_MODEL_ID, local_dir=model_dir)
    files = hub.list_repo_files(FLEXIACT_REPO)
    refadapter = next((f for f in files if Path(f).name == REFADAPTER_NAME), None)
    if refadapter is None:
        raise FlexiActError(f"{FLEXIACT_REPO} no longer holds {REFADAPTER_NAME}; files there: {', '.join(files)}")
    target = model_dir / REFADAPTER_NAME
    print(f"[2/3] RefAdapter {FLEXIACT_REPO}/{refadapter} -> {target}", file=sys.stderr)
    if not target.is_file():
        fetched = Path(hub.hf_hub_download(FLEXIACT_REPO, refadapter, local_dir=model_dir))
        if fetched != target:
            os.replace(fetched, target)
    actions = [f for f in files if f.endswith(".pt") and f != refadapter]
    print(f"[3/3] {len(actions)} published actions -> {actions_dir}", file=sys.stderr)
    if actions:
        hub.snapshot_download(FLEXIACT_REPO, allow_patterns=actions, local_dir=actions_dir)
    return model_dir


def run_download(args: argparse.Namespace) -> int:
    model_dir = download(args.dir, accept_license=args.accept_license)
    print(f"done: serve it with  flexiact-backend serve --model {model_dir}\n"
          f"published actions (import with `flexiact-backend import-action`): {Path(args.dir) / 'actions'}")
    return 0


def add_download_command(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register `download` (sets `func=run_download`)."""
    p = subparsers.add_parser("download", help="fetch CogVideoX-5B-I2V and the FlexiAct checkpoints (about 25 GB)",
                              description=f"Download {REAL_MODEL_ID} and the RefAdapter and published actions of "
                                          f"{FLEXIACT_REPO} with huggingface_hub ({INSTALL_HINT}). Resumable.")
    p.add_argument("--dir", type=Path, default=default_weights_dir(), help="where to put the weights (default %(default)s)")
    p.add_argument("--accept-license", action="store_true", help=f"accept the {LICENSE_NAME} ({LICENSE_URL})")
    p.set_defaults(func=run_download)
    return p
