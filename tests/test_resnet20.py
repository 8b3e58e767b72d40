"""The paper's algorithm on the pretrained CIFAR-10 ResNet-20 of ../shared (skipped when it is absent)."""

from __future__ import annotations

import torch

import cbdnet
from cbdnet.zoo.data import load_spec
from cbdnet.zoo.metrics import evaluate_classification
from cbdnet.zoo.models import build, load_weights


def test_resnet20_j5_b03_bits_and_accuracy(resnet20_weights, cifar_test, tmp_path):
    model = load_weights(build("cifar-resnet20"), resnet20_weights).eval()
    data = load_spec(f"cifar10-npz:{cifar_test}")
    with torch.no_grad():
        fp32 = evaluate_classification(model, data, progress=False)
        assert abs(fp32["top1"] - 0.8103) < 0.002 and fp32["n"] == 10000  # the checkpoint on the JPEG copy
        model, report = cbdnet.compress(model, cbdnet.CBDConfig(planes=5, bottleneck=0.3), progress=False)
        fixed = sum(layer.fixed_bits for layer in report.layers) / report.params  # format 1's fixed-length planes
        assert 4.9 <= fixed <= 5.5 and report.bits_per_weight < 0.85 * fixed  # entropy coding saves >= 15%
        size = cbdnet.save(model, tmp_path / "r20.cbd")
        assert report.total_bits / 8 <= size <= report.total_bits / 8 + 4096
        after = evaluate_classification(cbdnet.load(tmp_path / "r20.cbd"), data, progress=False)
    assert after["top1"] >= 0.805
