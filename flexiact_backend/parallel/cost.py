"""What N GPUs give one job, before buying them: per-rank compute and Ulysses traffic of the parallel plans.

Analytic, on top of the fake-tensor FLOP counts of one device (`tools/estimate.py`): a transformer step's FLOPs are
split into the per-token projections and feed-forward (the video share divides by the Ulysses degree; the text and
motion tokens are replicated on every rank) and the attention (its heads divide); CFG halves the batch. Traffic is
what each rank sends per layer (bf16): the all-to-all of its video q, k, v and of the attention output, and the
all-gather of the text and motion rows' heads. Times are bandwidth only: no overlap of compute and traffic, no
collective latency (a few microseconds each, 5 per layer).
"""

from __future__ import annotations

from dataclasses import dataclass

from .util import ParallelConfig

#: Per-direction link bandwidth per GPU: H100 SXM NVLink 4 (900 GB/s both ways), PCIe 4.0 x16.
LINKS_GBPS = {"nvlink": 450.0, "pcie": 32.0}
BF16 = 2
FP32 = 4


@dataclass(frozen=True)
class TransformerShape:
    """What the cost model needs of CogVideoX-5B-I2V at one video size."""

    layers: int = 42
    heads: int = 48
    head_dim: int = 64
    video_tokens: int = 17_550
    text_tokens: int = 226
    motion_tokens: int = 226
    ff_mult: int = 4

    @property
    def width(self) -> int:
        return self.heads * self.head_dim

    def flops_per_sample(self, ulysses: int = 1) -> float:
        """One rank's share of one layer's FLOPs for one sample (batch element) under Ulysses degree `ulysses`."""
        d, joint = self.width, self.text_tokens + self.motion_tokens
        rows = self.text_tokens + self.video_tokens / ulysses  # rows that go through all projections and the FF
        linear = 2 * d * d * (4 * rows + 3 * self.motion_tokens) + 4 * self.ff_mult * d * d * rows
        length = joint + self.video_tokens
        attention = 4 * self.heads * self.head_dim * length * length / ulysses
        return linear + attention

    def all_to_all_bytes(self, ulysses: int) -> float:
        """Bytes one rank sends per layer and sample: q, k, v and the output all-to-all, the joint heads gathered."""
        if ulysses == 1:
            return 0.0
        share = (ulysses - 1) / ulysses
        video = 4 * self.video_tokens / ulysses * self.width * BF16 * share
        joint = (self.text_tokens + self.motion_tokens) * self.width / ulysses * BF16 * (ulysses - 1)
        return video + joint


def generation_plan(shape: TransformerShape, gpus: int, estimate: dict, tflops: float) -> dict:
    """A 50-step request on `gpus` GPUs (CFG x Ulysses) from one device's estimate (`estimate_full`'s report)."""
    config = ParallelConfig.for_generation(gpus)
    phases, request = estimate["results"], estimate["request_50_steps"]
    fraction = shape.flops_per_sample(config.ulysses) / shape.flops_per_sample(1) / config.cfg
    samples = 2 // config.cfg
    step_bytes = shape.layers * samples * shape.all_to_all_bytes(config.ulysses)
    biased, steps = request["biased_steps"], 50
    step_flops = {"biased": phases["transformer_step_biased"]["flops"] * fraction,
                  "unbiased": phases["transformer_step_unbiased"]["flops"] * fraction}
    compute_s = (biased * step_flops["biased"] + (steps - biased) * step_flops["unbiased"]) / (tflops * 1e12)
    fixed_s = (phases["text_encoding"]["flops"] + phases["vae_decode"]["flops"]) / (tflops * 1e12)  # not split
    row = {"work": "generation", "gpus": gpus, "plan": f"cfg {config.cfg} x ulysses {config.ulysses}",
           "per_rank_step_tflop": step_flops["unbiased"] / 1e12,
           "all_to_all_mb_per_layer": shape.all_to_all_bytes(config.ulysses) * samples / 1e6}
    for link, gbps in LINKS_GBPS.items():
        traffic_s = steps * step_bytes / (gbps * 1e9)
        row[f"traffic_s_{link}"] = traffic_s
        row[f"estimated_s_{link}"] = compute_s + fixed_s + traffic_s
    return row


def extraction_plans(shape: TransformerShape, gpus: int, estimate: dict, tflops: float, motion_params: int) -> list[dict]:
    """One extraction step on `gpus` GPUs in each mode: sequence (same math) and data (one window per GPU)."""
    step = estimate["results"]["extraction_step"]["flops"]
    fraction = shape.flops_per_sample(gpus) / shape.flops_per_sample(1)
    # Forward, the recompute of everything but attention, and the backward each move the layer's traffic once.
    sequence = {"work": "extraction step", "gpus": gpus, "plan": f"sequence x{gpus}", "windows_per_step": 1,
                "per_rank_step_tflop": step * fraction / 1e12,
                "all_to_all_mb_per_layer": 3 * shape.all_to_all_bytes(gpus) / 1e6}
    data = {"work": "extraction step", "gpus": gpus, "plan": f"data x{gpus}", "windows_per_step": gpus,
            "per_rank_step_tflop": step / 1e12, "all_reduce_mb": 2 * (gpus - 1) / gpus * motion_params * FP32 / 1e6}
    for link, gbps in LINKS_GBPS.items():
        sequence[f"traffic_s_{link}"] = shape.layers * 3 * shape.all_to_all_bytes(gpus) / (gbps * 1e9)
        sequence[f"estimated_s_{link}"] = step * fraction / (tflops * 1e12) + sequence[f"traffic_s_{link}"]
        data[f"traffic_s_{link}"] = data["all_reduce_mb"] * 1e6 / (gbps * 1e9)
        data[f"estimated_s_{link}"] = step / (tflops * 1e12) + data[f"traffic_s_{link}"]
    return [sequence, data]


def multi_gpu_estimate(estimate: dict, shape: TransformerShape, tflops: float, gpus: tuple[int, ...] = (1, 2, 4, 8)) -> dict:
    """Rows for `bench full --estimate`: generation and extraction step on each GPU count."""
    motion = estimate["motion_tokens"]["params"]
    rows = {}
    for n in gpus:
        gen = generation_plan(shape, n, estimate, tflops)
        rows[f"{n} GPU generation ({gen['plan']})"] = gen
        if n > 1:
            for plan in extraction_plans(shape, n, estimate, tflops, motion):
                rows[f"{n} GPU extraction step ({plan['plan']})"] = plan
    return rows
