"""Calibration images are decoded once: every pass of a calibrated budget (statistics, calibration losses,
refit, bias correction, a retry) reuses the float32 images held in memory, and more than
``MAX_CALIBRATION_BYTES`` of them is refused with one line naming the image limit."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

import cbdnet
from cbdnet.calib import batches
from cbdnet.calib.batches import as_calibration_set
from cbdnet.errors import DataError
from cbdnet.zoo.data import ImageFolderData


def _folder(root, per_class: int = 3):
    rng = np.random.default_rng(0)
    for c in range(2):
        (root / f"class{c}").mkdir(parents=True)
        for i in range(per_class):
            Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(root / f"class{c}" / f"{i}.png")
    return ImageFolderData(str(root))


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 32, 3, stride=4), nn.BatchNorm2d(32), nn.ReLU(), nn.Conv2d(32, 64, 3, stride=4),
                         nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 2)).eval()


def test_a_budget_decodes_each_calibration_image_once(tmp_path, monkeypatch):
    data = _folder(tmp_path / "train")
    decoded = []
    image = ImageFolderData.image
    monkeypatch.setattr(ImageFolderData, "image", lambda self, index: decoded.append(index) or image(self, index))
    model, report = cbdnet.compress(_net(), cbdnet.BudgetConfig(target_bits=4.0), calibration=data, progress=False)
    assert report.file_bits_per_weight <= 4.0 and "refit" in report.extra["calibration"]  # every stage ran
    assert sorted(decoded) == list(range(len(data)))  # each image once, however many passes the budget made


def test_an_image_limit_decodes_no_image_past_it(tmp_path, monkeypatch):
    data = _folder(tmp_path / "train", per_class=60)  # 120 images: more than one default batch of 100
    decoded = []
    image = ImageFolderData.image
    monkeypatch.setattr(ImageFolderData, "image", lambda self, index: decoded.append(index) or image(self, index))
    held = as_calibration_set(data, limit=5)
    assert len(held) == 5 and decoded == [0, 1, 2, 3, 4]


def test_calibration_images_past_the_memory_bound_are_refused(monkeypatch):
    images = [(torch.zeros(10, 3, 8, 8), torch.zeros(10, dtype=torch.int64)) for _ in range(3)]  # 7,680 B each
    monkeypatch.setattr(batches, "MAX_CALIBRATION_BYTES", 2 * 7680)
    assert len(as_calibration_set(images[:2])) == 20  # at the bound: held
    with pytest.raises(DataError, match=r"after 30 images of \[3, 8, 8\].*--calib-images"):
        as_calibration_set(images)
    assert len(as_calibration_set(images, limit=20)) == 20  # the limit keeps it under
