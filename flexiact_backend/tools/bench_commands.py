"""The `bench` subcommands' arguments, apart from the benchmarks themselves: building the CLI's parser (and so
`--help`) loads no torch; the benchmark module is imported when one runs."""

from __future__ import annotations

import argparse
from pathlib import Path

from .model_args import add_model_args

#: The `bench full` modes, in the order they run.
FULL_MODES = ("eager", "compiled", "compiled_step_cache", "memory_saving", "fp8")


#: The GPU check's time budget: phases that would pass it are skipped (one lent GPU session, 8 minutes in all).
GPU_CHECK_BUDGET_S = 420.0


def run_gpu_check(args: argparse.Namespace) -> int:
    from .gpu_check import run_gpu_check as run

    return run(args)


def add_gpu_check_command(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("gpu-check", help="every CUDA-only path at reduced size, then full-size steps (make gpu-check)",
                       description="Every CUDA-only path at a reduced size, then generation and extraction steps at "
                                   "the full size with random weights; each phase ran or skipped with the reason. "
                                   "JSON and a table go to --out-dir.")
    p.add_argument("--device", help="default: cuda if available, else cpu")
    p.add_argument("--dry-run", action="store_true", help="every phase on the tiny model (tests the check on a CPU)")
    p.add_argument("--budget-s", type=float, default=GPU_CHECK_BUDGET_S, help="skip phases that would pass this")
    p.add_argument("--phases", nargs="+", metavar="PHASE", help="only these phases (an unknown name lists them)")
    p.add_argument("--out-dir", type=Path, default=Path("docs/benchmarks"), help="where the JSON and table go")
    p.set_defaults(func=run_gpu_check)


def run_benchmarks(args: argparse.Namespace) -> int:
    from .bench import run_benchmarks as run

    return run(args)


def add_bench_commands(sub: argparse._SubParsersAction) -> None:

    p = sub.add_parser("attention", help="exact biased attention vs the published dense mask")
    p.add_argument("--tokens", type=int, default=4096, help="sequence length L (17,550 + 452 at full size)")
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--motion", type=int, default=226)
    p.add_argument("--text", type=int, default=226)
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32")
    p.add_argument("--device")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--json", type=Path)
    p.set_defaults(func=run_benchmarks)
    p = sub.add_parser("media", help="probe and trim-decode time at the start and the end of a long clip")
    p.add_argument("--width", type=int, default=3840)
    p.add_argument("--height", type=int, default=2160)
    p.add_argument("--fps", type=int, default=30)
    p.add_argument("--seconds", type=int, default=10)
    p.add_argument("--frames", type=int, default=49, help="frames the trim is resampled to")
    p.add_argument("--max-side", type=int, default=720, help="largest side decoded frames are scaled to")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--json", type=Path)
    p.set_defaults(func=run_benchmarks)
    for name, helptext in (("extract", "training step: cached latents vs re-encoding each step; preview share"),
                           ("generate", "transformer step: LoRA folded vs unfolded, bias on/off")):
        p = sub.add_parser(name, help=helptext)
        add_model_args(p)
        p.add_argument("--steps", type=int, default=10, help="timed repeats")
        p.add_argument("--json", type=Path)
        p.set_defaults(func=run_benchmarks)
        if name == "extract":
            p.add_argument("--preview-every", type=int, default=500, help="steps between previews (the default "
                           "checkpoint interval) for the share of the extraction")
            p.add_argument("--extraction-steps", type=int, default=3000, help="the extraction the share is of")
            p.add_argument("--preview-repeats", type=int, default=3, help="timed previews")
    p = sub.add_parser("full", help="CogVideoX-5B-I2V size with random weights: every phase and mode (or --estimate)")
    p.add_argument("--device", help="default: cuda if available, else cpu")
    p.add_argument("--estimate", action="store_true", help="memory and FLOPs on fake tensors on the CPU (no GPU needed)")
    p.add_argument("--tflops", type=float, default=800.0, help="sustained throughput the estimate's times assume")
    p.add_argument("--layers", type=int, default=42)
    p.add_argument("--frames", type=int, default=49)
    p.add_argument("--height", type=int, default=480)
    p.add_argument("--width", type=int, default=720)
    p.add_argument("--steps", type=int, default=50, help="denoising steps of the request->mp4 run")
    p.add_argument("--repeats", type=int, default=3, help="timed repeats of each phase")
    p.add_argument("--modes", nargs="+", choices=FULL_MODES, default=list(FULL_MODES))
    p.add_argument("--json", type=Path)
    p.set_defaults(func=run_benchmarks)
    p = sub.add_parser("takes", help="N takes batched on the device vs one after another")
    add_model_args(p)
    p.add_argument("--takes", type=int, default=4)
    p.add_argument("--denoise-steps", type=int, default=10, help="denoising steps of each take")
    p.add_argument("--steps", type=int, default=2, help="timed repeats")
    p.add_argument("--json", type=Path)
    p.set_defaults(func=run_benchmarks)
    add_bench_parallel(sub).set_defaults(func=run_benchmarks)
    add_bench_windows(sub).set_defaults(func=run_benchmarks)


def add_bench_parallel(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser("parallel", help="1 rank against N ranks on the same generation, VAE decode and "
                                        "extraction steps")
    add_model_args(p)
    p.add_argument("--gpus", type=int, default=2, help="ranks of the parallel run (CPU ranks over gloo without GPUs)")
    p.add_argument("--denoise-steps", type=int, default=4, help="denoising steps of the timed generation")
    p.add_argument("--repeats", type=int, default=3, help="timed repeats of each piece of work")
    p.add_argument("--json", type=Path)
    return p


def add_bench_windows(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser("windows", help="loss per step against windows per step (what data-parallel GPUs buy)")
    add_model_args(p)
    p.add_argument("--windows", type=int, nargs="+", default=[1, 2, 4, 8], help="windows per step to compare")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--eval-every", type=int, default=25)
    p.add_argument("--eval-draws", type=int, default=32, help="held-out draws the loss is measured on")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path)
    return p
