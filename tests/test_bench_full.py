"""`bench full` end to end at reduced size on the CPU, and the fake-tensor estimate's accounting."""

from __future__ import annotations

import json

import pytest
import torch

from flexiact_backend.tools.cli import main
from flexiact_backend.tools.estimate import LiveBytes, estimate_full
from flexiact_backend.tools.full_size import FullSize


@pytest.mark.slow
def test_bench_full_runs_end_to_end_at_reduced_size(tmp_path, capsys) -> None:
    out = tmp_path / "full.json"
    assert main(["bench", "full", "--device", "cpu", "--layers", "2", "--frames", "9", "--height", "64", "--width", "96",
                 "--steps", "2", "--repeats", "1", "--modes", "eager", "memory_saving", "fp8", "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    results = report["results"]
    for phase in ("text_encoding", "transformer_step_unbiased", "transformer_step_biased", "vae_decode", "request_to_mp4",
                  "extraction_step", "extraction_step_selective_recompute"):
        assert results[f"eager/{phase}"]["median_s"] > 0, phase
        assert results[f"eager/{phase}"]["cpu_new_tensors_peak_bytes"] > 0, phase
    assert "unsupported" in results["memory_saving"] and "unsupported" in results["fp8"]
    assert "transformer_step_biased" in capsys.readouterr().out  # the table


def test_live_bytes_counts_new_storages_not_views() -> None:
    base = torch.zeros(256, 256)
    with LiveBytes() as live:
        view = base.t()  # shares the input's storage: nothing new
        a = base + 1  # 256 KiB
        b = a * 2  # 256 KiB more while a lives
        del a, b
        c = base - 1
    assert live.peak == 2 * 256 * 256 * 4
    assert live.live == 256 * 256 * 4 and c.shape == view.shape


def test_estimate_counts_the_model_and_attention_flops() -> None:
    """A one-layer, small-frame estimate: exact parameter count, and attention FLOPs that FlopCounterMode misses."""
    report = estimate_full(FullSize(layers=1, frames=5, height=64, width=96))
    assert report["motion_tokens"] == {"params": 226 * 3072, "bytes": 4 * 226 * 3072}  # one layer, float32 masters
    assert report["models"]["text_encoder"]["params"] > 32128 * 4096  # T5-XXL's vocabulary at full width
    step = report["results"]["transformer_step_unbiased"]
    tokens = 226 + 226 + 2 * (64 // 16) * (96 // 16)
    assert step["flops"] > 4 * 2 * tokens * tokens * 3072  # at least the attention, counted analytically
    assert report["biased_step_flops_ratio"] > 1.0  # the padded head dims cost something
    assert report["results"]["extraction_step"]["peak_bytes"]["default"] > report["models"]["transformer"]["bytes"]
