"""`flexiact-backend bench {attention,extract,generate,media}`: speed and memory as JSON plus a table.

Ratios measured in one run are what to compare: the machines are shared and noisy.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from .model import biased_attention


class LargestTensor(TorchDispatchMode):
    """The largest tensor (in bytes) any op produced: the CPU stand-in for a peak-memory reading."""

    def __init__(self) -> None:
        super().__init__()
        self.bytes = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for o in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(o, torch.Tensor):
                self.bytes = max(self.bytes, o.numel() * o.element_size())
        return out


def _timed(fn: Callable[[], object], device: torch.device, repeats: int) -> dict:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return {"median_s": statistics.median(times), "min_s": min(times)}


def _memory(fn: Callable[[], object], device: torch.device) -> dict:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        fn()
        torch.cuda.synchronize()
        return {"peak_extra_bytes": torch.cuda.max_memory_allocated(device) - base}
    with LargestTensor() as rec:
        fn()
    return {"largest_tensor_bytes": rec.bytes}


def bench_attention(tokens: int, heads: int, head_dim: int, motion: int, text: int, dtype: torch.dtype, device: torch.device, repeats: int) -> dict:
    """FlexiAct's exact biased attention against the published dense L x L float mask, same inputs."""
    g = torch.Generator(device="cpu").manual_seed(0)
    q, k, v = (torch.randn(1, heads, tokens, head_dim, generator=g).to(device, dtype) for _ in range(3))
    video = slice(text + motion, None)
    columns = slice(text, text + motion)

    def dense() -> torch.Tensor:
        mask = torch.zeros(tokens, tokens, device=device, dtype=dtype)
        mask[video, columns] = 1.0
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)

    variants = {
        "dense_mask (published)": dense,
        "flexiact_exact_bias": lambda: biased_attention(q, k, v, bias=1.0, rows=video, columns=columns),
        "plain_sdpa (no bias)": lambda: F.scaled_dot_product_attention(q, k, v),
    }
    with torch.no_grad():
        results = {name: {**_timed(fn, device, repeats), **_memory(fn, device)} for name, fn in variants.items()}
        diff = (variants["dense_mask (published)"]().float() - variants["flexiact_exact_bias"]().float()).abs().max().item()
    base = results["plain_sdpa (no bias)"]["median_s"]
    for r in results.values():
        r["time_vs_plain"] = r["median_s"] / base
    return {"benchmark": "attention", "tokens": tokens, "heads": heads, "head_dim": head_dim, "dtype": str(dtype),
            "device": str(device), "max_abs_diff_dense_vs_exact": diff, "results": results}


def bench_extract(args: argparse.Namespace) -> dict:
    """Training step with cached latents against one that re-encodes the crop and caption every step."""
    from .cli import _load_generator
    from .augmentation import crop_boxes, crop_frames
    from .extraction import ExtractionConfig, FAETrainer, encode_video, prepare_training_data
    from .media import read_clip, write_mp4

    generator = _load_generator(args)
    info = generator.info
    with tempfile.TemporaryDirectory() as tmp:
        clip = Path(tmp) / "clip.mp4"
        frames = np.zeros((info.frames * 2, info.height, info.width, 3), np.uint8)
        for i in range(len(frames)):
            x = i * (info.width // 2) // len(frames)
            frames[i, info.height // 3 : info.height // 3 * 2, x : x + info.width // 4] = 255
        write_mp4(clip, frames, info.fps)
        data, _ = prepare_training_data(generator, video=clip, clip_sha256="bench", start_s=0.0, end_s=len(frames) / info.fps,
                                        caption="a block slides", seed=0, num_crops=2, windows_per_crop=2, cache_dir=Path(tmp))
        size = (info.width, info.height)
        crop = crop_frames(read_clip(clip, 0.0, info.frames / info.fps, info.frames), crop_boxes(size, 1, size, 0)[0], size)
        trainer = FAETrainer(generator, data, ExtractionConfig(steps=args.steps))
        for p in trainer.params:
            p.requires_grad_(True)
        generator.pipe.transformer.enable_gradient_checkpointing()

        def reencode_step() -> None:
            encode_video(generator, crop)
            with torch.no_grad():
                generator.pipe.encode_prompt("a block slides", do_classifier_free_guidance=False, max_sequence_length=info.text_length, device=generator.device)
            trainer.train_step()

        results = {"cached_latents": _timed(trainer.train_step, generator.device, args.steps),
                   "reencode_every_step": _timed(reencode_step, generator.device, args.steps)}
    for r in results.values():
        r["steps_per_s"] = 1.0 / r["median_s"]
    return {"benchmark": "extract", "model": info.id, "device": str(generator.device), "steps": args.steps,
            "speedup_cached": results["reencode_every_step"]["median_s"] / results["cached_latents"]["median_s"], "results": results}


def bench_generate(args: argparse.Namespace) -> dict:
    """Per-step time of the transformer with the LoRA folded against the LoRA branch computed each step."""
    from .cli import _load_generator

    generator = _load_generator(args)
    info, pipe = generator.info, generator.pipe
    t = pipe.transformer
    frames = (info.frames - 1) // pipe.vae_scale_factor_temporal + 1
    h, w = info.height // pipe.vae_scale_factor_spatial, info.width // pipe.vae_scale_factor_spatial
    g = torch.Generator().manual_seed(0)
    channels = t.config.in_channels
    inputs = dict(
        hidden_states=torch.randn(2, frames, channels, h, w, generator=g).to(generator.device, t.dtype),
        encoder_hidden_states=torch.randn(2, info.text_length, t.config.text_embed_dim, generator=g).to(generator.device, t.dtype),
        timestep=torch.tensor([900, 900], device=generator.device),
        image_rotary_emb=pipe._prepare_rotary_positional_embeddings(info.height, info.width, frames, generator.device),
        return_dict=False,
    )
    adapter = generator.adapter
    adapter.set_lora_weight(0.7)
    results = {}
    with torch.inference_mode():
        for bias in (None, 1.0):
            adapter.set_reweight(bias)
            label = "bias_on" if bias else "bias_off"
            results[f"lora_unfused_{label}"] = _timed(lambda: t(**inputs), generator.device, args.steps)
            with adapter.lora_fused_for_inference():
                results[f"lora_fused_{label}"] = {**_timed(lambda: t(**inputs), generator.device, args.steps), **_memory(lambda: t(**inputs), generator.device)}
    adapter.set_reweight(None)
    base = results["lora_fused_bias_off"]["median_s"]
    for r in results.values():
        r["time_vs_fused_no_bias"] = r["median_s"] / base
    return {"benchmark": "generate_step", "model": info.id, "device": str(generator.device), "dtype": str(t.dtype),
            "tokens": info.text_length + adapter.num_motion_tokens + frames * h * w // t.config.patch_size**2,
            "reweighting": {"bias_on": "the paper's frequency-aware bias, the default while the timestep is high",
                            "bias_off": "every step of reweight_scale=None, the authors' released script, and the "
                                        "default's low-noise steps"},
            "results": results}


def bench_media(args: argparse.Namespace) -> dict:
    """Probe and trim-decode of a long clip: a trim at the end should cost about what one at the start does."""
    import subprocess

    import imageio_ffmpeg

    from .media import probe_video, read_clip

    with tempfile.TemporaryDirectory() as tmp:
        clip = Path(tmp) / "clip.mp4"
        subprocess.run([imageio_ffmpeg.get_ffmpeg_exe(), "-hide_banner", "-loglevel", "error", "-f", "lavfi", "-i",
                        f"testsrc2=size={args.width}x{args.height}:rate={args.fps}:duration={args.seconds}",
                        "-c:v", "libx264", "-preset", "ultrafast", "-g", str(2 * args.fps), "-pix_fmt", "yuv420p",
                        str(clip)], check=True)
        end = float(args.seconds)
        cpu = torch.device("cpu")
        results = {"probe": _timed(lambda: probe_video(clip), cpu, args.repeats)}
        for label, start in (("trim_at_start", 0.0), ("trim_at_end", end - 2.0)):
            results[f"read_clip_{label}"] = _timed(
                lambda: read_clip(clip, start, start + 2.0, args.frames, max_side=args.max_side), cpu, args.repeats)
    return {"benchmark": "media", "clip": f"{args.width}x{args.height} {args.fps} fps {args.seconds} s H.264",
            "trim_s": 2.0, "frames": args.frames, "max_side": args.max_side, "results": results}


def format_table(report: dict) -> str:
    """The results as aligned columns; a variant without some measurement shows a blank there."""
    keys = list(dict.fromkeys(k for r in report["results"].values() for k in r))
    cell = lambda v: f"{v:.4g}" if isinstance(v, float) else ("" if v is None else str(v))  # noqa: E731
    rows = [(name, *(cell(r.get(k)) for k in keys)) for name, r in report["results"].items()]
    header = ("variant", *keys)
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    line = lambda cells: "  ".join(str(c).ljust(w) for c, w in zip(cells, widths))  # noqa: E731
    return "\n".join([line(header), line("-" * w for w in widths), *(line(r) for r in rows)])


def run_benchmarks(args: argparse.Namespace) -> int:
    if args.bench == "attention":
        device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[args.dtype]
        report = bench_attention(args.tokens, args.heads, args.head_dim, args.motion, args.text, dtype, device, args.repeats)
    elif args.bench == "extract":
        report = bench_extract(args)
    elif args.bench == "media":
        report = bench_media(args)
    else:
        report = bench_generate(args)
    text = json.dumps(report, indent=2)
    print(text)
    print(format_table(report))
    if args.json:
        Path(args.json).write_text(text)
    return 0


def add_bench_commands(sub: argparse._SubParsersAction) -> None:
    from .cli import _model_args

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
    for name, helptext in (("extract", "training step: cached latents vs re-encoding each step"),
                           ("generate", "transformer step: LoRA folded vs unfolded, bias on/off")):
        p = sub.add_parser(name, help=helptext)
        _model_args(p)
        p.add_argument("--steps", type=int, default=10, help="timed repeats")
        p.add_argument("--json", type=Path)
        p.set_defaults(func=run_benchmarks)
