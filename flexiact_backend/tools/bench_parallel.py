"""`flexiact-backend bench parallel`: the same generation, VAE decode and extraction steps on 1 rank and on N,
in one run.

Both runs go through the same launcher (one rank, then N ranks; CPU ranks share the cores between them), so the
ratio is what N ranks buy on this machine. Without GPUs the N ranks are CPU processes over gloo: the numbers show
the overhead of the collectives, not what GPUs gain (`bench full --estimate` gives the N-GPU column for that).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image

from ..parallel.launch import available_gpus, run_ranks
from ..parallel.util import ParallelConfig, build_mesh
from .model_args import load_generator


def _time(fn: Callable[[], object], repeats: int, device: torch.device) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        dist.barrier()
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        dist.barrier()  # the job's time: the slowest rank's
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _generation_configs(world: int, heads: int) -> dict[str, ParallelConfig]:
    if world == 1:
        return {"1 rank": ParallelConfig()}
    configs = {f"cfg 2 x ulysses {world // 2}": ParallelConfig(cfg=2, ulysses=world // 2)} if world % 2 == 0 else {}
    configs[f"ulysses {world}"] = ParallelConfig(ulysses=world)
    return {k: c for k, c in configs.items() if heads % c.ulysses == 0}


def bench_rank(device: torch.device, args: argparse.Namespace) -> dict:
    """Every timing of one world size, measured on each rank together (rank 0's numbers are reported)."""
    from ..extraction import ExtractionConfig, prepare_training_data
    from ..media import write_mp4
    from ..parallel.extraction import extraction_ranks
    from ..parallel.sequence_parallel import parallelize

    args.device = str(device)
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    generator = load_generator(args)
    info, world = generator.info, dist.get_world_size()
    heads = generator.pipe.transformer.config.num_attention_heads
    y, x = np.mgrid[0 : info.height, 0 : info.width]
    image = Image.fromarray(np.stack([x * 255 // info.width, y * 255 // info.height, (x // 16 + y // 16) % 2 * 255], -1).astype(np.uint8))
    results: dict[str, dict] = {}
    for label, config in _generation_configs(world, heads).items():
        with parallelize(generator.pipe.transformer, build_mesh(config)):
            seconds = _time(lambda: generator.generate(image, "a figure waves", steps=args.denoise_steps), args.repeats, device)
        results[f"generate, {label}"] = {"work": "generation", "median_s": seconds, "s_per_step": seconds / args.denoise_steps}

    results.update(_bench_decode(generator, world, args.repeats, device))

    frames = np.zeros((info.frames * 2, info.height, info.width, 3), np.uint8)
    for i in range(len(frames)):
        frames[i, info.height // 3 : 2 * info.height // 3, i * info.width // (2 * len(frames)) :][:, : info.width // 4] = 255
    clip = Path(args.work_dir) / "clip.mp4"
    modes = {"1 rank": ParallelConfig()} if world == 1 else {f"sequence x{world}": ParallelConfig(ulysses=world),
                                                            f"data x{world}": ParallelConfig(data=world)}
    for label, config in modes.items():
        if heads % config.ulysses:
            continue
        ranks = extraction_ranks(build_mesh(config))
        if ranks.leader and not clip.exists():
            write_mp4(clip, frames, info.fps)
        data = ranks.leader_first(lambda: prepare_training_data(
            generator, video=clip, clip_sha256="bench", start_s=0.0, end_s=len(frames) / info.fps, caption="a block slides",
            seed=0, num_crops=2, windows_per_crop=2, cache_dir=Path(args.work_dir))[0])
        windows = world if config.data > 1 else 1
        trainer = ranks.trainer(generator, data, ExtractionConfig(windows_per_step=windows))
        for p in trainer.params:
            p.requires_grad_(True)
        generator.pipe.transformer.enable_gradient_checkpointing()
        with ranks.training(generator):
            seconds = _time(trainer.train_step, args.repeats, device)
        generator.pipe.transformer.disable_gradient_checkpointing()
        for p in trainer.params:
            p.requires_grad_(False)
            p.grad = None
        results[f"extraction step, {label}"] = {"work": "extraction", "median_s": seconds, "windows_per_step": windows,
                                                "windows_per_s": windows / seconds}
    return results


#: The VAE's tiling settings, put back after the decode's timing changed them for the tiny model.
TILING = ("tile_sample_min_height", "tile_sample_min_width", "tile_latent_min_height", "tile_latent_min_width",
          "tile_overlap_factor_height", "tile_overlap_factor_width")


def _bench_decode(generator, world: int, repeats: int, device: torch.device) -> dict[str, dict]:
    """The VAE's tiled decode of one clip's latents: on one rank, or its tiles split over the ranks. The tiny VAE
    gets tiles of half its frame each way (a 3 x 3 grid, as the hub VAE's 720x480); the real one keeps its own."""
    from ..parallel.vae import split_vae_decode, tile_origins

    vae, info = generator.pipe.vae, generator.info
    scale = 2 ** (len(vae.config.block_out_channels) - 1)
    shape = (1, vae.config.latent_channels, (info.frames - 1) // 4 + 1, info.height // scale, info.width // scale)
    z = torch.randn(shape, generator=torch.Generator().manual_seed(0)).to(device, vae.dtype)
    label = "1 rank" if world == 1 else f"tiles split over {world}"
    saved = {name: getattr(vae, name) for name in TILING}
    try:
        if info.tiny:  # half the frame each way, overlapping by one latent
            half = (shape[3] // 2, shape[4] // 2)
            vae.enable_tiling(tile_sample_min_height=half[0] * scale, tile_sample_min_width=half[1] * scale,
                              tile_overlap_factor_height=1 / half[0], tile_overlap_factor_width=1 / half[1])
        tiles = sum(len(row) for row in tile_origins(vae, shape[3], shape[4]))
        with torch.no_grad(), split_vae_decode(vae) if world > 1 else contextlib.nullcontext():
            seconds = _time(lambda: vae.decode(z), repeats, device)
    finally:
        for name, value in saved.items():
            setattr(vae, name, value)
    return {f"vae decode, {label}": {"work": "vae decode", "median_s": seconds, "tiles": tiles}}


def bench_parallel(args: argparse.Namespace) -> dict:
    """1 rank and `--gpus` ranks on the same generation, VAE decode and extraction steps; speed-ups against the
    1-rank run."""
    gpus = available_gpus()
    with tempfile.TemporaryDirectory() as work_dir:
        args.work_dir = work_dir
        # Both runs with the threads of one of the N ranks: on a CPU the comparison is then of the same work,
        # not of one process's threads fighting over cores (under load, 2 threads can be 10x slower than 1).
        args.threads = max(1, (os.cpu_count() or 1) // args.gpus)
        if args.device:
            raise ValueError("bench parallel places each rank on its own device; leave --device out")
        one = run_ranks(bench_rank, 1, (args,))[0]
        many = run_ranks(bench_rank, args.gpus, (args,))[0]
    results = {**one, **many}
    for work in ("generation", "vae decode", "extraction"):
        base = next(r["median_s"] for r in one.values() if r["work"] == work)
        for r in results.values():
            if r["work"] == work:
                r["speedup"] = base / r["median_s"] * r.get("windows_per_step", 1)  # data mode: windows per second
    return {"benchmark": "parallel", "ranks": args.gpus, "device": "cuda" if gpus else "cpu (gloo)",
            "cpu_threads_per_rank": None if gpus else args.threads,
            "gpu": torch.cuda.get_device_name(0) if gpus else None, "denoise_steps": args.denoise_steps,
            "note": "speedup: 1-rank time / N-rank time on the same work (data mode: windows per second); "
                    "without GPUs the ranks share this machine's CPU cores, so it measures collective overhead",
            "results": results}


def bench_windows(args: argparse.Namespace) -> dict:
    """How the loss per step changes with the windows per step (data mode's N; computed in one process, which the
    tests hold equal to N data-parallel ranks): held-out loss on fixed draws, every `eval_every` steps."""
    from ..extraction import ExtractionConfig, FAETrainer, prepare_training_data
    from ..media import write_mp4

    if args.device is None:
        torch.set_num_threads(1)  # many short steps: one thread is the fastest on a small shared CPU
    generator = load_generator(args)
    info = generator.info
    frames = np.zeros((info.frames * 3, info.height, info.width, 3), np.uint8)
    for i in range(len(frames)):  # a block sliding right, then a second one falling: motion worth learning
        x = i * info.width // (2 * len(frames))
        frames[i, info.height // 3 : 2 * info.height // 3, x : x + info.width // 4] = 255
        frames[i, i * info.height // (2 * len(frames)) :][: info.height // 5, -info.width // 5 :] = 128
    with tempfile.TemporaryDirectory() as tmp:
        clip = Path(tmp) / "clip.mp4"
        write_mp4(clip, frames, info.fps)
        data = prepare_training_data(generator, video=clip, clip_sha256="windows", start_s=0.0, end_s=len(frames) / info.fps,
                                     caption="a block slides", seed=0, num_crops=12, windows_per_crop=4, cache_dir=Path(tmp))[0]
    held_out = FAETrainer(generator, data, ExtractionConfig(seed=10_000))
    draws = [held_out.draw() for _ in range(args.eval_draws)]
    curves: dict[str, dict] = {}
    for windows in args.windows:
        generator.adapter.reset_action()
        trainer = FAETrainer(generator, data, ExtractionConfig(seed=args.seed, windows_per_step=windows))
        curve, started = {}, time.perf_counter()
        for step in range(args.steps + 1):
            if step % args.eval_every == 0:
                with torch.no_grad():
                    curve[step] = float(np.mean([trainer.loss(d).item() for d in draws]))
            if step < args.steps:
                for p in trainer.params:
                    p.requires_grad_(True)
                trainer.train_step()
                for p in trainer.params:
                    p.requires_grad_(False)
        curves[str(windows)] = {"held_out_loss": curve, "seconds": time.perf_counter() - started}
    base = curves[str(args.windows[0])]["held_out_loss"]
    results = {}
    for windows, c in curves.items():
        loss = c["held_out_loss"]
        # The step at which this N first reaches the loss the first N (usually 1) has at its last step.
        target = base[args.steps]
        reached = next((s for s, v in loss.items() if v <= target), None)
        results[f"{windows} windows per step"] = {
            "windows_per_step": int(windows), "loss_start": loss[0], "loss_mid": loss[max(k for k in loss if k <= args.steps // 2)],
            "loss_end": loss[args.steps], f"step_reaching_{args.windows[0]}_window_end_loss": reached,
        }
    return {"benchmark": "windows", "model": info.id, "steps": args.steps, "eval_every": args.eval_every,
            "eval_draws": args.eval_draws, "seed": args.seed,
            "note": "held-out loss: mean FAE loss on fixed draws (crop, window, timestep, noise) never trained on",
            "curves": curves, "results": results}


def multi_gpu_phases(model: Path | None = None, repeats: int = 3) -> dict:
    """The N-GPU phases of `make gpu-check`: `bench parallel` on 2, 4 and 8 GPUs as present (each against 1 GPU on
    the same work; `model` defaults to the tiny model). Skipped, with the reason, below 2 GPUs."""
    gpus = available_gpus()
    if gpus < 2:
        return {"phase": "multi_gpu", "skipped": f"{gpus} GPU(s) here; the N-GPU phases need at least 2"}
    runs = {}
    for n in (2, 4, 8):
        if n <= gpus:
            args = argparse.Namespace(model=model, tiny=model is None, device=None, refadapter=None, compile=False,
                                      memory_saving=False, attention_backend="padded", gpus=n, denoise_steps=50,
                                      repeats=repeats)
            runs[f"{n} GPUs"] = bench_parallel(args)
    return {"phase": "multi_gpu", "gpus": gpus, "gpu": torch.cuda.get_device_name(0), "runs": runs}
