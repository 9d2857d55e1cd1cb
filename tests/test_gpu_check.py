"""`make gpu-check` prepared on a CPU: every phase runs on the tiny model or says why it is skipped."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from flexiact_backend.tools.cli import main
from flexiact_backend.tools.full_size import FullSize
from flexiact_backend.tools.gpu_check import PHASES, REDUCED, CheckContext, run_check


@pytest.mark.slow
def test_dry_run_reports_every_phase(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bench", "gpu-check", "--dry-run", "--out-dir", str(tmp_path)]) == 0
    stem = None if torch.cuda.is_available() else tmp_path / "gpu-check-cpu-dry-run"
    report = json.loads(next(tmp_path.glob("gpu-check-*-dry-run.json")).read_text())
    assert list(report["phases"]) == [p.name for p in PHASES]
    for name, phase in report["phases"].items():
        assert phase["status"] in ("ran", "skipped"), (name, phase)
        if phase["status"] == "skipped":
            assert phase["reason"], name
        else:
            assert phase["results"] and all(r["median_s"] > 0 for r in phase["results"].values()), name
    if stem is not None:  # on a CPU: the CUDA-only paths say so, the others ran
        assert stem.with_suffix(".txt").read_text().startswith("phase")
        for name in ("memory_saving", "fp8", "compiled", "compiled_step_cache"):
            assert report["phases"][name]["status"] == "skipped" and "CUDA" in report["phases"][name]["reason"]
        for name in ("step_cache", "attention_backends", "full_size"):
            assert report["phases"][name]["status"] == "ran", name
        assert report["phases"]["full_size"]["results"]["request_to_mp4"]["steps"] == 2
    assert "attention_backends" in capsys.readouterr().out  # the table


def test_phases_past_the_budget_are_skipped_with_the_reason() -> None:
    ctx = CheckContext(torch.device("cpu"), torch.float32, REDUCED, FullSize(), steps=2, repeats=1, dry_run=False,
                       attention_tokens=512)
    report = run_check(ctx, [p for p in PHASES if p.name == "attention_backends"], budget_s=1.0)
    phase = report.phases["attention_backends"]
    assert phase["status"] == "skipped" and phase["reason"].startswith("time budget: 0 s used of 1 s")
