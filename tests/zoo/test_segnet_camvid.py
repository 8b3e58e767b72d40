"""The committed SegNet-Basic CamVid weights (bench/train_segnet.py) on real ../shared CamVid images: the float
model segments well above chance, and CBD at J=5 / bottleneck 0.3 with every layer coded stays within a point
(the distortion rule stores the first conv uniform; the paper's size rule keeps its composite code, whose step is
1.8x coarser, and loses about three points: bench/segnet_table.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import shared_file

from cbdnet import CBDConfig, compress
from cbdnet.zoo.data import SegmentationData, load_spec
from cbdnet.zoo.metrics import evaluate_segmentation
from cbdnet.zoo.models import build, load_weights

WEIGHTS = Path(__file__).resolve().parents[2] / "models" / "segnet_basic_camvid.pt"


@pytest.fixture(scope="module")
def camvid_val_subset() -> SegmentationData:
    path = shared_file("data/camvid_240x180.npz")
    data = load_spec(f"camvid-npz:{path}:val")
    return SegmentationData(data.images[::4], data.labels[::4], data.name + "[::4]", data.classes, data.ignore_index)


@pytest.mark.slow
def test_trained_segnet_basic_float_and_cbd(camvid_val_subset):
    assert WEIGHTS.is_file(), "models/segnet_basic_camvid.pt is part of the repository"
    model = load_weights(build("segnet-basic"), WEIGHTS).eval()
    fp32 = evaluate_segmentation(model, camvid_val_subset, progress=False)
    assert fp32["miou"] > 0.30 and fp32["pixel_acc"] > 0.60  # chance is ~0.09 mIoU (11 classes)
    model, report = compress(model, CBDConfig(planes=5, bottleneck=0.3), progress=False)
    assert 5.0 < report.bits_per_weight < 6.0 and report.coded_bits_per_weight < report.bits_per_weight
    assert not [row for row in report.float_layers if row["type"] == "Conv2d"]
    modes = {layer.name: layer.mode for layer in report.layers}
    assert modes.pop("encoders.0.0") == "uniform" and set(modes.values()) == {"cbd"}
    cbd = evaluate_segmentation(model, camvid_val_subset, progress=False)
    assert abs(fp32["miou"] - cbd["miou"]) < 0.01
