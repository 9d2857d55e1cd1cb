"""RefAdapter-conditioned CogVideoX generation with a FlexiAct action and frequency-aware reweighting.

`FlexiActGenerator.from_pretrained(dir)` loads a pipeline folder once (the real CogVideoX-5B-I2V or the tiny
model) and keeps it warm; `generate(...)` runs one video, reporting each step and stopping between steps when
asked. The reweighting bias in force at each scheduled timestep reaches the attention through `attention_kwargs`
(a hook on the transformer reads the timestep); `step_cache=True` reuses transformer work past the bias window.
"""

from __future__ import annotations

import contextlib
import copy
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from diffusers import CogVideoXDPMScheduler, CogVideoXImageToVideoPipeline
from PIL import Image

from .actions import motion_duration_s, read_action_metadata
from .errors import Cancelled, CheckpointError, RefAdapterMissing
from .media import FitMapping, fit_target_image, retime_frames, write_mp4
from .options import TEMPOS
from .model.processor import LORA_NAMES
from .model import ATTENTION_BACKENDS, FlexiActAdapter, StepCache, attach_flexiact, compile_blocks, reweight_schedule, reweighting
from .presets import GENERATION_DEFAULTS
from .model_info import REFADAPTER_FILES, ModelInfo, find_refadapter, read_model_info
from .requirements import TOKENIZER_PACKAGES, MissingPackage, require_memory_saving, require_tokenizer_packages


ProgressFn = Callable[[int, int, float], None]
CancelFn = Callable[[], bool]


@dataclass(frozen=True)
class GenerationSettings:
    """Every knob of one generation, with FlexiAct's published defaults."""

    prompt: str
    seed: int = GENERATION_DEFAULTS.seed
    steps: int = GENERATION_DEFAULTS.steps
    guidance_scale: float = GENERATION_DEFAULTS.guidance_scale
    lora_weight: float = GENERATION_DEFAULTS.lora_weight
    reweight_scale: float | None = GENERATION_DEFAULTS.reweight_scale
    transition: float = GENERATION_DEFAULTS.transition
    fit: str = "crop"
    tempo: str = "reference"
    step_cache: bool = False
    #: The RefAdapter file that ran (None: none was loaded, and `lora_weight` is then 0, what ran).
    refadapter: str | None = None


@dataclass
class GenerationResult:
    """Frames as uint8 [T, H, W, 3] (made at the model's `fps`), the seconds they play, how the image was fitted.

    `duration_s` is the action's motion duration (tempo "reference") or the model's clip length (tempo "model").
    `cached_steps`: 0-based steps the step cache served wholly or partly (never one with a bias).
    """

    frames: np.ndarray
    fps: float
    fit: FitMapping
    settings: GenerationSettings
    duration_s: float
    reweights: list[float | None] = field(default_factory=list)
    #: Wall time this video cost: its batch's time shared among the takes in that batch.
    seconds: float = 0.0
    cached_steps: list[int] = field(default_factory=list)
    #: How many takes shared this one's batch on the device (1: it ran alone).
    batch: int = 1

    def write_mp4(self, path: str | Path, fps: float | None = None) -> Path:
        """Write an H.264 mp4 at `fps` (default the model's) lasting `duration_s` at any frame rate."""
        fps = self.fps if fps is None else float(fps)
        write_mp4(path, retime_frames(self.frames, len(self.frames) / self.duration_s, fps), fps)
        return Path(path)


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def refadapter_missing_message(model_id: str, lora_weight: float) -> str:
    """Why a generation with RefAdapter weight `lora_weight` is refused, and the two ways on."""
    return (f"no RefAdapter is loaded for {model_id}, so RefAdapter weight {lora_weight:g} cannot run (FlexiAct "
            f"without it is a different method, not a default). Put {REFADAPTER_FILES[1]} (hub repo "
            "shiyi0408/FlexiAct; `flexiact-backend download` places it) in the model folder or start with "
            "--refadapter FILE; or generate without it on purpose: lora_weight 0 (CLI: --no-refadapter).")


def configure_vae(vae: torch.nn.Module) -> None:
    """Slicing and tiling on for every encode and decode, in every mode, as the authors run them.

    Why: at 720x480 tiling really runs and changes the latents in the blend bands, and the RefAdapter and the
    published actions were trained on tiled latents; slicing decodes a batch of takes one video at a time.
    The hub VAE's tiles (240x360 pixels, overlap 1/6 and 1/5) step by whole latents; a smaller VAE (the tiny model)
    gets the nearest overlap that does too, else its tiled latents would not fit together.
    """
    vae.enable_slicing()
    vae.enable_tiling()
    overlaps = {}
    for axis in ("height", "width"):
        tile = getattr(vae, f"tile_latent_min_{axis}")
        factor = getattr(vae, f"tile_overlap_factor_{axis}")
        if (tile * factor) % 1:
            overlaps[f"tile_overlap_factor_{axis}"] = max(1, round(tile * factor)) / tile
    if overlaps:
        vae.enable_tiling(**overlaps)


def vae_tiling_state(vae: torch.nn.Module) -> tuple:
    """What of the VAE's set-up changes its latents (part of the latent cache key)."""
    return (bool(getattr(vae, "use_tiling", False)), getattr(vae, "tile_sample_min_height", None),
            getattr(vae, "tile_sample_min_width", None), getattr(vae, "tile_overlap_factor_height", None),
            getattr(vae, "tile_overlap_factor_width", None))


class FlexiActGenerator:
    """A loaded pipeline with FlexiAct attached; one generation at a time."""

    def __init__(self, pipe: CogVideoXImageToVideoPipeline, adapter: FlexiActAdapter, info: ModelInfo, device: torch.device,
                 attention_backend: str = "padded", refadapter: str | None = None) -> None:
        if attention_backend not in ATTENTION_BACKENDS:
            raise ValueError(f"unknown attention backend {attention_backend!r}; choose one of {', '.join(ATTENTION_BACKENDS)}")
        self.pipe = pipe
        self.adapter = adapter
        self.info = info
        self.device = device
        self.attention_backend = attention_backend
        self.refadapter = refadapter  # the loaded RefAdapter's file name; None: the LoRA is not loaded
        self.lock = threading.RLock()  # one generation or extraction at a time; an extraction may render previews

    @classmethod
    def from_pretrained(
        cls,
        model_dir: str | Path,
        *,
        device: str | torch.device | None = None,
        dtype: torch.dtype | None = None,
        refadapter: str | Path | None = None,
        memory_saving: bool = False,
        compile: bool = False,
        attention_backend: str = "padded",
    ) -> FlexiActGenerator:
        """Load `model_dir` (diffusers format) onto `device` in `dtype` (bf16 on GPU, float32 on CPU by default).

        Whatever scheduler class the folder names, generation runs `CogVideoXDPMScheduler` from its config.

        `memory_saving` offloads idle sub-models to CPU memory as diffusers does (needs a CUDA GPU and accelerate;
        refused otherwise). The VAE is sliced and tiled in every mode (`configure_vae`). `compile`
        compiles the transformer blocks and warms them up here (a biased and an unbiased step), so the first request
        pays no compile time. `attention_backend` picks how the biased attention is computed (all exact).
        """
        model_dir = Path(model_dir)
        info = read_model_info(model_dir)
        device = torch.device(device) if device is not None else default_device()
        dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
        if memory_saving:
            require_memory_saving(device)
        require_tokenizer_packages(model_dir)
        refadapter = find_refadapter(model_dir, refadapter)
        try:
            pipe = CogVideoXImageToVideoPipeline.from_pretrained(model_dir, dtype=dtype)
        except (ImportError, ValueError) as e:  # transformers names tiktoken when it cannot convert spiece.model
            if "tiktoken" in str(e) or "sentencepiece" in str(e).lower() or "protobuf" in str(e).lower():
                raise MissingPackage(f"the tokenizer in {model_dir / 'tokenizer'} did not load ({e}). It needs "
                                     f"{' and '.join(TOKENIZER_PACKAGES.values())}: pip install "
                                     f"{' '.join(TOKENIZER_PACKAGES.values())}") from e
            raise
        # The hub folder names CogVideoXDDIMScheduler; FlexiAct samples with the DPM scheduler built from the same
        # config (trailing spacing, v-prediction, zero-SNR rescale), as the authors' inference script does.
        pipe.scheduler = CogVideoXDPMScheduler.from_config(pipe.scheduler.config)
        pipe.set_progress_bar_config(disable=True)
        for module in (pipe.transformer, pipe.vae, pipe.text_encoder):
            module.requires_grad_(False)  # frozen: extraction trains motion tokens only
        configure_vae(pipe.vae)
        adapter = attach_flexiact(pipe.transformer, rank=info.rank, alpha=info.alpha, num_motion_tokens=info.num_motion_tokens)
        if memory_saving:
            pipe.enable_model_cpu_offload(device=device)
        else:
            pipe.to(device)
        generator = cls(pipe, adapter, info, device, attention_backend)
        if refadapter is not None:
            generator.use_refadapter(refadapter)
        if compile:
            generator.compile_and_warm_up()
        return generator

    def compile_and_warm_up(self) -> None:
        """Compile the transformer blocks, then one two-step generation: its first step carries the bias and its
        second none, so both graphs are built before the first request."""
        compile_blocks(self.pipe.transformer, dynamic=False)
        self.generate(Image.new("RGB", (self.info.width, self.info.height)), "", steps=2)

    def use_refadapter(self, src: str | Path | Mapping[str, torch.Tensor] | None) -> None:
        """Load a RefAdapter (published `.pt`, safetensors or a state dict), or with None run without one from now
        on (weight 0); generations report which ran."""
        with self.lock:
            if src is None:
                with torch.no_grad():
                    for processor in self.adapter.processors:
                        for name in LORA_NAMES:
                            getattr(processor, name).up.weight.zero_()
                self.refadapter = None
                return
            self.adapter.load_refadapter(src)
            self.refadapter = Path(src).name if isinstance(src, (str, Path)) else "given state dict"

    def check_refadapter(self, lora_weight: float) -> float:
        """The RefAdapter weight that will run: refused above 0 on a real model without a RefAdapter (that would
        be a different method, not a default); 0 whenever no RefAdapter is loaded (the tiny model)."""
        if self.refadapter is None and lora_weight and not self.info.tiny:
            raise RefAdapterMissing(refadapter_missing_message(self.info.id, lora_weight))
        return float(lora_weight) if self.refadapter is not None else 0.0

    def scheduled_timesteps(self, steps: int) -> list[int]:
        """The timesteps the pipeline's scheduler will visit for `steps` steps, computed without touching it."""
        scheduler = copy.deepcopy(self.pipe.scheduler)
        scheduler.set_timesteps(steps)
        return [int(t) for t in scheduler.timesteps]

    def generate(
        self,
        image: Image.Image,
        prompt: str,
        *,
        action: str | Path | Mapping[str, torch.Tensor] | None = None,
        seed: int = GENERATION_DEFAULTS.seed,
        steps: int = GENERATION_DEFAULTS.steps,
        guidance_scale: float = GENERATION_DEFAULTS.guidance_scale,
        lora_weight: float = GENERATION_DEFAULTS.lora_weight,
        reweight_scale: float | None = GENERATION_DEFAULTS.reweight_scale,
        transition: float = GENERATION_DEFAULTS.transition,
        fit: str = "crop",
        tempo: str = "reference",
        step_cache: bool = False,
        progress: ProgressFn | None = None,
        cancel: CancelFn | None = None,
    ) -> GenerationResult:
        """Generate the target `image` performing the `action` (motion tokens; None means zero tokens).

        `reweight_scale=None` turns the frequency-aware bias off: the authors' released inference script, which
        never applies it. `tempo` (see TEMPOS) sets how long the result plays. `step_cache` lets diffusers'
        TaylorSeer cache predict transformer blocks at steps after the reweight window.
        """
        return self.generate_takes(
            image, prompt, seeds=[seed], action=action, steps=steps, guidance_scale=guidance_scale,
            lora_weight=lora_weight, reweight_scale=reweight_scale, transition=transition, fit=fit, tempo=tempo,
            step_cache=step_cache, progress=progress, cancel=cancel)[0]

    def generate_takes(
        self,
        image: Image.Image,
        prompt: str,
        *,
        seeds: Sequence[int],
        action: str | Path | Mapping[str, torch.Tensor] | None = None,
        steps: int = GENERATION_DEFAULTS.steps,
        guidance_scale: float = GENERATION_DEFAULTS.guidance_scale,
        lora_weight: float = GENERATION_DEFAULTS.lora_weight,
        reweight_scale: float | None = GENERATION_DEFAULTS.reweight_scale,
        transition: float = GENERATION_DEFAULTS.transition,
        fit: str = "crop",
        tempo: str = "reference",
        step_cache: bool = False,
        max_batch: int | None = None,
        progress: ProgressFn | None = None,
        cancel: CancelFn | None = None,
    ) -> list[GenerationResult]:
        """One video per seed from the same settings, batched (guidance batch 2N) while the memory allows.

        Each take draws its noise from its own seed, so take i equals `generate(seed=seeds[i])` whatever the
        batch. A batch that runs out of GPU memory is halved and retried, down to one take at a time with
        the model kept warm; `max_batch` caps the batch from the start. `progress` counts take-steps
        (steps x takes in all).
        """
        if not seeds:
            raise ValueError("generate_takes needs at least one seed")
        lora_weight = self.check_refadapter(lora_weight)
        if tempo not in TEMPOS:
            raise ValueError(f"tempo must be one of {TEMPOS}, got {tempo!r}")
        duration_s = self.info.duration_s
        if tempo == "reference" and isinstance(action, (str, Path)):
            try:
                metadata = read_action_metadata(action)
            except CheckpointError:  # a published .pt: no metadata
                metadata = {}
            duration_s = motion_duration_s(metadata, self.info.duration_s)
        target, mapping = fit_target_image(image, (self.info.width, self.info.height), fit)
        timesteps = self.scheduled_timesteps(steps)
        reweights = reweight_schedule(timesteps, reweight_scale, transition)
        total = steps * len(seeds)
        batch = min(len(seeds), max_batch or len(seeds))
        results: list[GenerationResult] = []
        with self.lock:
            if action is None:
                self.adapter.reset_action()
            else:
                self.adapter.load_action(action)
            started = time.monotonic()
            # The cache may act from one step after the first unbiased one: a fully computed unbiased step comes first.
            first_unbiased = next((i for i, r in enumerate(reweights) if r is None), steps)
            while len(results) < len(seeds):
                chunk = list(seeds[len(results) : len(results) + batch])
                done_before = len(results) * steps
                chunk_started = time.monotonic()
                cache = StepCache(self.pipe.transformer, first_step=first_unbiased + 1) if step_cache else None

                def on_step_end(pipe: CogVideoXImageToVideoPipeline, i: int, t: torch.Tensor, tensors: dict) -> dict:
                    if int(t) != timesteps[i]:
                        raise RuntimeError(f"scheduler visited timestep {int(t)} at step {i}, expected {timesteps[i]}")
                    if cache is not None:
                        cache.end_step(i)
                    if progress is not None:
                        progress(done_before + (i + 1) * len(chunk), total, time.monotonic() - started)
                    if cancel is not None and cancel() and done_before + (i + 1) * len(chunk) < total:
                        raise Cancelled(f"generation cancelled after step {i + 1} of {steps}")
                    return {}

                try:
                    with (torch.inference_mode(), self.adapter.lora_fused_for_inference(lora_weight),
                          reweighting(self.pipe.transformer, timesteps, reweights), cache or contextlib.nullcontext()):
                        videos = self.pipe(
                            image=[target] * len(chunk),
                            prompt=[prompt] * len(chunk),  # the pipeline ignores num_videos_per_prompt
                            negative_prompt="",
                            height=self.info.height,
                            width=self.info.width,
                            num_frames=self.info.frames,
                            num_inference_steps=steps,
                            guidance_scale=guidance_scale,
                            generator=[torch.Generator("cpu").manual_seed(s) for s in chunk],
                            output_type="np",
                            callback_on_step_end=on_step_end,
                            max_sequence_length=self.info.text_length,
                            attention_kwargs={"attention_backend": self.attention_backend},
                        ).frames
                except torch.cuda.OutOfMemoryError:
                    if batch == 1:
                        raise
                    batch //= 2  # the freed activations make room for a smaller batch
                    torch.cuda.empty_cache()
                    continue
                seconds = (time.monotonic() - chunk_started) / len(chunk)
                for s, video in zip(chunk, videos):
                    frames = (np.clip(video, 0.0, 1.0) * 255.0).round().astype(np.uint8)
                    settings = GenerationSettings(prompt, s, steps, guidance_scale, lora_weight, reweight_scale,
                                                  transition, fit, tempo, step_cache, self.refadapter)
                    results.append(GenerationResult(frames, self.info.fps, mapping, settings, duration_s, reweights,
                                                    seconds, cache.cached_steps if cache is not None else [],
                                                    len(chunk)))
        return results
