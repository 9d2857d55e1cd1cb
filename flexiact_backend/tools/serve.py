"""`flexiact-backend serve` and `flexiact-backend bench serve`; the main CLI wires these in."""

from __future__ import annotations

import argparse
import json
import logging
import os
from pathlib import Path

from ..requirements import require_cluster
from ..service.config import DEFAULT_DATA_DIR
from ..service.retention import RetentionPolicy



def add_serve_command(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register `serve` (sets `func=run_serve`)."""
    p = subparsers.add_parser("serve", help="run the HTTP service the Blender add-on talks to",
                              description="Run the FlexiAct HTTP service (OpenAPI schema at /openapi.json).")
    model = p.add_mutually_exclusive_group(required=True)
    model.add_argument("--model", type=Path, help="diffusers folder of CogVideoX-5B-I2V (with the RefAdapter)")
    model.add_argument("--tiny", action="store_true", help="the built-in tiny random model (built on first use)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind; off loopback a token is required")
    p.add_argument("--port", type=int, default=8765)
    p.add_argument("--data-dir", type=Path, default=DEFAULT_DATA_DIR, help="database, uploads, actions, results")
    p.add_argument("--token", default=os.environ.get("FLEXIACT_TOKEN") or None,
                   help="require 'Authorization: Bearer TOKEN' (default: $FLEXIACT_TOKEN)")
    p.add_argument("--device", action="append", default=[], help="compute device (repeat for several); "
                   "default: every CUDA device, else the CPU")
    p.add_argument("--memory-saving", action="store_true", help="offload idle sub-models to the CPU, tile the VAE")
    p.add_argument("--compile", action="store_true", help="torch.compile the transformer blocks, warmed up before "
                   "the first request (off by default: not yet measured faster on a GPU)")
    p.add_argument("--refadapter", type=Path, help="RefAdapter checkpoint if not inside the model folder")
    p.add_argument("--checkpoint-every", type=int, default=500, help="extraction checkpoint interval (steps)")
    _add_retention_args(p)
    p.add_argument("--min-free-mb", type=int, default=1024, help="refuse uploads and jobs (507) when the data "
                   "dir's disk has less free space than this (default 1024)")
    p.add_argument("--max-job-restarts", type=int, default=3, help="a job running when the service died is "
                   "retried this many times, then fails (so one bad input cannot crash-loop the service)")
    p.add_argument("--max-video-bytes", type=int, help="upload limit for videos (default 2 GiB)")
    p.add_argument("--max-image-bytes", type=int, help="upload limit for images (default 64 MiB)")
    p.add_argument("--max-checkpoint-bytes", type=int, help="upload limit for checkpoints (default 1 GiB)")
    p.add_argument("--max-image-pixels", type=int, help="largest image in pixels (default 50 megapixels)")
    p.add_argument("--max-video-pixels", type=int, help="largest video frame in pixels (default 8K UHD, 7680x4320)")
    p.add_argument("--max-video-seconds", type=int, help="longest video upload in seconds (default 3600)")
    p.add_argument("--max-video-frames", type=int, help="most frames in a video upload (default 216000)")
    p.add_argument("--max-sequence-pixels", type=int, help="all frames of an image sequence together, in pixels "
                   "(default 4147200000: 2000 frames of 1920x1080)")
    p.add_argument("--max-zip-entries", type=int, help="most entries of an uploaded zip (default 20000)")
    p.add_argument("--max-zip-unpacked-bytes", type=int, help="most bytes the frames of a zip unpack to (default 8 GiB)")
    p.add_argument("--max-uploads", type=int, help="uploads received and checked at once; past it a 503 with "
                   "Retry-After (default 8)")
    p.add_argument("--max-uploads-per-token", type=int, help="uploads at once per token (a client without a token "
                   "counts by its address); past it a 429 with Retry-After (default 4)")
    p.add_argument("--media-workers", type=int, help="threads probing and decoding uploads (default 2)")
    p.add_argument("--max-queued-jobs", type=int, help="jobs waiting in the queue; past it a 429 (default 500)")
    p.add_argument("--max-queued-per-token", type=int, help="jobs waiting in the queue per token; past it a 429 "
                   "(default 100)")
    p.add_argument("--allowed-host", action="append", default=[], metavar="NAME",
                   help="also answer requests for this Host name (repeat for several); by default only localhost, "
                   "127.0.0.1, [::1] and the --host address")
    p.add_argument("--public-docs", action="store_true", help="serve /openapi.json and /docs without the token")
    p.add_argument("--header-timeout", type=float, default=10.0, help="seconds a client may take to send a "
                   "request head")
    p.add_argument("--body-timeout", type=float, default=30.0, help="seconds a client may pause while sending "
                   "a request body")
    p.add_argument("--access-log", action="store_true", help="log every request")
    p.add_argument("--ray", metavar="ADDRESS", help="studio mode: run the workers as actors of the Ray cluster at "
                   "ADDRESS (host:port of its head), one per GPU; needs pip install -e '.[cluster]' in the FlexiAct clone")
    p.add_argument("--ray-workers", type=int, metavar="N", help="with --ray on a cluster without GPUs: N CPU workers")
    p.add_argument("--ray-allow-no-auth", action="store_true", help="with --ray: use a Ray cluster without token "
                   "authentication (refused otherwise: anyone who reaches its ports can run code on its machines)")
    p.set_defaults(func=run_serve)
    return p


def run_serve(args: argparse.Namespace) -> int:
    from ..service.auth import check_bind

    check_bind(args.host, args.token)  # before the slow imports: a refusal should be instant
    check_ray_args(args)
    if args.ray is None:
        check_serve_args(args)
    import uvicorn

    from ..service.app import create_app
    from ..service.config import Limits, ServiceConfig
    from ..service.protocol import timed_h11

    limits = Limits()
    overrides = {"video_bytes": args.max_video_bytes, "image_bytes": args.max_image_bytes,
                 "checkpoint_bytes": args.max_checkpoint_bytes, "image_pixels": args.max_image_pixels,
                 "video_pixels": args.max_video_pixels, "video_seconds": args.max_video_seconds,
                 "video_frames": args.max_video_frames, "sequence_pixels": args.max_sequence_pixels,
                 "zip_entries": args.max_zip_entries, "zip_unpacked_bytes": args.max_zip_unpacked_bytes,
                 "uploads": args.max_uploads, "uploads_per_token": args.max_uploads_per_token,
                 "media_workers": args.media_workers, "queued_jobs": args.max_queued_jobs,
                 "queued_jobs_per_token": args.max_queued_per_token}
    limits = Limits(**{**limits.__dict__, **{k: v for k, v in overrides.items() if v is not None}})
    config = ServiceConfig(data_dir=args.data_dir, model_dir=args.model, tiny=args.tiny, token=args.token,
                           limits=limits, devices=tuple(args.device), checkpoint_every=args.checkpoint_every,
                           max_job_restarts=args.max_job_restarts, host=args.host,
                           min_free_bytes=args.min_free_mb * 1024**2, retention=_retention(args),
                           allowed_hosts=tuple(args.allowed_host), public_docs=args.public_docs,
                           header_timeout_s=args.header_timeout, body_timeout_s=args.body_timeout,
                           ray_address=args.ray, ray_workers=args.ray_workers,
                           ray_allow_no_auth=args.ray_allow_no_auth, compile=args.compile)
    os.umask(0o077)  # the database, uploads and results are readable by the service's user only
    check_data_dir(args.data_dir)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    app = create_app(config, memory_saving=args.memory_saving, refadapter=args.refadapter)
    uvicorn.run(app, host=args.host, port=args.port, access_log=args.access_log, timeout_graceful_shutdown=5,
                http=timed_h11(config.header_timeout_s))
    return 0


def _add_retention_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--keep-results-days", type=float, default=30.0, help="finished generations and uploads no "
                   "action or recent job needs are removed after this many days (0: keep everything; default 30)")
    p.add_argument("--max-data-bytes", type=int, help="past this size of the data dir, the oldest files no action "
                   "or recent job needs are removed first (default: no cap)")


def _retention(args: argparse.Namespace) -> RetentionPolicy:
    return RetentionPolicy(keep_results_days=args.keep_results_days or None, max_data_bytes=args.max_data_bytes)


def add_gc_command(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register `gc` (sets `func=run_gc`)."""
    p = subparsers.add_parser("gc", help="remove what nothing needs from the data dir (also runs inside serve)",
                              description="Garbage collection and retention of the service's data dir: uploads "
                              "and results no action or recent job needs, orphaned files, stale work dirs.")
    p.add_argument("--data-dir", type=Path, default=DEFAULT_DATA_DIR)
    p.add_argument("--dry-run", action="store_true", help="only print what would be removed")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    _add_retention_args(p)
    p.set_defaults(func=run_gc)
    return p


def run_gc(args: argparse.Namespace) -> int:
    from ..service.retention import collect

    if not (args.data_dir / "state.sqlite3").is_file():
        raise SystemExit(f"{args.data_dir} is not a FlexiAct data dir (no state.sqlite3 in it)")
    report = collect(args.data_dir, _retention(args), dry_run=args.dry_run).report()
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    verb = "would free" if args.dry_run else "freed"
    for path in report["files"] + report["dirs"]:
        print(path)
    print(f"{verb} {report['freed_bytes'] / 1024**2:.1f} MiB: {len(report['files'])} files, {len(report['dirs'])} "
          f"work dirs, {len(report['jobs'])} old jobs, {len(report['file_records'])} file records "
          f"(data dir was {report['data_bytes_before'] / 1024**2:.1f} MiB)")
    return 0


def check_data_dir(data_dir: Path) -> None:
    """Refuse to start, with one clear line, when the data dir cannot be created or written."""
    probe = data_dir / f".write-test-{os.getpid()}"
    try:
        data_dir.mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise SystemExit(f"cannot write to the data dir {data_dir} ({exc.strerror}): the service keeps its database, "
                         "uploads and results there. Choose a writable --data-dir (or $FLEXIACT_DATA_DIR) or fix "
                         "its permissions.") from None


def check_ray_args(args: argparse.Namespace) -> None:
    """Refuse a studio-mode command line that cannot work, before anything loads."""
    if args.ray is None:
        if args.ray_workers is not None or args.ray_allow_no_auth:
            flag = "--ray-workers" if args.ray_workers is not None else "--ray-allow-no-auth"
            raise SystemExit(f"{flag} needs --ray ADDRESS (the Ray cluster to start the workers on)")
        return
    if args.device:
        raise SystemExit("--device chooses local devices; with --ray every GPU of the cluster gets a worker")
    if args.ray_workers is not None and args.ray_workers < 1:
        raise SystemExit(f"--ray-workers must be at least 1, not {args.ray_workers}")
    require_cluster()
    from ..service.cluster import OPEN_CLUSTER_MESSAGE, cluster_auth

    if not args.ray_allow_no_auth and cluster_auth(args.ray) == "open":  # unreachable now: checked on connecting
        raise SystemExit(f"refusing to start: {OPEN_CLUSTER_MESSAGE.format(address=args.ray)}")


def check_serve_args(args: argparse.Namespace) -> None:
    """Refuse, before the service starts, what loading the model would trip on: the tokenizer's packages, and
    memory saving without a CUDA GPU or accelerate."""
    import torch

    from ..requirements import require_memory_saving, require_tokenizer_packages
    from ..service.runner import resolve_devices

    if args.model is not None:
        require_tokenizer_packages(args.model)
    if args.memory_saving:
        for device in resolve_devices(tuple(args.device)):
            require_memory_saving(torch.device(device))


def add_bench_serve(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register `serve` under `bench` (sets `func=run_bench_serve`)."""
    p = subparsers.add_parser("serve", help="poll latency with concurrent clients while a job runs",
                              description="Clients poll a running job and upload images; prints p50/p95 latencies.")
    p.add_argument("--url", help="a running server (default: start a tiny one in a temp dir)")
    p.add_argument("--token", default=os.environ.get("FLEXIACT_TOKEN") or None)
    p.add_argument("--clients", type=int, default=20)
    p.add_argument("--rounds", type=int, default=50, help="polls per client")
    p.add_argument("--upload-every", type=int, default=5, help="each client uploads an image every N polls")
    p.add_argument("--queued", type=int, default=200, help="generations queued for the memory measurement")
    p.add_argument("--pollers", type=int, default=30, help="clients polling the queued jobs")
    p.add_argument("--json", type=Path, help="also write the JSON report here")
    p.add_argument("--ray", nargs="?", const="local", metavar="ADDRESS",
                   help="instead: throughput of a queue of tiny jobs with 1 worker vs --ray-workers, on the Ray "
                        "cluster at ADDRESS (default: a local one-node cluster started for the purpose)")
    p.add_argument("--ray-workers", type=int, default=2, metavar="N", help="workers of the --ray variant (default 2)")
    p.add_argument("--jobs", type=int, default=8, help="--ray: generations in the queue (default 8)")
    p.add_argument("--steps", type=int, default=4, help="--ray: denoising steps per generation (default 4)")
    p.set_defaults(func=run_bench_serve)
    return p


def run_bench_serve(args: argparse.Namespace) -> int:
    from .serve_bench import bench_cluster, bench_serve, format_cluster_table, format_table

    if args.ray is not None:
        require_cluster()
        report = bench_cluster(address=None if args.ray == "local" else args.ray, workers=args.ray_workers,
                               jobs=args.jobs, steps=args.steps)
        _print_report(report, format_cluster_table(report), args.json)
        return 0
    report = bench_serve(url=args.url, token=args.token, clients=args.clients, rounds=args.rounds,
                         upload_every=args.upload_every, queued=args.queued, pollers=args.pollers)
    _print_report(report, format_table(report), args.json)
    return 0 if report["errors"] == 0 and report["queue"]["errors"] == 0 else 1


def add_bench_hostile(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register `hostile` under `bench` (sets `func=run_bench_hostile`)."""
    p = subparsers.add_parser("hostile", help="what each crafted hostile upload costs a tiny server (RSS, health "
                              "latency)", description="Sends small crafted uploads (zip, image and video bombs) to a "
                              "fresh tiny server one at a time while polling /v1/health; prints each answer, its "
                              "time, the server's peak RSS rise and the slowest health answer.")
    p.add_argument("--json", type=Path, help="also write the JSON report here")
    p.set_defaults(func=run_bench_hostile)
    return p


def run_bench_hostile(args: argparse.Namespace) -> int:
    from .hostile_bench import bench_hostile, format_table

    report = bench_hostile()
    _print_report(report, format_table(report), args.json)
    return 0


def _print_report(report: dict, table: str, json_path: Path | None) -> None:
    text = json.dumps(report, indent=2)
    print(text)
    print(table)
    if json_path:
        json_path.write_text(text)
