"""`flexiact-backend bench gpu-check` (`make gpu-check`): every CUDA-only path, then the full size, on one GPU.

Why one command: a GPU is lent for minutes, so what needs one is prepared and tested here (`--dry-run` runs every
phase at a tiny size on whatever device there is) and run in one go when a GPU is there. First the CUDA-only
paths at a reduced size (memory-saving offload, fp8, compile, compile with the step cache; the step cache and the
attention backends as well), then generation and extraction steps at the full size with random weights (a dry
run uses the tiny model for both sizes: the same code, in seconds). Each
phase reports `ran` with its measurements, or `skipped` with the reason (no CUDA, no fp8 on this card, the time
budget). The JSON and the table go to `docs/benchmarks/`.

Phases are one list (`PHASES`); a new one (several GPUs, a new backend) is a `Phase` appended there, with a
`needs` that says why it cannot run on a given machine.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import diffusers
import torch

from ..parallel.launch import available_gpus
from .bench import bench_attention, run_mode, unsupported_reason
from .bench_parallel import multi_gpu_phases
from .full_size import FullSize

#: Planned on one H100 so the whole check stays under 8 minutes; a phase that would pass the budget is skipped.
REDUCED = FullSize(layers=4, frames=13, height=240, width=352)


@dataclass
class CheckContext:
    """What every phase reads: the device, the two sizes, steps and repeats, and whether this is a dry run."""

    device: torch.device
    dtype: torch.dtype
    reduced: FullSize
    full: FullSize
    steps: int
    repeats: int
    dry_run: bool
    attention_tokens: int


@dataclass(frozen=True)
class Phase:
    """One step of the check: `run(ctx)` returns its measurements; `needs(ctx)` says why it cannot run here (None:
    it can); `planned_s` is its expected time on one H100, for the budget."""

    name: str
    what: str
    run: Callable[[CheckContext], dict]
    needs: Callable[[CheckContext], str | None] = lambda ctx: None
    planned_s: float = 30.0


def _cuda(ctx: CheckContext) -> str | None:
    return None if ctx.device.type == "cuda" else "needs a CUDA GPU"


def _mode(mode: str, size_of: Callable[[CheckContext], FullSize], steps: int | None = None) -> Callable[[CheckContext], dict]:
    """A phase body measuring `bench full`'s phases of one mode at the context's reduced or full size."""
    def run(ctx: CheckContext) -> dict:
        return run_mode(mode, size_of(ctx), ctx.device, ctx.dtype, steps=steps or ctx.steps, repeats=ctx.repeats,
                        tiny=ctx.dry_run)

    return run


def _unsupported(mode: str) -> Callable[[CheckContext], str | None]:
    return lambda ctx: unsupported_reason(mode, ctx.device)


def _attention(ctx: CheckContext) -> dict:
    heads = 2 if ctx.dry_run else 48
    report = bench_attention(ctx.attention_tokens, heads, 64, 226, 226, ctx.dtype, ctx.device, ctx.repeats)
    return report["results"]


def _several_gpus(ctx: CheckContext) -> str | None:
    gpus = available_gpus()
    return None if gpus >= 2 else f"needs at least 2 CUDA GPUs; {gpus} here"


def _multi_gpu(ctx: CheckContext) -> dict:
    return multi_gpu_phases(repeats=ctx.repeats)["runs"]


def _reduced(ctx: CheckContext) -> FullSize:
    return ctx.reduced


def _full(ctx: CheckContext) -> FullSize:
    return ctx.full


#: The check, in order: CUDA-only paths at the reduced size first, then the full size.
PHASES: list[Phase] = [
    Phase("memory_saving", "model CPU offload (accelerate) at reduced size", _mode("memory_saving", _reduced),
          _unsupported("memory_saving"), 45),
    Phase("fp8", "torchao float8 transformer at reduced size", _mode("fp8", _reduced), _unsupported("fp8"), 40),
    Phase("compiled", "compiled transformer blocks at reduced size (warm-up included in build)",
          _mode("compiled", _reduced), _cuda, 80),
    Phase("compiled_step_cache", "compiled blocks with the TaylorSeer step cache at reduced size",
          _mode("compiled_step_cache", _reduced, steps=8), _cuda, 60),
    Phase("step_cache", "eager step cache at reduced size (8 steps: the cache acts after the bias window)",
          _mode("step_cache", _reduced, steps=8), planned_s=20),
    Phase("attention_backends", "biased attention, every backend against the dense mask", _attention, planned_s=20),
    Phase("full_size", "720x480x49, 42 layers: text encoding, steps, tiled VAE decode, request to mp4, extraction step",
          _mode("eager", _full), lambda ctx: None if ctx.dry_run else _cuda(ctx), 150),
    Phase("multi_gpu", "bench parallel (tiny model) on 2, 4 and 8 GPUs as present, each against 1 GPU",
          _multi_gpu, _several_gpus, 120),
]


@dataclass
class CheckReport:
    """Each phase's status, seconds and measurements, and the machine it ran on."""

    device: str
    gpu: str | None
    dry_run: bool
    budget_s: float
    phases: dict[str, dict] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"benchmark": "gpu-check", "device": self.device, "gpu": self.gpu, "dry_run": self.dry_run,
                "budget_s": self.budget_s, "date": time.strftime("%Y-%m-%d"),
                "versions": {"torch": torch.__version__, "cuda": torch.version.cuda, "diffusers": diffusers.__version__},
                "phases": self.phases}


def run_check(ctx: CheckContext, phases: list[Phase], budget_s: float) -> CheckReport:
    """Run `phases` in order; skip (with the reason) what cannot run here or would pass `budget_s`; a phase that
    fails is reported failed with its error and the check goes on."""
    gpu = torch.cuda.get_device_name(ctx.device) if ctx.device.type == "cuda" else None
    report = CheckReport(str(ctx.device), gpu, ctx.dry_run, budget_s)
    started = time.monotonic()
    for phase in phases:
        reason = phase.needs(ctx)
        elapsed = time.monotonic() - started
        if reason is None and not ctx.dry_run and elapsed + phase.planned_s > budget_s:
            reason = f"time budget: {elapsed:.0f} s used of {budget_s:.0f} s, this phase plans {phase.planned_s:.0f} s"
        entry: dict = {"what": phase.what}
        if reason:
            report.phases[phase.name] = {**entry, "status": "skipped", "reason": reason}
            print(f"gpu-check: {phase.name}: skipped ({reason})", file=sys.stderr, flush=True)
            continue
        print(f"gpu-check: {phase.name}", file=sys.stderr, flush=True)
        t0 = time.monotonic()
        try:
            results = phase.run(ctx)
            report.phases[phase.name] = {**entry, "status": "ran", "seconds": time.monotonic() - t0, "results": results}
        except Exception as e:  # one broken path must not hide the others' results
            report.phases[phase.name] = {**entry, "status": "failed", "seconds": time.monotonic() - t0,
                                         "error": f"{type(e).__name__}: {e}"}
            if ctx.device.type == "cuda":
                torch.cuda.empty_cache()
    return report


def format_check_table(report: dict) -> str:
    """One row per phase and measurement: status, seconds, median step time and peak memory where measured."""
    rows = [("phase", "status", "seconds", "median_s", "peak_bytes", "note")]
    for name, phase in report["phases"].items():
        note = phase.get("reason") or phase.get("error") or ""
        rows.append((name, phase["status"], f"{phase['seconds']:.1f}" if "seconds" in phase else "", "", "", note))
        for label, r in (phase.get("results") or {}).items():
            peak = r.get("max_memory_allocated", r.get("peak_extra_bytes", r.get("cpu_new_tensors_peak_bytes", "")))
            median = r.get("median_s")
            rows.append((f"  {label}", "", "", f"{median:.4g}" if isinstance(median, float) else "", str(peak), ""))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows)


def run_gpu_check(args: argparse.Namespace) -> int:
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    ctx = CheckContext(device, dtype, REDUCED, FullSize(),
                       steps=2 if args.dry_run else 4, repeats=1 if args.dry_run else 2, dry_run=args.dry_run,
                       attention_tokens=1024 if args.dry_run else 17_550 + 452)
    unknown = sorted(set(args.phases or ()) - {p.name for p in PHASES})
    if unknown:
        print(f"error: no phase {', '.join(unknown)}; the phases are {', '.join(p.name for p in PHASES)}", file=sys.stderr)
        return 2
    chosen = [p for p in PHASES if not args.phases or p.name in args.phases]
    report = run_check(ctx, chosen, args.budget_s).to_dict()
    table = format_check_table(report)
    print(table)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    slug = re.sub(r"[^a-z0-9]+", "-", (report["gpu"] or report["device"]).lower()).strip("-")
    stem = args.out_dir / f"gpu-check-{slug}{'-dry-run' if args.dry_run else ''}"
    stem.with_suffix(".json").write_text(json.dumps(report, indent=2))
    stem.with_suffix(".txt").write_text(table + "\n")
    print(f"wrote {stem.with_suffix('.json')} and {stem.with_suffix('.txt')}", file=sys.stderr)
    return 1 if any(p["status"] == "failed" for p in report["phases"].values()) else 0
