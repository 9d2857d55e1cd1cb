"""Full-size memory and FLOPs without a GPU: the real pipeline's ops on fake tensors (nothing allocated or computed).

Modules are built on the `meta` device and each parameter and buffer becomes a fake CPU tensor. A dispatch mode adds
each new output storage's bytes and subtracts them when the storage dies (`weakref.finalize`), giving the peak of
live bytes; `FlopCounterMode` counts matmuls and convolutions. The CPU's flash-attention kernel (which, as on CUDA,
never builds the L x L matrix) is not counted by `FlopCounterMode`, so attention adds 4·B·H·L·S·D per forward call
(QKᵀ and PV) and 2.5 times that per backward call. The CUDA allocator's fragmentation and workspaces are left out.
"""

from __future__ import annotations

import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from torch.utils.flop_counter import FlopCounterMode, flop_registry

from .full_size import TEXT_LENGTH, FullSize, build_modules
from ..parallel.cost import LINKS_GBPS, TransformerShape, multi_gpu_estimate
from ..tiny import make_scheduler
from ..model import attach_flexiact, reweight_schedule, rotary_embeddings

#: Sustained dense bf16 throughput the time estimates assume (an H100 SXM reaches about this on large matmuls).
DEFAULT_TFLOPS = 800.0
NOTE = ("Estimates from fake tensors on the CPU, not GPU measurements: peak bytes count live tensors only (the CUDA "
        "allocator's fragmentation, workspaces and the CUDA context are left out); times are FLOPs divided by the stated "
        "sustained throughput.")


MULTI_GPU_NOTE = (f"N-GPU rows: this estimate's FLOPs split by the parallel plan (parallel/cost.py), plus Ulysses traffic at "
                  f"{', '.join(f'{k} {v:g} GB/s' for k, v in LINKS_GBPS.items())} per direction per GPU, not overlapped "
                  "with compute; text encoding and the VAE decode stay on one GPU.")


class LiveBytes(TorchDispatchMode):
    """Peak of live tensor bytes created inside it (storages that existed before are not counted)."""

    def __init__(self) -> None:
        super().__init__()
        self.live = 0
        self.peak = 0
        self.attention_flops = 0
        self._seen: set[int] = set()

    def _release(self, key: int, nbytes: int) -> None:
        self._seen.discard(key)
        self.live -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self._count_attention(func, args)
        # Views and in-place results share an input's storage: only storages no input holds are new.
        inputs = {t.untyped_storage()._cdata for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        for o in tree_leaves(out):
            if isinstance(o, torch.Tensor):
                storage = o.untyped_storage()
                key = storage._cdata
                if key not in self._seen and key not in inputs:
                    self._seen.add(key)
                    nbytes = storage.nbytes()
                    self.live += nbytes
                    self.peak = max(self.peak, self.live)
                    weakref.finalize(storage, self._release, key, nbytes)
        return out

    def _count_attention(self, func, args) -> None:
        name = str(func.overloadpacket)
        if "scaled_dot_product" not in name or func.overloadpacket in flop_registry:
            return
        q, k = args[0], args[1]
        if "backward" in name:  # grad_out comes first in the backward ops
            q, k = args[1], args[2]
        batch, heads, length, dim = q.shape
        flops = 4 * batch * heads * length * k.shape[-2] * dim
        self.attention_flops += int(flops * 2.5) if "backward" in name else flops


@dataclass
class Measured:
    peak_bytes: int
    flops: int
    seconds_to_trace: float


def measure(fn: Callable[[], object]) -> Measured:
    """Run `fn` (inside the fake mode) counting live bytes and FLOPs."""
    started = time.perf_counter()
    with LiveBytes() as live:
        fn()
    # A second pass for FLOPs: the flop counter's module tracking keeps recomputed activations alive in backward.
    with LiveBytes() as attention, FlopCounterMode(display=False) as flops:
        fn()
    return Measured(live.peak, flops.get_total_flops() + attention.attention_flops, time.perf_counter() - started)


def _fake(module: torch.nn.Module, mode: FakeTensorMode) -> None:
    """Every meta parameter and buffer of `module` becomes a fake CPU tensor (same shape and dtype, no memory)."""
    device = torch.device("cpu")
    for sub in module.modules():
        for name, p in list(sub.named_parameters(recurse=False)):
            fake = mode.fake_tensor_converter.from_meta_and_device(mode, p.data, device)
            setattr(sub, name, torch.nn.Parameter(fake, requires_grad=p.requires_grad))
        for name, b in list(sub.named_buffers(recurse=False)):
            sub._buffers[name] = mode.fake_tensor_converter.from_meta_and_device(mode, b, device)


def _bytes(module: torch.nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in [*module.parameters(), *module.buffers()])


def _params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def estimate_full(size: FullSize = FullSize(), dtype: torch.dtype = torch.bfloat16, tflops: float = DEFAULT_TFLOPS) -> dict:
    """Parameters, bytes, peak bytes and FLOPs of each phase, for the default and memory-saving modes."""
    mode = FakeTensorMode(allow_non_fake_inputs=False)
    with torch.device("meta"):
        text_encoder, vae, transformer = build_modules(size, dtype)
        adapter = attach_flexiact(transformer)
    for module in (text_encoder, vae, transformer):
        _fake(module, mode)
    motion = adapter.motion_parameters()
    models = {"text_encoder": text_encoder, "vae": vae, "transformer": transformer}
    sizes = {name: {"params": _params(m), "bytes": _bytes(m)} for name, m in models.items()}
    motion_bytes = sum(p.numel() * p.element_size() for p in motion)
    h, w = size.height // 8, size.width // 8
    phases: dict[str, dict] = {}

    with mode:
        rotary = rotary_embeddings(transformer, size.height, size.width, size.latent_frames, 8, torch.device("cpu"))
        step_inputs = dict(
            hidden_states=torch.randn(2, size.latent_frames, 32, h, w, dtype=dtype),
            encoder_hidden_states=torch.randn(2, TEXT_LENGTH, 4096, dtype=dtype),
            timestep=torch.tensor([999, 999]), image_rotary_emb=rotary, return_dict=False,
        )
        tokens = torch.zeros(2, TEXT_LENGTH, dtype=torch.long)
        latents = torch.randn(1, 16, size.latent_frames, h, w, dtype=dtype)

        def text() -> None:
            with torch.no_grad():
                text_encoder(tokens)

        def step(bias: float | None) -> Callable[[], None]:
            def run() -> None:
                with torch.no_grad():  # the bias as the reweighting hook passes it (its timestep lookup needs data)
                    transformer(**step_inputs, attention_kwargs={} if bias is None else {"reweight": torch.tensor(bias)})
            return run

        def decode(tiled: bool) -> Callable[[], None]:
            def run() -> None:
                (vae.enable_tiling if tiled else vae.disable_tiling)()
                with torch.no_grad():
                    vae.decode(latents / vae.config.scaling_factor)
            return run

        def extraction_step() -> None:
            optimizer = torch.optim.AdamW(motion, lr=3e-3, betas=(0.9, 0.95), weight_decay=1e-4, foreach=False)
            for p in motion:
                p.requires_grad_(True)
            transformer.enable_gradient_checkpointing()
            try:
                pred = transformer(**{**step_inputs, "hidden_states": step_inputs["hidden_states"][:1],
                                      "encoder_hidden_states": step_inputs["encoder_hidden_states"][:1],
                                      "timestep": step_inputs["timestep"][:1]})[0]
                loss = pred.float().square().mean()
                loss.backward()
                torch.nn.utils.clip_grad_norm_(motion, 1.0, foreach=False)
                optimizer.step()
            finally:
                transformer.disable_gradient_checkpointing()
                for p in motion:
                    p.requires_grad_(False)

        runs = {
            "text_encoding": (text, "text_encoder"),
            "transformer_step_unbiased": (step(None), "transformer"),
            "transformer_step_biased": (step(1.0), "transformer"),
            "vae_decode": (decode(False), "vae"),
            "vae_decode_tiled": (decode(True), "vae"),
            "extraction_step": (extraction_step, "transformer"),
        }
        for name, (fn, model) in runs.items():
            m = measure(fn)
            phases[name] = {"model": model, "activation_peak_bytes": m.peak_bytes, "flops": m.flops,
                            "estimated_s": m.flops / (tflops * 1e12), "seconds_to_trace": round(m.seconds_to_trace, 1)}

    report = summarise({"benchmark": "full_estimate", "note": NOTE, "size": size.to_dict(), "dtype": str(dtype),
                        "tflops_assumed": tflops, "models": sizes,
                        "motion_tokens": {"params": sum(p.numel() for p in motion), "bytes": motion_bytes},
                        "results": phases})
    shape = TransformerShape(layers=size.layers, video_tokens=size.latent_frames * (size.height // 16) * (size.width // 16))
    report["multi_gpu"] = multi_gpu_estimate(report, shape, tflops)
    report["multi_gpu_note"] = MULTI_GPU_NOTE
    return report


def summarise(report: dict) -> dict:
    """Peak bytes per mode and the 50-step request from the traced phases (`results`' activation peaks and FLOPs).

    Every mode decodes tiled (`generation.configure_vae`), so the untiled decode is listed for comparison only.
    Why a function of the report: the tracing takes many minutes, the accounting is re-applied to a saved report.
    """
    phases, sizes = report["results"], report["models"]
    all_bytes = sum(s["bytes"] for s in sizes.values())
    for name, p in phases.items():
        model_bytes = sizes[p["model"]]["bytes"]
        # The VAE and text encoder leave the device while the tokens train; activations of the extraction step
        # already count the optimizer's state and the gradients.
        resident = model_bytes if name == "extraction_step" else all_bytes
        p["peak_bytes"] = {"default": resident + p["activation_peak_bytes"],
                           "memory_saving": model_bytes + p["activation_peak_bytes"]}
    phases["vae_decode"]["peak_bytes"] = {"default": None, "memory_saving": None}  # no mode decodes untiled
    unbiased, biased = phases["transformer_step_unbiased"], phases["transformer_step_biased"]
    scheduler = make_scheduler()
    scheduler.set_timesteps(50)
    biased_steps = sum(r is not None for r in reweight_schedule([int(t) for t in scheduler.timesteps]))
    request_flops = (phases["text_encoding"]["flops"] + biased_steps * biased["flops"] + (50 - biased_steps) * unbiased["flops"]
                     + phases["vae_decode_tiled"]["flops"])
    in_request = [p for name, p in phases.items() if name not in ("extraction_step", "vae_decode")]
    return {
        **{k: v for k, v in report.items() if k != "results"},
        "biased_step_flops_ratio": biased["flops"] / unbiased["flops"],
        "request_50_steps": {"biased_steps": biased_steps, "flops": request_flops,
                             "estimated_s": request_flops / (report["tflops_assumed"] * 1e12),
                             "peak_bytes": {m: max(p["peak_bytes"][m] for p in in_request)
                                            for m in ("default", "memory_saving")}},
        "results": phases,
    }
