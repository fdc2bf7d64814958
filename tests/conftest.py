"""Shared test fixtures: the official-tiny reference files and small configs (CPU only)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from lorat.config import load_config

ROOT = Path(__file__).resolve().parent.parent
TINY = ROOT / "tests" / "fixtures" / "official-tiny"


def pytest_configure(config):
    torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(scope="session")
def tiny_dir() -> Path:
    return TINY


@pytest.fixture(scope="session")
def tiny_config():
    return load_config(TINY / "config.yaml")


@pytest.fixture(scope="session")
def tiny_files() -> dict[str, Path]:
    return {
        "backbone": TINY / "dinov2_backbone.pth",
        "trainable": TINY / "lorat_trainable.safetensors",
        "forward": TINY / "forward.safetensors",
    }


@pytest.fixture(scope="session")
def synthetic(tmp_path_factory) -> Path:
    """A 4-clip, 30-frame synthetic LaSOT-layout dataset (160x128)."""
    from lorat.data.synthetic import write_dataset

    root = tmp_path_factory.mktemp("syn")
    write_dataset(root, sequences=4, frames=30, size=(160, 128), progress=False)
    return root
