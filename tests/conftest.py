"""Shared fixtures. ``../shared`` (read-only data and a pretrained ResNet-20) is optional: tests that need it
skip with the reason when it is absent."""

from __future__ import annotations

import os
import signal
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


def _write_voc(root, objects: dict[str, list[tuple[str, list[int], int]]], size=(40, 32)) -> None:
    """A VOCdevkit-style folder: grey JPEGs, one XML annotation per image, ImageSets/Main/test.txt."""
    import numpy as np
    from PIL import Image

    for sub in ("JPEGImages", "Annotations", "ImageSets/Main"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    for image_id, objs in objects.items():
        Image.fromarray(np.full((size[1], size[0], 3), 128, np.uint8)).save(root / "JPEGImages" / f"{image_id}.jpg")
        body = "".join(f"<object><name>{name}</name><difficult>{diff}</difficult><bndbox><xmin>{b[0]}</xmin>"
                       f"<ymin>{b[1]}</ymin><xmax>{b[2]}</xmax><ymax>{b[3]}</ymax></bndbox></object>"
                       for name, b, diff in objs)
        (root / "Annotations" / f"{image_id}.xml").write_text(f"<annotation>{body}</annotation>")
    (root / "ImageSets/Main/test.txt").write_text("\n".join(objects) + "\n")


@pytest.fixture
def write_voc():
    """``write_voc(root, {image_id: [(class, [x1, y1, x2, y2], difficult), ...]}, size=(w, h))``."""
    return _write_voc


def _assert_same(a, b) -> None:
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b)
    elif isinstance(a, dict):
        assert a.keys() == b.keys()
        for key in a:
            _assert_same(a[key], b[key])
    else:
        assert len(a) == len(b)
        for x, y in zip(a, b, strict=True):
            _assert_same(x, y)


@pytest.fixture
def assert_same():
    """``assert_same(a, b)``: tensors, or dicts/sequences of them (detector outputs), exactly equal."""
    return _assert_same


@pytest.fixture
def no_hang():
    """Fail a test that blocks for 20 s (e.g. a FIFO opened by mistake) instead of hanging the suite."""
    old = signal.signal(signal.SIGALRM, lambda *a: pytest.fail("timed out: something blocked"))
    signal.alarm(20)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, old)
