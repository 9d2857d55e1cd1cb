"""Shared fixtures: the tiny model is built once per session, offline, and loaded once."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from flexiact_backend.generation import FlexiActGenerator
from flexiact_backend.tiny import make_tiny_model
from flexiact_backend.tiny_hub import HubFolder, make_hub_folder


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("models") / "tiny")


@pytest.fixture(scope="session")
def hub_folder(tmp_path_factory: pytest.TempPathFactory) -> HubFolder:
    """The tiny model as the hub's CogVideoX-5b-I2V folder, RefAdapter .pt at its root, a published action beside."""
    return make_hub_folder(tmp_path_factory.mktemp("hub"))


@pytest.fixture(scope="session")
def tiny_generator(tiny_model_dir: Path) -> FlexiActGenerator:
    return FlexiActGenerator.from_pretrained(tiny_model_dir, device="cpu")


@pytest.fixture(scope="session")
def target_image() -> Image.Image:
    """A 4:3 picture with structure, so crop/pad and the VAE see something other than noise."""
    y, x = np.mgrid[0:120, 0:160]
    rgb = np.stack([(x * 255 // 159), (y * 255 // 119), ((x // 20 + y // 20) % 2) * 255], axis=-1)
    return Image.fromarray(rgb.astype(np.uint8))


@pytest.fixture(scope="session")
def motion_clip(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two seconds of a white block sliding right at 12 fps: a clip with clear motion."""
    from flexiact_backend.media import write_mp4

    frames = np.zeros((24, 64, 96, 3), np.uint8)
    for i in range(24):
        frames[i, 20:40, 4 + 3 * i : 24 + 3 * i] = 255
    path = tmp_path_factory.mktemp("clips") / "slide.mp4"
    write_mp4(path, frames, 12)
    return path
