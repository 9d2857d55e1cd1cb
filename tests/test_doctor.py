"""`doctor` on this CPU machine with the tiny model: what passes, and the FAILs (with fixes) it must report."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest
import torch

from flexiact_backend.tools.cli import main
from flexiact_backend.tools.doctor import check_cuda_build
from flexiact_backend.service.process import free_port
from flexiact_backend.tiny import ensure_tiny_model


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return ensure_tiny_model(tmp_path_factory.mktemp("doctor"))


def test_tiny_model_machine_passes(tiny_model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["doctor", "--model", str(tiny_model), "--data-dir", str(tmp_path), "--port", str(free_port())])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "[OK  ] weights: flexiact/tiny-random-cogvideox-i2v: 96x64, 9 frames at 8 fps" in out
    assert "[OK  ] ffmpeg: ffmpeg version" in out
    assert "[OK  ] sampling: the folder names CogVideoXDPMScheduler; generation samples with CogVideoXDPMScheduler" in out
    assert "reweight_scale=null (--no-reweight) runs as the authors' released script" in out
    assert "is free for `flexiact-backend serve`" in out
    assert "all checks passed" in out


def test_missing_weights_fail_with_download_fix(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["doctor", "--model", str(tmp_path / "nowhere"), "--data-dir", str(tmp_path), "--port", str(free_port())])
    out = capsys.readouterr().out
    assert code == 1
    assert "[FAIL] weights:" in out and "fix: flexiact-backend download" in out


def test_incomplete_weights_fail(tiny_model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "transformer").mkdir()
    code = main(["doctor", "--model", str(broken), "--data-dir", str(tmp_path), "--port", str(free_port())])
    out = capsys.readouterr().out
    assert code == 1 and "lacks vae, text_encoder, tokenizer, scheduler" in out


def test_port_taken_by_another_program_fails(tiny_model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        code = main(["doctor", "--model", str(tiny_model), "--data-dir", str(tmp_path), "--port", str(port)])
    out = capsys.readouterr().out
    assert code == 1
    assert "[FAIL] backend:" in out and "fix: pass another --port" in out


def test_cpu_torch_on_a_machine_with_an_nvidia_driver_fails(tiny_model: Path, tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    """A driver is there (a stand-in `nvidia-smi` prints what the real one does) but torch is the CPU build."""
    if torch.version.cuda is not None:
        pytest.skip("this torch is a CUDA build")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    smi = bin_dir / "nvidia-smi"
    smi.write_text("#!/bin/sh\necho '| NVIDIA-SMI 570.86.15   Driver Version: 570.86.15   CUDA Version: 12.8     |'\n")
    smi.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    code = main(["doctor", "--model", str(tiny_model), "--data-dir", str(tmp_path), "--port", str(free_port())])
    out = capsys.readouterr().out
    assert code == 1
    assert "[FAIL] cuda build: torch 2.13.0+cpu is a CPU-only build, but an NVIDIA driver (CUDA 12.8) is installed" in out
    assert "fix: pip install torch --index-url https://download.pytorch.org/whl/cu128" in out


@pytest.mark.parametrize("build, driver, status", [("13.0", (12, 4), "FAIL"), ("12.8", (12, 4), "WARN"),
                                                   ("12.6", (12, 8), "OK"), ("12.8", (13, 0), "OK")])
def test_cuda_build_against_the_driver(build: str, driver: tuple[int, int], status: str) -> None:
    assert check_cuda_build(build, driver, f"2.13.0+cu{build.replace('.', '')}").status == status
