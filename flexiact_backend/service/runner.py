"""Running one job on a loaded generator: files in, a file out; no database, no HTTP, no threads of its own.

Why a plain class: the same code runs a job in a worker thread of the service (one machine) and inside a Ray
actor on another machine (studio mode). Whoever calls it supplies the input files, the work folder (where an
extraction keeps its caches and checkpoints), the output path and three hooks: progress, cancel and pause.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from ..media import open_image
from ..extraction import ExtractionRanks, extract_action
from ..generation import FlexiActGenerator, GenerationResult

OOM_MESSAGE = ("The GPU ran out of memory. Close other programs using the GPU, or restart the backend with "
               "--memory-saving (offloads idle parts of the model to the CPU), then submit the job again.")
#: Extraction progress below this fraction is preparation (decoding, caching latents); the rest is training.
PREP_SHARE = 0.02

ProgressHook = Callable[..., None]


#: Where an extraction writes its preview videos, inside its work folder (the service collects them from there).
PREVIEWS_DIR = "previews"


@dataclass(frozen=True)
class Hooks:
    """How a running job talks to whoever runs it: `progress(phase=, progress=, step=, total=, eta_s=)`,
    `cancel()` checked between steps, `pause()` checked right after each extraction checkpoint, `finish()`
    checked after each extraction step (the action is written from the tokens so far)."""

    progress: ProgressHook
    cancel: Callable[[], bool]
    pause: Callable[[], bool]
    finish: Callable[[], bool] = lambda: False


def take_path(out: Path, take: int) -> Path:
    """Where take `take` of a generation is written: `out` itself for the first, a sibling for the others."""
    return out if take == 0 else out.with_name(f"{out.stem}-take{take}{out.suffix}")


def preview_path(work_dir: Path, step: int) -> Path:
    """The preview an extraction rendered at `step`."""
    return work_dir / PREVIEWS_DIR / f"step_{step:06d}.mp4"


def resolve_devices(requested: tuple[str, ...]) -> list[str]:
    """The devices to run workers on: as requested, else every CUDA device, else the CPU."""
    if requested:
        return list(requested)
    if torch.cuda.is_available():
        return [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    return ["cpu"]


def is_cuda_failure(exc: BaseException) -> bool:
    """A CUDA error (not an out-of-memory) leaves the device's context unusable: the worker must restart."""
    return isinstance(exc, RuntimeError) and not isinstance(exc, torch.cuda.OutOfMemoryError) and (
        "CUDA error" in str(exc) or "CUBLAS_STATUS" in str(exc) or "cuDNN error" in str(exc))


class JobRunner:
    """A warm generator plus the two job kinds the service queues."""

    def __init__(self, generator: FlexiActGenerator, *, checkpoint_every: int) -> None:
        self.generator = generator
        self.checkpoint_every = checkpoint_every

    @classmethod
    def load(cls, model_dir: Path, device: str, *, checkpoint_every: int, refadapter: Path | None = None,
             memory_saving: bool = False, compile: bool = False) -> JobRunner:
        generator = FlexiActGenerator.from_pretrained(model_dir, device=device, refadapter=refadapter,
                                                      memory_saving=memory_saving, compile=compile)
        return cls(generator, checkpoint_every=checkpoint_every)

    def run(self, kind: str, params: dict, inputs: dict[str, Path | None], work_dir: Path | None, out: Path,
            hooks: Hooks) -> dict:
        """Run a job of `kind` ('generate' or 'extract'), write its output to `out`, return its result fields.

        A generation of several takes also writes take i to `take_path(out, i)`; an extraction writes its
        previews to `preview_path(work_dir, step)`.
        """
        if kind == "generate":
            return self.generate(params, inputs["image"], inputs.get("action"), out, hooks)  # type: ignore[arg-type]
        assert work_dir is not None, "an extraction needs a work folder"
        return self.extract(params, inputs["video"], work_dir, out, hooks,  # type: ignore[arg-type]
                            preview_image=inputs.get("preview_image"))

    def generate(self, p: dict, image_path: Path, action_path: Path | None, out: Path, hooks: Hooks, *,
                 leader: bool = True) -> dict:
        """One mp4 per take at the requested fps (`take_path(out, i)`); returns what the job's result adds.

        On a rank of a multi-rank job other than the leader, nothing is written and nothing returned."""
        hooks.progress(phase="loading", progress=0.0, step=None, total=1, eta_s=None)

        def progress(step: int, total: int, elapsed: float) -> None:
            eta = elapsed / step * (total - step) if step else None
            hooks.progress(phase="denoising", progress=0.95 * step / total, step=step, total=total, eta_s=eta)

        image = open_image(image_path)  # the opener that accepted the upload: EXR, TIFF ... work here too
        results = self.generator.generate_takes(
            image, p["prompt"], seeds=p.get("seeds") or [p["seed"]], action=action_path, steps=p["steps"],
            guidance_scale=p["guidance_scale"], lora_weight=p["lora_weight"], reweight_scale=p["reweight_scale"],
            transition=p["transition"], fit=p["fit"], tempo=p.get("tempo", "reference"),
            step_cache=p.get("step_cache", False), progress=progress,
            cancel=hooks.cancel)
        if not leader:
            return {}
        hooks.progress(phase="encoding", progress=0.95, step=None, total=1, eta_s=None)
        fps = p["fps"] or results[0].fps
        for i, result in enumerate(results):
            result.write_mp4(take_path(out, i), fps=fps)
        first = results[0]
        return {"requested_fps": fps, "model_fps": first.fps, "model_frames": int(first.frames.shape[0]),
                "tempo": first.settings.tempo, "lora_weight": first.settings.lora_weight,
                "refadapter": first.settings.refadapter, "fit": first.fit.to_dict(), "seconds": sum(r.seconds for r in results),
                "takes": [{"seed": r.settings.seed, "seconds": r.seconds, "batch": r.batch} for r in results]}

    def extract(self, p: dict, video_path: Path, work_dir: Path, out: Path, hooks: Hooks, *,
                preview_image: Path | None = None, ranks: ExtractionRanks | None = None) -> dict:
        """Train the action into `out`, resuming from a checkpoint in `work_dir`; returns its metadata.

        `ranks`: this process is one rank of a multi-rank extraction (only the leader writes `out`).
        Previews (every `preview_every` steps; None: at each checkpoint) go to `preview_path(work_dir, step)`.
        """
        total = int(p["steps"])
        first_step: list[int] = []

        def progress(d: dict) -> None:
            step, phase_total = int(d.get("step") or 0), int(d.get("total") or 0)
            training = phase_total == total
            if d.get("phase") == "training" and not first_step:
                first_step.append(step)
            share = (PREP_SHARE + (1 - PREP_SHARE) * step / total) if training else (
                PREP_SHARE * step / phase_total if phase_total else 0.0)
            hooks.progress(phase=str(d.get("phase") or "extracting"), progress=share,
                           step=step if training else None, total=phase_total, eta_s=d.get("eta_s"))

        def preview(step: int, result: GenerationResult) -> None:
            path = preview_path(work_dir, step)
            path.parent.mkdir(parents=True, exist_ok=True)
            result.write_mp4(path)  # atomic: a collector never sees half a preview

        image = open_image(preview_image) if preview_image is not None else None
        every = p.get("preview_every")
        started = time.monotonic()
        meta = extract_action(
            self.generator, video=video_path, start_s=p["start_s"], end_s=p["end_s"], caption=p["caption"],
            name=p["name"], out=out, work_dir=work_dir, steps=total, seed=p["seed"],
            checkpoint_every=self.checkpoint_every, progress=progress, cancel=hooks.cancel, pause=hooks.pause,
            finish=hooks.finish, preview=preview, preview_every=self.checkpoint_every if every is None else every,
            preview_image=image, windows_per_step=p.get("windows_per_step", 1), ranks=ranks)
        meta.pop("losses", None)  # every step's loss: too long for the action's JSON
        # the first training report is step k+1 when the run resumed from a checkpoint at step k
        resumed_from = first_step[0] - 1 if first_step else total
        return {"meta": meta, "resumed_from": resumed_from, "seconds": time.monotonic() - started}
