"""`download` on a machine without network: it must stop at once with a message, before touching the disk."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from flexiact_backend.errors import FlexiActError
from flexiact_backend.tools.hub import check_disk, check_network


def test_download_without_network_fails_with_message(tmp_path: Path) -> None:
    target = tmp_path / "weights"
    env = {k: v for k, v in os.environ.items() if k != "HF_HUB_OFFLINE"}
    env["HF_ENDPOINT"] = "http://127.0.0.1:9"  # nothing listens on the discard port: as good as no network
    result = subprocess.run([sys.executable, "-c", "from flexiact_backend.tools.cli import main; raise SystemExit(main())",
                             "download", "--dir", str(target), "--accept-license"],
                            capture_output=True, text=True, env=env)
    assert result.returncode == 2
    assert "cannot reach 127.0.0.1:9" in result.stderr
    assert "Traceback" not in result.stderr
    assert not target.exists()


def test_offline_flag_is_explained(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(FlexiActError, match="HF_HUB_OFFLINE"):
        check_network()


def test_disk_check_refuses_more_than_free(tmp_path: Path) -> None:
    assert check_disk(tmp_path / "a" / "b", required=1) > 0
    with pytest.raises(FlexiActError, match="not enough free disk"):
        check_disk(tmp_path, required=10**18)
