"""`flexiact-backend bench {attention,extract,generate,media,full,takes}`: speed and memory as JSON plus a table.

Ratios measured in one run are what to compare: the machines are shared and noisy.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import diffusers
import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils._python_dispatch import TorchDispatchMode

from ..model import ATTENTION_BACKENDS, biased_attention, rotary_embeddings
from ..requirements import missing
from .bench_parallel import bench_parallel, bench_windows
from .model_args import load_generator


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
    """FlexiAct's exact biased attention (each backend) against the published dense L x L float mask, same inputs."""
    g = torch.Generator(device="cpu").manual_seed(0)
    q, k, v = (torch.randn(1, heads, tokens, head_dim, generator=g).to(device, dtype) for _ in range(3))
    video = slice(text + motion, None)
    columns = slice(text, text + motion)

    def dense() -> torch.Tensor:
        mask = torch.zeros(tokens, tokens, device=device, dtype=dtype)
        mask[video, columns] = 1.0
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)

    bias = torch.tensor(1.0, device=device)
    exact = {f"exact_bias:{b}": (lambda b=b: biased_attention(q, k, v, bias=bias, rows=video, columns=columns, backend=b))
             for b in ATTENTION_BACKENDS}
    variants = {"dense_mask (published)": dense, **exact, "plain_sdpa (no bias)": lambda: F.scaled_dot_product_attention(q, k, v)}
    with torch.no_grad():
        # FlexAttention's operator does not pass through the CPU's dispatch-mode reading: its memory is left blank there.
        flex = {f"exact_bias:{b}" for b in ("flex", "lse_merge")} if device.type == "cpu" else set()
        results = {name: {**_timed(fn, device, repeats), **({} if name in flex else _memory(fn, device))} for name, fn in variants.items()}
        reference = dense().float()
        for name, fn in exact.items():
            results[name]["max_abs_diff_vs_dense"] = (reference - fn().float()).abs().max().item()
    base = results["plain_sdpa (no bias)"]["median_s"]
    for r in results.values():
        r["time_vs_plain"] = r["median_s"] / base
    return {"benchmark": "attention", "tokens": tokens, "heads": heads, "head_dim": head_dim, "dtype": str(dtype),
            "device": str(device), "results": results}


def bench_extract(args: argparse.Namespace) -> dict:
    """Training step with cached latents against one that re-encodes the crop and caption every step, and what
    a preview (PREVIEW_STEPS denoising steps with the tokens so far) costs as a share of the extraction."""
    from PIL import Image

    from ..augmentation import crop_boxes, crop_frames
    from ..extraction import PREVIEW_STEPS, ExtractionConfig, FAETrainer, encode_video, moved, prepare_training_data, render_preview
    from ..media import read_clip, write_mp4

    generator = load_generator(args)
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
        # As in extract_action: the VAE and text encoder wait off the device and come back for each preview.
        idle = (generator.pipe.vae, generator.pipe.text_encoder)
        image = Image.fromarray(crop[0])
        with moved(idle, ["cpu"] * len(idle)) as home:
            def preview() -> None:
                with moved(idle, home):
                    render_preview(generator, image, "a block slides", seed=0)

            results["preview"] = _timed(preview, generator.device, args.preview_repeats)
    step_s, preview_s = results["cached_latents"]["median_s"], results["preview"]["median_s"]
    previews = args.extraction_steps // args.preview_every if args.preview_every else 0
    results["preview"]["steps_equivalent"] = preview_s / step_s
    return {"benchmark": "extract", "model": info.id, "device": str(generator.device), "steps": args.steps,
            "speedup_cached": results["reencode_every_step"]["median_s"] / results["cached_latents"]["median_s"],
            "preview_steps": PREVIEW_STEPS, "preview_every": args.preview_every, "extraction_steps": args.extraction_steps,
            "previews_per_extraction": previews,
            "preview_share_of_extraction": previews * preview_s / (args.extraction_steps * step_s + previews * preview_s),
            "results": results}


def bench_generate(args: argparse.Namespace) -> dict:
    """Per-step time of the transformer with the LoRA folded against the LoRA branch computed each step."""

    generator = load_generator(args)
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
        image_rotary_emb=rotary_embeddings(t, info.height, info.width, frames, pipe.vae_scale_factor_spatial, generator.device),
        return_dict=False,
    )
    adapter = generator.adapter
    results = {}
    with torch.inference_mode():
        for bias in (None, torch.tensor(1.0, device=generator.device)):
            label = "bias_on" if bias is not None else "bias_off"
            unfused = {"reweight": bias, "lora_weight": 0.7}
            results[f"lora_unfused_{label}"] = _timed(lambda: t(**inputs, attention_kwargs=unfused), generator.device, args.steps)
            with adapter.lora_fused_for_inference(0.7):
                step = lambda: t(**inputs, attention_kwargs={"reweight": bias})  # noqa: E731
                results[f"lora_fused_{label}"] = {**_timed(step, generator.device, args.steps), **_memory(step, generator.device)}
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

    from ..media import probe_video, read_clip

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




def _peak(fn: Callable[[], object], device: torch.device) -> dict:
    """Peak bytes while `fn` runs: CUDA's allocator on a GPU; on the CPU the live bytes of tensors it creates."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        torch.cuda.synchronize()
        return {"max_memory_allocated": torch.cuda.max_memory_allocated(device)}
    from .estimate import LiveBytes

    with LiveBytes() as live:
        fn()
    return {"cpu_new_tensors_peak_bytes": live.peak}


def unsupported_reason(mode: str, device: torch.device) -> str | None:
    """Why `mode` cannot run on `device`, or None."""
    if mode == "memory_saving":
        if device.type != "cuda":
            return "needs a CUDA device (idle models are offloaded to CPU memory)"
        if missing({"accelerate": "accelerate"}):
            return "needs accelerate installed (pip install accelerate)"
    if mode == "fp8":
        if device.type != "cuda" or torch.cuda.get_device_capability(device) < (8, 9):
            return "needs a CUDA GPU with fp8 support (compute capability 8.9 or newer)"
        try:
            import torchao  # noqa: F401
        except ImportError:
            return "needs torchao installed"
    return None


def _quantize_fp8(transformer: torch.nn.Module) -> None:
    """torchao's dynamic fp8 for the transformer blocks' linear layers (weights and activations in float8)."""
    from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, quantize_

    quantize_(transformer, Float8DynamicActivationFloat8WeightConfig(),
              filter_fn=lambda m, name: isinstance(m, torch.nn.Linear) and name.startswith("transformer_blocks"))


def _full_phases(generator, steps: int, repeats: int, step_cache: bool, lora_weight: float, memory_saving: bool) -> dict:
    """Each phase of one mode: text encoding, biased and unbiased steps, VAE decode, request->mp4, extraction step.

    Shapes come from the generator's model (the full-size one, or the tiny one of `bench gpu-check --dry-run`)."""
    from ..extraction import ExtractionConfig, FAETrainer, TrainingData, moved
    from ..model.recompute import selective_checkpointing

    pipe, device, adapter, info = generator.pipe, generator.device, generator.adapter, generator.info
    t, dtype = pipe.transformer, pipe.transformer.dtype
    g = torch.Generator().manual_seed(0)
    spatial = pipe.vae_scale_factor_spatial
    h, w, frames = info.height // spatial, info.width // spatial, (info.frames - 1) // pipe.vae_scale_factor_temporal + 1
    channels, text = t.config.out_channels, (info.text_length, t.config.text_embed_dim)
    step_inputs = dict(
        hidden_states=torch.randn(2, frames, t.config.in_channels, h, w, generator=g).to(device, dtype),
        encoder_hidden_states=torch.randn(2, *text, generator=g).to(device, dtype),
        timestep=torch.tensor([900, 900], device=device),
        image_rotary_emb=rotary_embeddings(t, info.height, info.width, frames, spatial, device), return_dict=False,
    )
    bias = torch.tensor(1.0, device=device)
    latents = torch.randn(1, frames, channels, h, w, generator=g).to(device, dtype)
    phases: dict[str, dict] = {}

    def measure(name: str, fn: Callable[[], object], times: int = repeats) -> None:
        print(f"bench full: {name}", file=sys.stderr, flush=True)
        phases[name] = {**_timed(fn, device, times), **_peak(fn, device)}

    with torch.inference_mode():
        measure("text_encoding", lambda: pipe.encode_prompt("a person dances", "", do_classifier_free_guidance=True,
                                                            max_sequence_length=info.text_length, device=device))
        with adapter.lora_fused_for_inference(lora_weight):
            measure("transformer_step_unbiased", lambda: t(**step_inputs))
            measure("transformer_step_biased", lambda: t(**step_inputs, attention_kwargs={"reweight": bias}))
        measure("vae_decode", lambda: pipe.decode_latents(latents))
    phases["transformer_step_biased"]["time_vs_unbiased"] = (
        phases["transformer_step_biased"]["median_s"] / phases["transformer_step_unbiased"]["median_s"])

    image = Image.new("RGB", (info.width, info.height), (90, 120, 150))
    with tempfile.TemporaryDirectory() as tmp:
        def request() -> None:
            result = generator.generate(image, "a person dances", steps=steps, step_cache=step_cache, lora_weight=lora_weight)
            result.write_mp4(Path(tmp) / "out.mp4")
            phases["request_to_mp4"]["cached_steps"] = len(result.cached_steps)

        print("bench full: request_to_mp4", file=sys.stderr, flush=True)
        phases["request_to_mp4"] = {"steps": steps}
        phases["request_to_mp4"].update({**_timed(request, device, 1), **_peak(request, device)})

    data = TrainingData(torch.randn(2, 1, frames, channels, h, w, generator=g),
                        torch.randn(2, 1, 1, channels, h, w, generator=g), torch.randn(1, *text, generator=g),
                        torch.randn(1, *text, generator=g))
    trainer = FAETrainer(generator, data, ExtractionConfig())
    for p in trainer.params:
        p.requires_grad_(True)
    # As extraction does: the VAE and text encoder leave the GPU while the tokens train (offloading already does it).
    idle_models = (contextlib.nullcontext() if device.type == "cpu" or memory_saving
                   else moved((pipe.vae, pipe.text_encoder), ("cpu", "cpu")))
    try:
        with idle_models:
            for label, func in (("extraction_step", None), ("extraction_step_selective_recompute", selective_checkpointing())):
                t.enable_gradient_checkpointing(func)
                measure(label, trainer.train_step)
                t.disable_gradient_checkpointing()
    finally:
        for p in trainer.params:
            p.requires_grad_(False)
            p.grad = None
    return phases


def bench_full(args: argparse.Namespace) -> dict:
    """CogVideoX-5B-I2V at its published configs with random weights, FlexiAct attached, per mode and phase."""
    from .full_size import FullSize

    size = FullSize(args.layers, args.frames, args.height, args.width)
    if args.estimate:
        from .estimate import estimate_full

        return estimate_full(size, tflops=args.tflops)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    report = {"benchmark": "full", "size": size.to_dict(), "device": str(device), "dtype": str(dtype), "steps": args.steps,
              "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
              "versions": {"torch": torch.__version__, "diffusers": diffusers.__version__},
              "date": time.strftime("%Y-%m-%d"), "results": {}}
    for mode in args.modes:
        reason = unsupported_reason(mode, device)
        if reason:
            report["results"][mode] = {"unsupported": reason}
            continue
        for phase, r in run_mode(mode, size, device, dtype, steps=args.steps, repeats=args.repeats).items():
            report["results"][f"{mode}/{phase}"] = r
    return report


def run_mode(mode: str, size, device: torch.device, dtype: torch.dtype, *, steps: int, repeats: int,
             tiny: bool = False) -> dict:
    """Build the random-weight model at `size` (the tiny model instead with `tiny`) for one of bench_commands.FULL_MODES (or
    "step_cache": eager with the cache), measure its phases (`_full_phases`), and free it."""
    from .full_size import build_full_generator, build_tiny_generator

    print(f"bench full: building the {mode} pipeline", file=sys.stderr, flush=True)
    options = dict(memory_saving=mode == "memory_saving", compile=mode.startswith("compiled"))
    generator = (build_tiny_generator(device, dtype, **options) if tiny
                 else build_full_generator(size, device, dtype, **options))
    lora_weight = 0.7
    if mode == "fp8":
        _quantize_fp8(generator.pipe.transformer)
        lora_weight = 0.0  # fp8 weights cannot take the folded RefAdapter: measured without it
    try:
        return _full_phases(generator, steps, repeats, mode.endswith("step_cache"), lora_weight, mode == "memory_saving")
    finally:
        del generator
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()


def bench_takes(args: argparse.Namespace) -> dict:
    """N takes in one batch (guidance batch 2N) against the same N takes one after another on the warm model."""
    from PIL import Image


    generator = load_generator(args)
    y, x = np.mgrid[0:480, 0:720]
    image = Image.fromarray(np.stack([x * 255 // 719, y * 255 // 479, (x // 60 + y // 60) % 2 * 255], -1).astype(np.uint8))
    seeds = list(range(args.takes))
    results = {}
    for label, max_batch in (("batched", None), ("one_by_one", 1)):
        def run() -> None:
            generator.generate_takes(image, "a figure waves", seeds=seeds, steps=args.denoise_steps, max_batch=max_batch)

        results[label] = {**_timed(run, generator.device, args.steps), **_memory(run, generator.device)}
        results[label]["s_per_take"] = results[label]["median_s"] / args.takes
    return {"benchmark": "takes", "model": generator.info.id, "device": str(generator.device), "takes": args.takes,
            "denoise_steps": args.denoise_steps,
            "speedup_batched": results["one_by_one"]["median_s"] / results["batched"]["median_s"], "results": results}


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
    elif args.bench == "full":
        report = bench_full(args)
    elif args.bench == "takes":
        report = bench_takes(args)
    elif args.bench == "parallel":
        report = bench_parallel(args)
    elif args.bench == "windows":
        report = bench_windows(args)
    else:
        report = bench_generate(args)
    text = json.dumps(report, indent=2)
    print(text)
    print(format_table(report))
    if "multi_gpu" in report:
        print(format_table({"results": report["multi_gpu"]}))
    if args.json:
        Path(args.json).write_text(text)
    return 0
