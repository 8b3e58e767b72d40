"""Operation counts in the report, and compression that does not depend on the number of worker threads."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

import cbdnet
from cbdnet.nn.ops import output_positions


def small_net(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 32, 3, stride=2, bias=False),
                         nn.ReLU(), nn.Flatten(), nn.Linear(32 * 7 * 7, 10)).eval()


def test_output_positions_from_a_forward_pass():
    assert output_positions(small_net(), (1, 3, 16, 16)) == {"0": 256, "2": 49, "5": 1}


def test_report_counts_dense_and_bitserial_operations():
    model, report = cbdnet.compress(small_net(), cbdnet.CBDConfig(planes=4), progress=False,
                                    input_shape=(1, 3, 16, 16))
    positions = {"0": 256, "2": 49, "5": 1}
    for layer in report.layers:
        code = model.get_submodule(layer.name).code
        planes = code.decode_planes()
        assert layer.plane_popcounts == [int(p.sum()) for p in planes]
        assert layer.macs_per_position == layer.params  # one multiply-add per weight per output position
        assert layer.dense_macs == layer.params * positions[layer.name]
        assert layer.bitserial_adds == sum(layer.plane_popcounts) * positions[layer.name]
        assert layer.bitserial_mults == len(planes) * layer.shape[0] * positions[layer.name]
    ops = report.to_dict()["ops"]
    assert ops["dense_macs"] == 16 * 27 * 256 + 32 * 144 * 49 + 10 * 1568  # the FP32 network's own count
    assert ops["storage_bits"] == report.weight_bits < ops["fp32_storage_bits"]
    assert ops["bitserial_adds"] == sum(layer.bitserial_adds for layer in report.layers)


def test_ops_without_input_shape_are_per_position_only():
    _, report = cbdnet.compress(small_net(), progress=False)
    assert all(layer.dense_macs is None and layer.macs_per_position == layer.params for layer in report.layers)
    assert report.to_dict()["ops"]["dense_macs"] is None


def test_workers_do_not_change_the_result():
    results = []
    for workers in (1, 2):
        model, report = cbdnet.compress(small_net(), cbdnet.CBDConfig(planes=5), progress=False, workers=workers)
        codes = [model.get_submodule(layer.name).code for layer in report.layers]
        results.append(([layer.name for layer in report.layers], [c.tensors() for c in codes]))
    (names_a, tensors_a), (names_b, tensors_b) = results
    assert names_a == names_b
    for a, b in zip(tensors_a, tensors_b, strict=True):
        assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
