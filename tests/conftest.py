"""Shared fixtures. ``../shared`` (read-only data and a pretrained ResNet-20) is optional: tests that need it
skip with the reason when it is absent."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

torch.set_num_threads(int(os.environ.get("CBDNET_TEST_THREADS", "2")))

SHARED = Path(os.environ.get("CBDNET_SHARED", Path(__file__).resolve().parents[1].parent / "shared"))


def shared_file(relative: str) -> Path:
    path = SHARED / relative
    if not path.exists():
        pytest.skip(f"{path} is absent (../shared is not on this machine)")
    return path


@pytest.fixture
def resnet20_weights() -> Path:
    return shared_file("models/cifar10_resnet20.th")


@pytest.fixture
def cifar_test() -> Path:
    return shared_file("data/cifar10_test.npz")


@pytest.fixture
def cifar_calib() -> Path:
    return shared_file("data/cifar10_calib1000.npz")
