"""`flexiact-backend`: build the tiny model, generate, extract and import actions, serve, benchmark."""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from tqdm import tqdm

from .bench_commands import add_bench_commands, add_gpu_check_command
from .doctor import add_doctor_command
from ..errors import FlexiActError
from ..presets import GENERATION_DEFAULTS, PRESETS
from ..options import EXTRACTION_MODES, TEMPOS
from .hub import add_download_command
from .model_args import add_model_args, load_generator
from .serve import add_bench_hostile, add_bench_serve, add_gc_command, add_serve_command


def run_make_tiny_model(args: argparse.Namespace) -> int:
    from ..tiny import make_tiny_model

    print(make_tiny_model(args.dir, seed=args.seed))
    return 0


def _check_paths(args: argparse.Namespace) -> None:
    """Mistakes in the file arguments, reported before the model takes a minute to load."""
    action = getattr(args, "action", None)
    if action is not None and not Path(action).is_file():
        raise FlexiActError(f"--action {action}: no such file; check the path.")
    if not Path(args.out).parent.is_dir():
        raise FlexiActError(f"--out {args.out}: the folder {Path(args.out).parent} does not exist; create it first.")


def _transition(text: str) -> float:
    """--transition as the schedule defines it (0.7-1), refused by argparse before anything loads."""
    from ..model.schedule import BadTransition, check_transition

    try:
        return check_transition(float(text))
    except (ValueError, BadTransition) as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _on_gpus(args: argparse.Namespace, rank_fn) -> int:
    """Run `rank_fn(device, args)` on `--gpus` ranks of this machine (CPU ranks over gloo where it has no GPU)."""
    from ..parallel.launch import available_gpus, run_ranks
    from ..tiny import ensure_tiny_model

    gpus = available_gpus()
    if gpus and args.gpus > gpus:
        raise FlexiActError(f"--gpus {args.gpus}: this machine has {gpus} GPUs; give at most {gpus}.")
    if not gpus:
        print(f"no GPU here: running {args.gpus} CPU ranks over gloo (slow; for parity checks and tests)", file=sys.stderr)
    if args.device:
        raise FlexiActError("--device names one device; with --gpus N each rank takes its own GPU, so leave it out.")
    args.model = args.model or ensure_tiny_model(Path(tempfile.gettempdir()) / "flexiact-tiny")  # built once, not per rank
    return run_ranks(rank_fn, args.gpus, (args,))[0]


def _rank_generator(device, args: argparse.Namespace):
    """This rank's generator and its place in the job's mesh."""
    args.device = str(device)
    return load_generator(args)


def run_generate(args: argparse.Namespace) -> int:
    _check_paths(args)
    if args.gpus > 1:
        return _on_gpus(args, generate_on_rank)
    return _generate(load_generator(args), args)


def generate_on_rank(device, args: argparse.Namespace) -> int:
    """One rank of `generate --gpus N`: guidance branches on two ranks where N is even, Ulysses over the rest."""
    import torch.distributed as dist

    from ..parallel.sequence_parallel import parallel_generation

    generator = _rank_generator(device, args)
    with parallel_generation(generator.pipe, args.gpus, args.guidance):
        return _generate(generator, args, leader=dist.get_rank() == 0)


def _generate(generator, args: argparse.Namespace, leader: bool = True) -> int:
    from ..media import open_image

    image = open_image(args.image)
    with tqdm(total=args.steps, desc="generate", unit="step", file=sys.stderr, disable=not leader) as bar:
        result = generator.generate(
            image, args.prompt, action=args.action, seed=args.seed, steps=args.steps, guidance_scale=args.guidance,
            lora_weight=0.0 if args.no_refadapter else args.lora_weight, reweight_scale=None if args.no_reweight else args.reweight_scale,
            transition=args.transition, fit=args.fit, tempo=args.tempo, step_cache=args.step_cache,
            progress=lambda step, total, elapsed: bar.update(step - bar.n),
        )
    if not leader:
        return 0
    path = result.write_mp4(args.out, fps=args.fps)
    ran = result.settings
    refadapter = f"RefAdapter {ran.refadapter} at {ran.lora_weight:g}" if ran.refadapter else "no RefAdapter"
    print(f"wrote {path} ({len(result.frames)} frames made at {result.fps:g} fps, playing {result.duration_s:.3f} s at "
          f"{args.fps or result.fps:g} fps) in {result.seconds:.1f}s; {refadapter}")
    return 0


def _reference_clip(args: argparse.Namespace, work_dir: Path) -> Path:
    """The reference as a clip, its trim checked, before the model loads. An image sequence (a folder or a
    pattern such as shot_####.png) is written once to a lossless clip at --fps in the work dir."""
    from ..media import check_trim, probe_video
    from ..sequences import encode_sequence, looks_like_sequence

    video = Path(args.video)
    if looks_like_sequence(video):
        if args.fps is None:
            raise FlexiActError(f"--video {video} is an image sequence: give the frame rate it was rendered at "
                                "with --fps (e.g. --fps 24).")
        work_dir.mkdir(parents=True, exist_ok=True)
        video = work_dir / "reference.avi"
        encode_sequence(args.video, args.fps, video)
    elif args.fps is not None:
        raise FlexiActError("--fps is the frame rate of an image sequence; a video file has its own.")
    check_trim(probe_video(video), args.start, args.end)
    return video


def run_extract(args: argparse.Namespace) -> int:
    out = Path(args.out)
    _check_paths(args)
    args.work_dir = args.work_dir or out.with_name(out.name + ".work")
    if not args.resume and (args.work_dir / "checkpoint.pt").exists():
        raise FlexiActError(f"{args.work_dir} holds a checkpoint of an earlier run: pass --resume to continue it, or remove it")
    args.video = _reference_clip(args, args.work_dir)
    if args.windows_per_step is None:  # data mode: one window per rank, the authors' N-GPU semantics
        args.windows_per_step = args.gpus if args.parallel == "data" else 1
    if args.gpus > 1:
        return _on_gpus(args, extract_on_rank)
    return _extract(load_generator(args), args)


def extract_on_rank(device, args: argparse.Namespace) -> int:
    """One rank of `extract --gpus N`, in the `--parallel` mode."""
    from ..parallel.extraction import extraction_ranks_for

    generator = _rank_generator(device, args)
    return _extract(generator, args, extraction_ranks_for(args.gpus, args.parallel))


def _extract(generator, args: argparse.Namespace, ranks=None) -> int:
    from ..extraction import extract_action
    from ..generation import GenerationResult

    steps = args.steps or PRESETS[args.preset]
    out = Path(args.out)
    leader = ranks is None or ranks.leader
    with tqdm(total=steps, desc="extract", unit="step", file=sys.stderr, disable=not leader) as bar:
        def progress(update: dict) -> None:
            if update.get("phase") and update["phase"] != bar.desc:  # decoding, encoding, training, saving
                bar.set_description(update["phase"])
            if "step" in update:
                bar.update(update["step"] - bar.n)
                if update.get("loss") is not None:
                    bar.set_postfix(loss=f"{update['loss']:.4f}")

        previews = out.with_name(out.name + ".previews")

        def preview(step: int, result: GenerationResult) -> None:
            previews.mkdir(parents=True, exist_ok=True)
            bar.write(f"preview at step {step}: {result.write_mp4(previews / f'step_{step:06d}.mp4')}")

        meta = extract_action(generator, video=args.video, start_s=args.start, end_s=args.end, caption=args.caption,
                              name=args.name or out.stem, out=out, work_dir=args.work_dir, steps=steps, seed=args.seed,
                              checkpoint_every=args.checkpoint_every, progress=progress, preview=preview,
                              preview_every=args.preview_every, windows_per_step=args.windows_per_step, ranks=ranks)
    if not leader:
        return 0
    last = f"last step's loss {meta['losses'][-1]:.4f}, " if meta.get("losses") else ""
    print(f"wrote {out} after {meta['steps']} steps, {last}mean loss of the last fifth {meta['final_loss']:.4f}")
    return 0


def run_import_action(args: argparse.Namespace) -> int:
    from ..actions import import_published_action

    meta = import_published_action(args.file, name=args.name, caption=args.caption, out=args.out)
    print(f"wrote {args.out}: {meta['num_layers']} layers x {meta['num_motion_tokens']} tokens x {meta['width']}")
    return 0


def run_bench(args: argparse.Namespace) -> int:
    from .bench import run_benchmarks

    return run_benchmarks(args)


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is not a number of GPUs: give 1 or more")
    return value


def add_gpus_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--gpus", type=_positive, default=1,
                   help="GPUs of this machine one job runs on (without GPUs: that many CPU ranks over gloo, for tests)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="flexiact-backend", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("make-tiny-model", help="write the random-weight tiny CogVideoX-I2V pipeline (offline)")
    p.add_argument("dir", type=Path)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=run_make_tiny_model)

    p = sub.add_parser("generate", help="generate a video of the target image performing an action")
    add_model_args(p)
    p.add_argument("--action", type=Path, help="action file (.safetensors) or published FAE .pt")
    p.add_argument("--image", type=Path, required=True, help="target frame (PNG/JPEG)")
    p.add_argument("--prompt", required=True)
    p.add_argument("--out", type=Path, required=True, help="mp4 to write")
    p.add_argument("--steps", type=int, default=GENERATION_DEFAULTS.steps)
    p.add_argument("--seed", type=int, default=GENERATION_DEFAULTS.seed)
    p.add_argument("--guidance", type=float, default=GENERATION_DEFAULTS.guidance_scale)
    p.add_argument("--lora-weight", type=float, default=GENERATION_DEFAULTS.lora_weight,
                   help="RefAdapter weight")
    p.add_argument("--no-refadapter", action="store_true",
                   help="generate without the RefAdapter on purpose (weight 0); a real model without one refuses otherwise")
    p.add_argument("--reweight-scale", type=float, default=GENERATION_DEFAULTS.reweight_scale,
                   help="motion strength: bias on motion tokens at high timesteps (the paper's reweighting)")
    p.add_argument("--no-reweight", action="store_true",
                   help="no frequency-aware reweighting, as the authors' released inference script runs")
    p.add_argument("--transition", type=_transition, default=GENERATION_DEFAULTS.transition,
                   help="fraction of 1000 where the bias starts to decay, from 0.7 to 1 (default %(default)s)")
    p.add_argument("--fit", choices=("crop", "pad"), default="crop")
    p.add_argument("--fps", type=float, help="frame rate of the mp4 (its duration does not depend on it)")
    p.add_argument("--tempo", choices=TEMPOS, default="reference",
                   help="reference: the clip lasts as long as the action's motion did in its reference; "
                        "model: the model's clip length (every generated frame once at the model's fps)")
    p.add_argument("--step-cache", action="store_true", help="reuse transformer work after the reweight window (TaylorSeer)")
    add_gpus_arg(p)
    p.set_defaults(func=run_generate)

    p = sub.add_parser("extract", help="train an action (FAE motion tokens) on a reference clip")
    add_model_args(p)
    p.add_argument("--video", type=Path, required=True,
                   help="reference clip, or an image sequence: a folder of numbered frames or a pattern such as "
                        "shot_####.png (PNG, JPEG, TIFF, EXR)")
    p.add_argument("--fps", type=float, help="frame rate of an image sequence")
    p.add_argument("--start", type=float, default=0.0, help="trim start (s)")
    p.add_argument("--end", type=float, required=True, help="trim end (s)")
    p.add_argument("--caption", required=True)
    p.add_argument("--name")
    p.add_argument("--preset", choices=sorted(PRESETS), default="standard")
    p.add_argument("--steps", type=int, help="training steps (overrides --preset)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--checkpoint-every", type=int, default=500)
    p.add_argument("--work-dir", type=Path, help="checkpoints and cached latents (default OUT.work)")
    p.add_argument("--resume", action="store_true", help="continue from the checkpoint in the work dir")
    p.add_argument("--preview-every", type=int, default=0,
                   help="write a short preview mp4 every N steps to OUT.previews/ (default 0: none)")
    p.add_argument("--out", type=Path, required=True, help="action .safetensors to write")
    add_gpus_arg(p)
    p.add_argument("--parallel", choices=EXTRACTION_MODES, default="sequence",
                   help="with --gpus N: 'sequence' shards each step's tokens (one GPU's result, faster steps); "
                        "'data' trains N windows per step, one per GPU (the authors' multi-GPU run)")
    p.add_argument("--windows-per-step", type=int,
                   help="windows averaged per step (default 1; N in --parallel data); equal values give equal results "
                        "on any number of GPUs")
    p.set_defaults(func=run_extract)

    p = sub.add_parser("import-action", help="convert a published FAE .pt into an action file")
    p.add_argument("file", type=Path)
    p.add_argument("--name", required=True)
    p.add_argument("--caption", required=True)
    p.add_argument("--out", type=Path, required=True)
    p.set_defaults(func=run_import_action)

    add_serve_command(sub)
    add_gc_command(sub)
    add_download_command(sub)
    add_doctor_command(sub)

    bench = sub.add_parser("bench", help="benchmarks: JSON and a table")
    bench_sub = bench.add_subparsers(dest="bench", required=True)
    add_bench_commands(bench_sub)
    add_bench_serve(bench_sub)
    add_bench_hostile(bench_sub)
    add_gpu_check_command(bench_sub)
    return parser



def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except FlexiActError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # a file that cannot be read or written: the user's to fix, so no traceback
        print(f"error: {e.strerror or e}: {e.filename or ''}".rstrip(": "), file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
