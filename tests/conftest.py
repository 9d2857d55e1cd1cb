"""Shared fixtures: the tiny model is built once per session, offline, and loaded once."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from flexiact_backend.generation import FlexiActGenerator
from flexiact_backend.tiny import make_tiny_model


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("models") / "tiny")


@pytest.fixture(scope="session")
def tiny_generator(tiny_model_dir: Path) -> FlexiActGenerator:
    return FlexiActGenerator.from_pretrained(tiny_model_dir, device="cpu")


@pytest.fixture(scope="session")
def target_image() -> Image.Image:
    """A 4:3 picture with structure, so crop/pad and the VAE see something other than noise."""
    y, x = np.mgrid[0:120, 0:160]
    rgb = np.stack([(x * 255 // 159), (y * 255 // 119), ((x // 20 + y // 20) % 2) * 255], axis=-1)
    return Image.fromarray(rgb.astype(np.uint8))
