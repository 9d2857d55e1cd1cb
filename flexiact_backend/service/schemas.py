"""Request and response models of the HTTP API; they are what /openapi.json publishes to the add-on."""

from __future__ import annotations

import unicodedata
from typing import Annotated, Any, Literal

from fastapi import Path as PathParam
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, computed_field, model_validator

from ..options import EXTRACTION_MODES
from ..presets import GENERATION_DEFAULTS, PRESETS

SHA256_PATTERN = r"^[0-9a-f]{64}$"
UUID_PATTERN = r"^[0-9a-f]{32}$"
#: The longest trim accepted (seconds); a motion clip is a few seconds, a day is clearly a mistake.
MAX_CLIP_S = 86_400.0
JobStatus = Literal["queued", "running", "succeeded", "failed", "cancelled"]
FileId = Annotated[str, PathParam(pattern=SHA256_PATTERN, description="sha256 of the file's content")]
ObjectId = Annotated[str, PathParam(pattern=UUID_PATTERN, description="32 hex digits")]
MAX_TAKES = 8
Seed = Annotated[int, Field(ge=0, le=2**31 - 1)]
#: The most GPUs a request may name; what a server actually runs one job on is checked at submission.
MAX_GPUS = 64
GPUS_FIELD = Field(1, ge=1, le=MAX_GPUS, description="GPUs one job runs on, all on one machine (default 1); more "
                   "than the server's largest machine has is refused with a 422 naming its count. A server without "
                   "GPUs runs that many CPU ranks, at most one per core. Extractions split as `parallel` says; "
                   "generations split the guidance branches and the tokens (the same video)")


class _Request(BaseModel):
    """Requests refuse NaN and infinities (they would reach the model as nonsense) and are strict: "5" is not 5
    and true is not 1, so a client's type mistake is a 422 instead of a guess."""

    model_config = ConfigDict(allow_inf_nan=False, strict=True)


class ErrorBody(BaseModel):
    code: str
    message: str


class ErrorResponse(BaseModel):
    error: ErrorBody


class ModelHealth(BaseModel):
    id: str | None
    tiny: bool
    loaded: bool
    width: int | None
    height: int | None
    frames: int | None
    fps: float | None
    error: str | None = None


class DeviceHealth(BaseModel):
    type: str
    name: str


class QueueHealth(BaseModel):
    queued: int
    running: int


class WorkerHealth(BaseModel):
    id: str
    node: str | None = Field(description="host name (one machine) or the Ray node's IP address (studio)")
    device: str | None = Field(description="e.g. cuda:0 or cpu; null until loaded")
    pid: int | None
    state: Literal["loading", "idle", "busy", "dead"]
    job: str | None = Field(description="the job it runs now")


class DiskHealth(BaseModel):
    free_bytes: int = Field(description="free space on the data dir's disk")
    total_bytes: int
    data_bytes: int = Field(description="what the data dir holds (measured at most every 30 s)")
    min_free_bytes: int = Field(description="below this free space, uploads and jobs are refused with a 507")
    low: bool


class ClusterHealth(BaseModel):
    address: str = Field(description="the Ray cluster's address as given to --ray")
    status: Literal["connecting", "ok", "degraded"] = Field(description="degraded: the cluster is unreachable "
                                                             "(see reason); jobs wait in the queue meanwhile")
    reason: str | None = Field(description="why the cluster is unreachable; null while connected")
    since: float = Field(description="when the status last changed, seconds since the Unix epoch")
    auth: Literal["token", "open"] | None = Field(description="whether the cluster requires Ray's token "
                                                  "authentication; null before the first connection")
    reconnects: int = Field(description="how often the service has reconnected since it started")
    warning: str | None = Field(description="set when the cluster was allowed without token authentication")


class Health(BaseModel):
    """Liveness and version for anyone; the rest only with the token (when the server has one)."""

    status: Literal["ok", "loading", "error", "degraded"] = Field(description="degraded: studio mode's Ray "
                                                                  "cluster is unreachable (cluster.reason)")
    version: str
    model: ModelHealth | None = None
    device: DeviceHealth | None = None
    queue: QueueHealth | None = None
    workers: list[WorkerHealth] | None = None
    presets: dict[str, int] | None = Field(None, description="extraction steps per preset name; clients show "
                                           "these, not their own")
    disk: DiskHealth | None = None
    step_s: dict[str, float | None] | None = Field(None, description="per job kind (extract, generate): seconds "
                                                   "per step measured in the last finished job's step loop "
                                                   "(training, denoising; loading, previews and encoding left out); "
                                                   "null before the first")
    cluster: ClusterHealth | None = Field(None, description="studio mode (--ray): the Ray cluster's connection")


class FileInfo(BaseModel):
    id: str = Field(pattern=SHA256_PATTERN)
    kind: Literal["video", "image", "checkpoint"]
    size: int
    filename: str | None = None
    meta: dict[str, Any]


MAX_NAME_CHARS = 200


def _display_name(value: str) -> str:
    """A name as the add-on's library shows it: trimmed, not blank, no control, format (bidi) or separator
    characters (they hide or reorder what a user reads)."""
    name = value.strip()
    if not name:
        raise ValueError("the name is blank; give the action a name")
    if len(name) > MAX_NAME_CHARS:
        raise ValueError(f"the name is {len(name)} characters long; the limit is {MAX_NAME_CHARS}")
    bad = next((c for c in name if unicodedata.category(c)[0] == "C" or unicodedata.category(c) in ("Zl", "Zp")),
               None)
    if bad is not None:
        raise ValueError(f"the name holds the invisible character U+{ord(bad):04X} "
                         f"({unicodedata.name(bad, 'a control character')}); use printable characters only")
    return name


DisplayName = Annotated[str, Field(min_length=1, max_length=4 * MAX_NAME_CHARS), AfterValidator(_display_name)]


class ActionCreate(_Request):
    name: DisplayName
    caption: str = Field(min_length=1, max_length=2000)
    video: str = Field(pattern=SHA256_PATTERN, description="id of an uploaded video")
    start_s: float = Field(ge=0, le=MAX_CLIP_S)
    end_s: float = Field(gt=0, le=MAX_CLIP_S)
    steps: int = Field(PRESETS["standard"], ge=1, le=100_000)
    seed: int = Field(0, ge=0, le=2**31 - 1)
    preview_every: int | None = Field(
        None, ge=0, le=100_000, description="render a short preview video every this many steps; 0: no previews; "
        "null: at each checkpoint")
    preview_image: str | None = Field(None, pattern=SHA256_PATTERN, description="id of an uploaded image the "
                                      "previews animate; null: the first frame of the trim")
    gpus: int = GPUS_FIELD
    parallel: Literal[EXTRACTION_MODES] = Field(  # type: ignore[valid-type]
        "sequence", description="how an extraction on several GPUs splits its work: 'sequence' shards each step's "
        "tokens (the action one GPU trains, shorter steps); 'data' trains one window per GPU per step, gradients "
        "averaged (the authors' multi-GPU training: a different action, see windows_per_step)")
    windows_per_step: int | None = Field(
        None, ge=1, le=MAX_GPUS, description="windows averaged per training step; null: one, or in 'data' mode one per "
        "GPU. Part of what the action is: the same value gives the same action on any number of GPUs")

    @model_validator(mode="after")
    def _windows_for_every_gpu(self) -> ActionCreate:
        if self.windows_per_step is None:
            self.windows_per_step = self.gpus if self.parallel == "data" else 1
        if self.parallel == "data" and self.windows_per_step < self.gpus:
            raise ValueError(f"parallel 'data' on {self.gpus} GPUs trains at least one window per GPU: "
                             f"windows_per_step must be at least {self.gpus}, not {self.windows_per_step}")
        return self


class ActionRename(_Request):
    name: DisplayName


class ActionImport(_Request):
    name: DisplayName
    caption: str = Field(min_length=1, max_length=2000)
    file: str = Field(pattern=SHA256_PATTERN, description="id of an uploaded published .pt or project safetensors")


class Action(BaseModel):
    id: str
    name: str
    caption: str
    status: Literal["pending", "ready", "failed", "cancelled"]
    source: Literal["extract", "import"]
    video: str | None
    start_s: float | None
    end_s: float | None
    steps: int | None
    seed: int | None
    windows_per_step: int | None = Field(description="windows averaged per training step (extracted actions)")
    base_model: str
    file: str | None = Field(description="sha256 of the action safetensors once ready")
    meta: dict[str, Any]
    job: str | None
    error: ErrorBody | None
    created_at: float = Field(description="seconds since the Unix epoch")

    @computed_field(description="seconds the learned motion lasts in its reference (a trim shorter than the model's "
                                "clip keeps its own length; longer trims and published actions: the model's clip "
                                "length); generations with this action last as long. null until the action is ready")
    @property
    def duration_s(self) -> float | None:
        value = self.meta.get("duration_s")
        return float(value) if isinstance(value, (int, float)) else None


class ActionList(BaseModel):
    actions: list[Action]


class GenerationCreate(_Request):
    action: str | None = Field(None, pattern=UUID_PATTERN, description="a ready action's id; null: no action")
    image: str = Field(pattern=SHA256_PATTERN, description="id of an uploaded target image")
    prompt: str = Field(min_length=1, max_length=2000)
    seed: int = Field(GENERATION_DEFAULTS.seed, ge=0, le=2**31 - 1)
    steps: int = Field(GENERATION_DEFAULTS.steps, ge=1, le=1000)
    guidance_scale: float = Field(GENERATION_DEFAULTS.guidance_scale, ge=0, le=50)
    lora_weight: float = Field(GENERATION_DEFAULTS.lora_weight, ge=0, le=4)
    reweight_scale: float | None = Field(GENERATION_DEFAULTS.reweight_scale, ge=0, le=20,
                                         description="bias on the motion tokens at high-noise "
                                         "steps, as the paper describes; null switches it off, as the authors' "
                                         "released inference script runs")
    high_timesteps: float = Field(
        GENERATION_DEFAULTS.transition, gt=0, le=1000,
        description="where the high-noise (motion) timesteps end: a fraction of 1000 (0.8) or a timestep (800); "
        "the reweighting formula defines 0.7-1 (700-1000), other values are a 422")
    fit: Literal["crop", "pad"] = "crop"
    fps: float | None = Field(None, ge=1, le=240, description="frame rate of the returned video (its duration "
                              "does not depend on it); null: the model's own fps")
    tempo: Literal["reference", "model"] = Field(
        "reference", description="reference: the video lasts the action's duration_s, so the motion plays at the "
        "reference's speed; model: the model's clip length (frames/fps of /v1/health), every generated frame shown")
    step_cache: bool = Field(False, description="reuse transformer work at steps after the reweight window "
                             "(diffusers' TaylorSeer cache); the steps that carry the motion always compute in full")
    takes: int = Field(1, ge=1, le=MAX_TAKES, description="how many videos to make, with seeds seed, seed+1, ...")
    seeds: list[Seed] | None = Field(None, min_length=1, max_length=MAX_TAKES,
                                     description="an explicit seed per take (then `seed` is unused)")
    gpus: int = GPUS_FIELD

    @model_validator(mode="after")
    def _one_seed_per_take(self) -> GenerationCreate:
        if self.seeds is not None:
            if "takes" in self.model_fields_set and self.takes != len(self.seeds):
                raise ValueError(f"takes is {self.takes} but seeds lists {len(self.seeds)}; give one seed per take "
                                 "or leave takes out")
            self.takes = len(self.seeds)
        return self

    def take_seeds(self) -> list[int]:
        """The seed of each take: the explicit list, else seed, seed+1, ... (wrapping at 2**31)."""
        return list(self.seeds) if self.seeds is not None else [(self.seed + i) % 2**31 for i in range(self.takes)]


class Preview(BaseModel):
    step: int = Field(description="the training step the preview was rendered at")
    url: str = Field(description="where the preview's mp4 is served")
    created_at: float = Field(description="seconds since the Unix epoch")
    frames: int
    fps: float
    duration_s: float
    width: int
    height: int


class Job(BaseModel):
    id: str
    kind: Literal["extract", "generate"]
    status: JobStatus
    phase: str
    progress: float = Field(ge=0, le=1)
    step: int
    total_steps: int
    eta_s: float | None
    created_at: float = Field(description="seconds since the Unix epoch")
    started_at: float | None
    finished_at: float | None
    error: ErrorBody | None
    result: dict[str, Any] | None
    action: str | None = None
    params: dict[str, Any]
    worker: str | None = Field(None, description="the worker that runs (or ran) the job; see /v1/health")
    queue_position: int | None = Field(None, ge=1, description="while queued: 1 starts next; else null")


QUEUE_NOTE = Field(None, description="set when the job was queued while it cannot start soon (studio mode's Ray "
                  "cluster unreachable): it waits in the queue and runs once the service has reconnected")


class JobAccepted(BaseModel):
    job: Job
    note: str | None = QUEUE_NOTE


class ActionAccepted(BaseModel):
    action: Action
    job: Job
    note: str | None = QUEUE_NOTE


class JobList(BaseModel):
    jobs: list[Job]


def job_out(job: dict) -> dict:
    """The public view of a job row (internal bookkeeping columns dropped)."""
    return {k: v for k, v in job.items() if k not in ("cancel_requested", "finish_requested", "attempts", "version",
                                                   "owner")}
