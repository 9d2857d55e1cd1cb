"""The job workers: one thread per compute device, each with its generator loaded once and kept warm.

Why threads in the server process: the pipeline is loaded once per device and must stay warm between
jobs; the HTTP side only reads and writes the database, so it stays responsive while a job runs.
Generations go ahead of extractions: a running extraction is asked to pause at its next checkpoint when
a generation is waiting and no worker is idle, and is re-queued; it resumes from that checkpoint.
"""

from __future__ import annotations

import errno
import logging
import shutil
import threading
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import torch
from PIL import Image

from .. import media
from ..errors import Cancelled, FlexiActError, Paused
from ..extraction import extract_action
from ..generation import FlexiActGenerator
from ..model_info import ModelInfo
from .config import ServiceConfig
from .db import Database
from .storage import FileStore

log = logging.getLogger("flexiact.service")

OOM_MESSAGE = ("The GPU ran out of memory. Close other programs using the GPU, or restart the backend with "
               "--memory-saving (offloads idle parts of the model to the CPU), then submit the job again.")
DISK_FULL_MESSAGE = ("The server's disk filled up while this job wrote its result; nothing partial was kept. "
                     "Free space on the server (or run `flexiact-backend gc`), then submit the job again.")
#: Extraction progress below this fraction is preparation (decoding, caching latents); the rest is training.
PREP_SHARE = 0.02
#: The database is written at most this often per job (and always on a phase change or the last step).
PROGRESS_INTERVAL_S = 0.2


def resolve_devices(requested: tuple[str, ...]) -> list[str]:
    """The devices to run workers on: as requested, else every CUDA device, else the CPU."""
    if requested:
        return list(requested)
    if torch.cuda.is_available():
        return [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    return ["cpu"]


def work_dir(data_dir: Path, action_id: str) -> Path:
    """Where an action's extraction keeps its caches and checkpoints; a retry of the same action resumes here."""
    return Path(data_dir) / "work" / action_id


class WorkerPool:
    """Owns the worker threads and what the HTTP side needs to know about them."""

    def __init__(self, config: ServiceConfig, db: Database, store: FileStore, model_dir: Path, info: ModelInfo,
                 *, memory_saving: bool = False, refadapter: Path | None = None) -> None:
        self.config, self.db, self.store = config, db, store
        self.model_dir, self.info = model_dir, info
        self.memory_saving, self.refadapter = memory_saving, refadapter
        self.devices = resolve_devices(config.devices)
        self.loaded = threading.Event()
        self.load_error: str | None = None
        self._wake = threading.Condition()
        self._idle = 0
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []

    def start(self) -> None:
        for device in self.devices:
            t = threading.Thread(target=self._run, args=(device,), name=f"flexiact-worker-{device}", daemon=True)
            t.start()
            self._threads.append(t)

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        self.wake()
        for t in self._threads:
            t.join(timeout)

    def wake(self) -> None:
        """Tell idle workers that a job was queued."""
        with self._wake:
            self._wake.notify_all()

    def should_pause_extraction(self) -> bool:
        """True when a generation waits and every worker is busy: the extraction yields at this checkpoint."""
        return self._idle == 0 and self.db.generation_queued()

    def device_health(self) -> dict:
        device = self.devices[0]
        if device.startswith("cuda") and torch.cuda.is_available():
            return {"type": "cuda", "name": torch.cuda.get_device_name(torch.device(device))}
        return {"type": torch.device(device).type, "name": device}

    # ---- the worker thread -------------------------------------------------------------------
    def _run(self, device: str) -> None:
        try:
            generator = FlexiActGenerator.from_pretrained(
                self.model_dir, device=device, refadapter=self.refadapter, memory_saving=self.memory_saving)
        except Exception as exc:  # the server keeps answering and says why in /v1/health
            log.exception("loading the model on %s failed", device)
            self.load_error = f"loading the model on {device} failed: {type(exc).__name__}: {exc}"
            return
        self.loaded.set()
        while not self._stop.is_set():
            job = self._next_job()
            if job is not None:
                self._run_job(generator, job)

    def _next_job(self) -> dict | None:
        with self._wake:
            job = self.db.claim_next()
            if job is None:
                self._idle += 1
                try:
                    self._wake.wait(timeout=1.0)
                finally:
                    self._idle -= 1
            return job

    def _run_job(self, generator: FlexiActGenerator, job: dict) -> None:
        job_id = job["id"]
        try:
            if job["kind"] == "generate":
                self._generate(generator, job)
            else:
                self._extract(generator, job)
        except Paused:
            self.db.requeue(job_id, "paused")
            self.wake()
        except Cancelled:
            self.db.fail_job(job_id, "cancelled", "cancelled", "cancelled by request")
        except torch.cuda.OutOfMemoryError:
            self.db.fail_job(job_id, "failed", "out_of_memory", OOM_MESSAGE)
            torch.cuda.empty_cache()
        except FlexiActError as exc:
            self.db.fail_job(job_id, "failed", exc.code, str(exc))
        except Exception as exc:  # a bug or an environment problem: the job fails, the worker lives on
            log.error("job %s failed:\n%s", job_id, traceback.format_exc())
            if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
                self.db.fail_job(job_id, "failed", "insufficient_storage", DISK_FULL_MESSAGE)
            else:
                self.db.fail_job(job_id, "failed", "internal_error", f"{type(exc).__name__}: {exc}")
        finally:
            if job["kind"] == "extract" and job["action"] and self.db.get_action(job["action"]) is None:
                shutil.rmtree(work_dir(self.config.data_dir, job["action"]), ignore_errors=True)

    def _reporter(self, job_id: str) -> Callable[..., None]:
        """A throttled progress writer: phase changes and the final step are always recorded."""
        state = {"t": 0.0, "phase": None}

        def report(*, phase: str, progress: float, step: int | None, total: int, eta_s: float | None) -> None:
            now = time.monotonic()
            if phase == state["phase"] and now - state["t"] < PROGRESS_INTERVAL_S and (step or 0) < total:
                return
            state["t"], state["phase"] = now, phase
            self.db.update_progress(job_id, phase=phase, progress=progress, step=step, eta_s=eta_s)

        return report

    def _generate(self, generator: FlexiActGenerator, job: dict) -> None:
        job_id, p = job["id"], job["params"]
        image_file = self.db.get_file(p["image"])
        if image_file is None:
            raise FlexiActError(f"the image {p['image']} is no longer on the server; upload it again")
        action_path = None
        if p.get("action"):
            action = self.db.get_action(p["action"])
            if action is None or action["status"] != "ready":
                raise FlexiActError(f"the action {p['action']} was deleted or is not ready; choose another")
            action_path = self.store.path(self.store.relpath(action["file"], ".safetensors"))
        report = self._reporter(job_id)
        report(phase="loading", progress=0.0, step=None, total=1, eta_s=None)

        def progress(step: int, total: int, elapsed: float) -> None:
            eta = elapsed / step * (total - step) if step else None
            report(phase="denoising", progress=0.95 * step / total, step=step, total=total, eta_s=eta)

        with Image.open(self.store.path(image_file["path"])) as img:
            image = img.copy()
        result = generator.generate(
            image, p["prompt"], action=action_path, seed=p["seed"], steps=p["steps"],
            guidance_scale=p["guidance_scale"], lora_weight=p["lora_weight"], reweight_scale=p["reweight_scale"],
            transition=p["transition"], fit=p["fit"], progress=progress,
            cancel=lambda: self.db.cancel_requested(job_id))
        report(phase="encoding", progress=0.95, step=None, total=1, eta_s=None)
        fps = p["fps"] or result.fps
        tmp = self.store.tmp_path(".mp4")
        try:
            result.write_mp4(tmp, fps=fps)
            info = media.probe_video(tmp)
            sha, rel, size = self.store.adopt(tmp)
        finally:
            tmp.unlink(missing_ok=True)
        meta = {"width": info.width, "height": info.height, "fps": info.fps, "duration_s": info.duration_s,
                "frames": info.frames}
        self.db.add_file(sha, "video", size, rel, f"{job_id}.mp4", meta)
        self.db.finish_job(job_id, {
            "video": sha, "url": f"/v1/jobs/{job_id}/video", **meta, "requested_fps": fps,
            "model_fps": result.fps, "model_frames": int(result.frames.shape[0]), "fit": result.fit.to_dict(),
            "seconds": result.seconds})

    def _extract(self, generator: FlexiActGenerator, job: dict) -> None:
        job_id, p = job["id"], job["params"]
        video_file = self.db.get_file(p["video"])
        if video_file is None:
            raise FlexiActError(f"the video {p['video']} is no longer on the server; upload it again")
        wd = work_dir(self.config.data_dir, job["action"])
        wd.mkdir(parents=True, exist_ok=True)
        out = wd / "action.safetensors"
        total = int(p["steps"])
        report = self._reporter(job_id)

        def progress(d: dict) -> None:
            step, phase_total = int(d.get("step") or 0), int(d.get("total") or 0)
            training = phase_total == total
            share = (PREP_SHARE + (1 - PREP_SHARE) * step / total) if training else (
                PREP_SHARE * step / phase_total if phase_total else 0.0)
            report(phase=str(d.get("phase") or "extracting"), progress=share, step=step if training else None,
                   total=phase_total, eta_s=d.get("eta_s"))

        meta = extract_action(
            generator, video=self.store.path(video_file["path"]), start_s=p["start_s"], end_s=p["end_s"],
            caption=p["caption"], name=p["name"], out=out, work_dir=wd / "train", steps=total, seed=p["seed"],
            checkpoint_every=self.config.checkpoint_every, progress=progress,
            cancel=lambda: self.db.cancel_requested(job_id), pause=self.should_pause_extraction)
        meta.pop("losses", None)  # every step's loss: too long for the action's JSON
        sha, _rel, _size = self.store.adopt(out)
        self.db.finish_job(job_id, {"action": job["action"], "file": sha, "final_loss": meta.get("final_loss")},
                           action_update={"file": sha, "meta": meta})
        shutil.rmtree(wd, ignore_errors=True)
