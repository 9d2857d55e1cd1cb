"""FAE action extraction: train one clip's motion tokens, resumable, observable and without wasted compute.

The objective is the FlexiAct authors' FAE training objective: v-prediction turned into x0, `w(t) = 1/(1 - alphas_cumprod[t])` weighted MSE,
plus the temporal term (ratio 1.0) on `sqrt(2)*x[i+1] - x[i]` of a random latent frame pair; uniform timesteps,
image-latent dropout 0.05, caption dropout 0.1, RefAdapter off, AdamW (3e-3, betas 0.9/0.95, wd 1e-4),
grad-norm clip 1.0. The trim is taken at the model's frame rate (`augmentation`): each step trains on one of a
bounded set of model-length windows of one of 12 aspect-preserving crops. Their VAE latents and the caption's
(and the empty caption's) T5 embeddings are computed once and cached on disk; only the tokens train, checkpoints
are atomic and carry the RNG state, so a resumed run ends with the same tokens.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from PIL import Image
from safetensors.torch import load_file, save_file
from torch import nn

from .actions import write_action
from .atomic import write_atomically
from .augmentation import crop_boxes, crop_frames, plan_sampling, window_starts
from .errors import Cancelled, FlexiActError, Paused
from .generation import FlexiActGenerator, GenerationResult, vae_tiling_state
from .media import check_trim, probe_video, read_clip
from .presets import GENERATION_DEFAULTS, PRESETS
from .model import rotary_embeddings

CHECKPOINT_NAME = "checkpoint.pt"
#: Bumped whenever what the latent cache holds changes, so an older cache is never read as a newer one.
CACHE_RECIPE = "windows-v2"
#: Denoising steps of a preview: enough to see the motion, a small share of the extraction's time.
PREVIEW_STEPS = 10

ProgressFn = Callable[[dict], None]
StopFn = Callable[[], bool]
PreviewFn = Callable[[int, GenerationResult], None]


@dataclass(frozen=True)
class ExtractionConfig:
    """The authors' FAE training recipe; every field is recorded in the action's metadata."""

    steps: int = PRESETS["standard"]
    seed: int = 0
    lr: float = 3e-3
    betas: tuple[float, float] = (0.9, 0.95)
    weight_decay: float = 1e-4
    eps: float = 1e-8
    grad_clip: float = 1.0
    image_dropout: float = 0.05
    caption_dropout: float = 0.1
    temporal_ratio: float = 1.0
    num_crops: int = 12
    windows_per_crop: int = 4
    checkpoint_every: int = 500
    #: Training windows per step, their gradients averaged: 1 is the authors' batch 1 on one GPU; N is their
    #: N-GPU data-parallel run (one window per GPU), computed on however many ranks the job has.
    windows_per_step: int = 1


@dataclass
class TrainingData:
    """Cached inputs: latents [crops, windows, F, C, h, w], each window's first-frame latent [crops, windows, 1,
    C, h, w], and the T5 embeddings of the caption and of the empty caption (for caption dropout)."""

    latents: torch.Tensor
    image_latents: torch.Tensor
    prompt_embeds: torch.Tensor
    empty_prompt_embeds: torch.Tensor


@dataclass(frozen=True)
class StepDraw:
    """The random choices of one training step, drawn in a fixed order from the trainer's generator."""

    crop: int
    window: int
    timestep: int
    noise: torch.Tensor
    drop_image: bool
    drop_caption: bool
    frame: int


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@contextmanager
def moved(modules: Sequence[nn.Module], devices: Sequence[str | torch.device]) -> Iterator[list[torch.device]]:
    """Put each module on its device for the block (yielding where they were), and back afterwards.

    Why: the VAE and text encoder stay off the compute device while the loop trains, and come back for a preview.
    """
    before = [next(m.parameters()).device for m in modules]
    for m, d in zip(modules, devices, strict=True):
        m.to(d)
    try:
        yield before
    finally:
        for m, d in zip(modules, before):
            m.to(d)


def render_preview(generator: FlexiActGenerator, image: Image.Image, caption: str, *, seed: int,
                   steps: int = PREVIEW_STEPS) -> GenerationResult:
    """A short generation with the motion tokens as trained so far, RefAdapter and reweighting as in a real one.

    The tokens are used in place (not copied out and back); the RefAdapter and the bias are scoped to the
    generation, and the trainer's RNG is untouched, so previews never change what the extraction learns. Without a
    loaded RefAdapter (an extraction does not need one) the preview runs at RefAdapter weight 0 and says so.
    """
    lora_weight = GENERATION_DEFAULTS.lora_weight if generator.refadapter is not None else 0.0  # as generation runs
    return generator.generate(image, caption, action=generator.adapter.action_state_dict(), seed=seed, steps=steps,
                              lora_weight=lora_weight)


def encode_video(generator: FlexiActGenerator, crop: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """VAE latents of one clip [F, C, h, w] and of its frame 0 [1, C, h, w] (the conditioning image)."""
    vae = generator.pipe.vae
    pixels = torch.from_numpy(crop).to(generator.device, vae.dtype).permute(3, 0, 1, 2).unsqueeze(0) / 127.5 - 1.0
    with torch.no_grad():
        latents = vae.encode(pixels).latent_dist.sample() * vae.config.scaling_factor
        image = vae.encode(pixels[:, :, :1]).latent_dist.sample() * vae.config.scaling_factor
    return latents.permute(0, 2, 1, 3, 4)[0].float().cpu(), image.permute(0, 2, 1, 3, 4)[0].float().cpu()


def prepare_training_data(
    generator: FlexiActGenerator, *, video: Path, clip_sha256: str, start_s: float, end_s: float, caption: str,
    seed: int, num_crops: int, windows_per_crop: int, cache_dir: Path, progress: ProgressFn | None = None,
) -> tuple[TrainingData, dict]:
    """Latents of the crops' windows and the caption embeddings, from the cache when this input was seen.

    Returns the data and what was sampled: `duration_s` of the motion, `sampled_frames`, the crop boxes and
    each crop's window start times (seconds from the trim start).
    """
    info = generator.info
    start, end = check_trim(probe_video(video), start_s, end_s)
    sampling = plan_sampling(start, end, info.frames, info.fps)
    key = hashlib.sha256(repr((CACHE_RECIPE, clip_sha256, sampling, seed, num_crops, windows_per_crop, info.id,
                               info.width, info.height, info.frames, info.fps, caption,
                               vae_tiling_state(generator.pipe.vae))).encode()).hexdigest()[:32]
    cache = cache_dir / f"{key}.safetensors"
    if cache.is_file():
        with safe_open(str(cache), framework="pt") as f:
            described = json.loads(f.metadata()["sampled"])
        return TrainingData(**load_file(str(cache))), {"cache": key, "cache_hit": True, **described}
    if progress:
        progress({"phase": "decoding"})
    # Crops are at least sqrt(MIN_CROP_AREA) of the frame's side before the resize to the model's size, so
    # decoding at twice the model's longest side loses nothing and bounds the memory of long 4K trims.
    frames = read_clip(video, sampling.start_s, sampling.end_s, sampling.num_frames, max_side=2 * max(info.width, info.height))
    size = (info.width, info.height)
    boxes = crop_boxes((frames.shape[2], frames.shape[1]), num_crops, size, seed)
    rng = np.random.default_rng([seed, 1])
    starts = [window_starts(len(frames), info.frames, windows_per_crop, rng) for _ in boxes]
    if progress:
        progress({"phase": "encoding"})
    torch.manual_seed(seed)
    latents, images = [], []
    for box, crop_starts in zip(boxes, starts):  # every crop has as many windows: min(windows_per_crop, positions)
        encoded = [encode_video(generator, crop_frames(frames[s : s + info.frames], box, size)) for s in crop_starts]
        latents.append(torch.stack([e[0] for e in encoded]))
        images.append(torch.stack([e[1] for e in encoded]))
    with torch.no_grad():
        embeds = [generator.pipe.encode_prompt(text, do_classifier_free_guidance=False, max_sequence_length=info.text_length,
                                               device=generator.device)[0].float().cpu() for text in (caption, "")]
    data = TrainingData(torch.stack(latents), torch.stack(images), *embeds)
    period = (sampling.end_s - sampling.start_s) / sampling.num_frames
    described = {"duration_s": sampling.duration_s, "sampled_frames": sampling.num_frames, "windowed": sampling.windowed,
                 "frame_size": [int(frames.shape[2]), int(frames.shape[1])], "crops": [asdict(b) for b in boxes],
                 "windows": [[round(s * period, 6) for s in crop_starts] for crop_starts in starts]}
    write_atomically(cache, lambda tmp: save_file({k: v.contiguous() for k, v in asdict(data).items()}, tmp,
                                                  metadata={"sampled": json.dumps(described)}))
    return data, {"cache": key, "cache_hit": False, **described}


class FAETrainer:
    """One extraction's training state: tokens, optimizer and RNG, saved and restored as a whole."""

    def __init__(self, generator: FlexiActGenerator, data: TrainingData, config: ExtractionConfig) -> None:
        self.generator, self.data, self.config = generator, data, config
        self.adapter = generator.adapter
        self.device = generator.device
        self.dtype = generator.pipe.transformer.dtype
        self.params = self.adapter.motion_parameters()
        # Fused AdamW (one kernel for all 42 token tensors) where CUDA has it; the default elsewhere.
        self.optimizer = torch.optim.AdamW(self.params, lr=config.lr, betas=config.betas, weight_decay=config.weight_decay, eps=config.eps,
                                           fused=True if self.device.type == "cuda" else None)
        self.rng = torch.Generator("cpu").manual_seed(config.seed)
        self.step = 0
        self.losses: list[float] = []
        scheduler = generator.pipe.scheduler
        self.alphas_cumprod = scheduler.alphas_cumprod.to(self.device, torch.float32)
        self.num_train_timesteps = scheduler.config.num_train_timesteps
        frames, _, h, w = data.latents.shape[2:]
        height, width = h * generator.pipe.vae_scale_factor_spatial, w * generator.pipe.vae_scale_factor_spatial
        use_rope = generator.pipe.transformer.config.use_rotary_positional_embeddings
        self.rotary = rotary_embeddings(generator.pipe.transformer, height, width, frames, generator.pipe.vae_scale_factor_spatial, self.device) if use_rope else None

    # ---- checkpoints -------------------------------------------------------------------------------------------
    def state(self) -> dict:
        return {
            "step": self.step,
            "tokens": [p.detach().cpu().clone() for p in self.params],
            "optimizer": self.optimizer.state_dict(),
            "rng": self.rng.get_state(),
            "losses": list(self.losses),
        }

    def save(self, path: Path) -> None:
        write_atomically(path, lambda tmp: torch.save(self.state(), tmp))

    def load(self, path: Path) -> None:
        state = torch.load(path, map_location="cpu", weights_only=True)
        with torch.no_grad():
            for p, t in zip(self.params, state["tokens"], strict=True):
                p.copy_(t.to(p.device, p.dtype))
        self.optimizer.load_state_dict(state["optimizer"])
        self.rng.set_state(state["rng"])
        self.step = int(state["step"])
        self.losses = [float(x) for x in state["losses"]]

    # ---- one step ----------------------------------------------------------------------------------------------
    def draw(self) -> StepDraw:
        """One step's random choices: crop, window, timestep, noise, image and caption dropout, temporal pair."""
        cfg, shape = self.config, self.data.latents.shape  # [crops, windows, F, C, h, w]
        return StepDraw(
            crop=int(torch.randint(shape[0], (1,), generator=self.rng)),
            window=int(torch.randint(shape[1], (1,), generator=self.rng)),
            timestep=int(torch.randint(self.num_train_timesteps, (1,), generator=self.rng)),
            noise=torch.randn(shape[2:], generator=self.rng).unsqueeze(0),
            drop_image=bool(torch.rand((), generator=self.rng) < cfg.image_dropout),
            drop_caption=bool(torch.rand((), generator=self.rng) < cfg.caption_dropout),
            frame=int(torch.randint(shape[2] - 1, (1,), generator=self.rng)),
        )

    def loss(self, d: StepDraw) -> torch.Tensor:
        """The FAE objective on the window, crop and timestep `d` drew."""
        cfg, data = self.config, self.data
        x0 = data.latents[d.crop, d.window].unsqueeze(0).to(self.device, torch.float32)
        image = data.image_latents[d.crop, d.window].unsqueeze(0).to(self.device, self.dtype)
        # The conditioning image sits in latent frame 0; the other frames are zeros (or all of it, dropped).
        image = torch.cat([image, image.new_zeros(1, x0.shape[1] - 1, *image.shape[2:])], dim=1)
        if d.drop_image:
            image = torch.zeros_like(image)
        text = data.empty_prompt_embeds if d.drop_caption else data.prompt_embeds
        a = self.alphas_cumprod[d.timestep]
        noisy = a.sqrt() * x0 + (1 - a).sqrt() * d.noise.to(self.device)
        v = self.generator.pipe.transformer(
            hidden_states=torch.cat([noisy.to(self.dtype), image], dim=2),
            encoder_hidden_states=text.to(self.device, self.dtype),
            timestep=torch.tensor([d.timestep], device=self.device),
            image_rotary_emb=self.rotary,
            return_dict=False,
        )[0].float()
        x0_pred = a.sqrt() * noisy - (1 - a).sqrt() * v
        loss = torch.mean((x0_pred - x0) ** 2) / (1 - a)
        if cfg.temporal_ratio:
            diff = lambda x: math.sqrt(2) * x[:, d.frame + 1] - x[:, d.frame]  # noqa: E731
            loss = loss + cfg.temporal_ratio * torch.mean((diff(x0_pred) - diff(x0)) ** 2)
        return loss

    def own_draws(self, draws: list[StepDraw]) -> list[StepDraw]:
        """The step's windows this process computes (all of them; a data-parallel rank computes its share)."""
        return draws

    def reduce(self, loss: torch.Tensor) -> torch.Tensor:
        """Combine the gradients and the loss of every process's windows (nothing to combine in one process)."""
        return loss

    def train_step(self) -> float:
        """One optimizer step on the mean loss of `windows_per_step` windows, all drawn in order from one generator."""
        self.optimizer.zero_grad(set_to_none=True)
        draws = [self.draw() for _ in range(self.config.windows_per_step)]
        total = torch.zeros((), device=self.device)
        for d in self.own_draws(draws):  # one backward per window: the memory of one
            loss = self.loss(d) / len(draws)
            loss.backward()
            total += loss.detach()
        total = self.reduce(total)
        torch.nn.utils.clip_grad_norm_(self.params, self.config.grad_clip)
        self.optimizer.step()
        self.step += 1
        value = total.item()
        self.losses.append(value)
        return value


class ExtractionRanks:
    """How the processes of one extraction work together; this base is the usual single process.

    `parallel.extraction` derives the multi-rank kinds (sequence- and data-parallel). Every rank runs
    `extract_action`; the leader alone reports, previews and writes files, and its stop wishes reach every rank.
    """

    leader = True

    def trainer(self, generator: FlexiActGenerator, data: TrainingData, config: ExtractionConfig) -> FAETrainer:
        return FAETrainer(generator, data, config)

    def training(self, generator: FlexiActGenerator) -> AbstractContextManager:
        """Around the training loop and its previews (where a sequence-parallel job installs its hooks)."""
        return nullcontext()

    def agree(self, flag: bool) -> bool:
        """The leader's `flag`, on every rank."""
        return flag

    def leader_first(self, fn: Callable[[], object]) -> object:
        """`fn()` on the leader, then on the others (which then find its cache)."""
        return fn()


def extract_action(
    generator: FlexiActGenerator,
    *,
    video: str | Path,
    start_s: float,
    end_s: float,
    caption: str,
    name: str,
    out: str | Path,
    work_dir: str | Path,
    steps: int = PRESETS["standard"],
    seed: int = 0,
    checkpoint_every: int = 500,
    cache_dir: str | Path | None = None,
    progress: ProgressFn | None = None,
    cancel: StopFn | None = None,
    pause: StopFn | None = None,
    finish: StopFn | None = None,
    preview: PreviewFn | None = None,
    preview_every: int = 0,
    preview_image: Image.Image | None = None,
    windows_per_step: int = 1,
    ranks: ExtractionRanks | None = None,
) -> dict:
    """Train an action on `video[start_s:end_s]` and write it to `out`; returns the action's metadata.

    The metadata's `duration_s` is how long the learned motion lasts: the trim's length when it is shorter than
    the model's clip, else the model's clip length (the action is learned from windows of that length).

    A checkpoint in `work_dir` is resumed from automatically. `cancel()` is checked between steps (raises
    Cancelled, the last checkpoint kept); `pause()` right after each checkpoint (raises Paused; call again
    to resume); `finish()` after each step and its preview: the action is written from the tokens as they are
    (`steps_trained` in the metadata says how far it got). `progress` receives dicts with phase, step, total,
    loss (smoothed), steps_per_s, eta_s. Every `preview_every` steps (0: never) `preview(step, result)` gets
    a `render_preview` of `preview_image` (default: the trim's first frame). `windows_per_step` windows train
    each step (their mean loss); `ranks` is given when this process is one rank of a multi-rank extraction.
    """
    ranks = ranks or ExtractionRanks()
    config = ExtractionConfig(steps=steps, seed=seed, checkpoint_every=max(1, checkpoint_every),
                              windows_per_step=windows_per_step)
    work_dir = Path(work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    video = Path(video)
    clip_sha = file_sha256(video)
    report = (progress if ranks.leader else None) or (lambda _: None)
    if windows_per_step < 1:
        raise FlexiActError(f"windows_per_step is {windows_per_step}: give 1 or more windows per step")
    if preview_every < 0:
        raise FlexiActError(f"preview_every is {preview_every}: give 0 (no previews) or a number of steps")
    previewing = ranks.agree(preview is not None and preview_every > 0)  # every rank renders, the leader reports
    if previewing and preview_image is None:
        preview_image = Image.fromarray(read_clip(video, start_s, end_s, 1)[0])
    with generator.lock:
        data, data_info = ranks.leader_first(lambda: prepare_training_data(
            generator, video=video, clip_sha256=clip_sha, start_s=start_s, end_s=end_s, caption=caption, seed=seed,
            num_crops=config.num_crops, windows_per_crop=config.windows_per_crop,
            cache_dir=Path(cache_dir) if cache_dir else work_dir / "cache", progress=report,
        ))
        adapter = generator.adapter
        adapter.reset_action()  # RefAdapter off and no bias: the training forward passes no attention_kwargs
        transformer = generator.pipe.transformer
        trainer = ranks.trainer(generator, data, config)
        checkpoint = work_dir / CHECKPOINT_NAME
        if checkpoint.is_file():
            trainer.load(checkpoint)
        resumed_at = trainer.step
        transformer.requires_grad_(False)  # only the tokens train: no weight may cost a gradient
        for p in trainer.params:
            p.requires_grad_(True)
        transformer.enable_gradient_checkpointing()
        started, smoothed = time.monotonic(), None
        idle = (generator.pipe.vae, generator.pipe.text_encoder)
        try:
            with moved(idle, ["cpu"] * len(idle)) as home, ranks.training(generator):
                while trainer.step < config.steps:
                    if ranks.agree(cancel is not None and cancel()):
                        raise Cancelled(f"extraction cancelled at step {trainer.step} of {config.steps}; last checkpoint kept")
                    loss = trainer.train_step()
                    smoothed = loss if smoothed is None else 0.9 * smoothed + 0.1 * loss
                    rate = (trainer.step - resumed_at) / max(time.monotonic() - started, 1e-9)
                    report({"phase": "training", "step": trainer.step, "total": config.steps, "loss": smoothed,
                            "steps_per_s": rate, "eta_s": (config.steps - trainer.step) / rate if rate else None})
                    if previewing and trainer.step % preview_every == 0:
                        report({"phase": "previewing", "step": trainer.step, "total": config.steps})
                        with moved(idle, home):
                            result = render_preview(generator, preview_image, caption, seed=seed)
                        if preview is not None and ranks.leader:
                            preview(trainer.step, result)
                    # After the step's preview: an action finished at a preview step always has that preview.
                    if ranks.agree(finish is not None and finish()):
                        break
                    if trainer.step % config.checkpoint_every == 0 and trainer.step < config.steps:
                        if ranks.leader:
                            trainer.save(checkpoint)
                        if ranks.agree(pause is not None and pause()):
                            raise Paused(f"extraction paused at step {trainer.step}; it resumes from this checkpoint")
            if ranks.leader:
                trainer.save(checkpoint)
        finally:
            for p in trainer.params:
                p.requires_grad_(False)
                p.grad = None
            transformer.disable_gradient_checkpointing()
        report({"phase": "saving", "step": trainer.step, "total": config.steps})
        tail = trainer.losses[-max(1, len(trainer.losses) // 5):]
        metadata = {
            "name": name, "caption": caption, "clip_sha256": clip_sha, "trim": [start_s, end_s], "steps": config.steps,
            "steps_trained": trainer.step, "seed": seed, "final_loss": float(np.mean(tail)) if tail else None,
            "base_model": generator.info.id, "source": "extracted", "config": asdict(config),
            "duration_s": data_info["duration_s"],
            "sampling": {k: data_info[k] for k in ("sampled_frames", "windowed", "frame_size", "crops", "windows")},
        }
        if ranks.leader:
            write_action(out, adapter.action_state_dict(), metadata)
        return {**metadata, "losses": trainer.losses}
