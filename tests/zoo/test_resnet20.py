"""The paper's algorithm on the pretrained CIFAR-10 ResNet-20 of ../shared (skipped when it is absent)."""

from __future__ import annotations

import pytest
import torch

import cbdnet
from cbdnet.zoo.data import load_spec
from cbdnet.zoo.metrics import evaluate_classification
from cbdnet.zoo.models import build, load_weights


@pytest.mark.slow
def test_resnet20_j5_b03_bits_and_accuracy(resnet20_weights, cifar_test, tmp_path):
    model = load_weights(build("cifar-resnet20"), resnet20_weights).eval()
    data = load_spec(f"cifar10-npz:{cifar_test}")
    with torch.no_grad():
        fp32 = evaluate_classification(model, data, progress=False)
        assert abs(fp32["top1"] - 0.8103) < 0.002 and fp32["n"] == 10000  # the checkpoint on the JPEG copy
        model, report = cbdnet.compress(model, cbdnet.CBDConfig(planes=5, bottleneck=0.3), progress=False)
        assert 4.9 <= report.bits_per_weight <= 5.5  # the paper's count: fixed-length planes or their factors
        assert report.coded_bits_per_weight < 0.85 * report.bits_per_weight  # the skewed levels entropy-code well
        size = cbdnet.save(model, tmp_path / "r20.cbd")
        stored = (report.coded_weight_bits + report.float_bits) / 8
        assert stored <= size <= stored + 2048 + 8 * (len(report.layers) + len(report.float_tensors))
        after = evaluate_classification(cbdnet.load(tmp_path / "r20.cbd"), data, progress=False)
    assert after["top1"] >= 0.805
