"""Where weights come from: torchvision's own weights from torch's local cache (never downloaded, SHA-256
prefix checked), and torchvision's published DenseNet files with their old key names."""

from __future__ import annotations

import hashlib
import json
import re

import pytest
import torch

from cbdnet.cli import main
from cbdnet.errors import WeightError
from cbdnet.zoo import models
from cbdnet.zoo.models import _torchvision_default, build, load_weights, torchvision_weights_file


@pytest.mark.parametrize(("arch", "label", "file"), [
    ("resnet18", "ResNet18_Weights.IMAGENET1K_V1", "resnet18-f37072fd.pth"),
    ("vgg16", "VGG16_Weights.IMAGENET1K_V1", "vgg16-397923af.pth"),
    ("densenet121", "DenseNet121_Weights.IMAGENET1K_V1", "densenet121-a639ec97.pth"),
    ("ssd300", "SSD300_VGG16_Weights.COCO_V1", "ssd300_vgg16_coco-b556d3b4.pth"),
])
def test_torchvision_default_weights_are_looked_up_by_their_published_file(arch, label, file):
    found_label, url = _torchvision_default(arch)
    assert found_label == label and url.endswith("/" + file)


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    (tmp_path / "hub" / "checkpoints").mkdir(parents=True)
    return tmp_path / "hub" / "checkpoints"


def cached_resnet18(cache, monkeypatch, corrupt: bool = False):
    """A seeded resnet18 state dict in the cache under a name whose hex part is (or is not) its SHA-256 prefix."""
    torch.manual_seed(1)
    state = build("resnet18").state_dict()
    staging = cache / "staging.pth"
    torch.save(state, staging)
    prefix = hashlib.sha256(staging.read_bytes()).hexdigest()[:8]
    if corrupt:
        prefix = f"{(int(prefix, 16) + 1) % 16**8:08x}"
    path = cache / f"resnet18-{prefix}.pth"
    staging.rename(path)
    monkeypatch.setattr(models, "_torchvision_default",
                        lambda arch: ("ResNet18_Weights.IMAGENET1K_V1", f"https://example.invalid/{path.name}"))
    return state, path


def test_cached_torchvision_weights_load_exactly(cache, monkeypatch):
    state, path = cached_resnet18(cache, monkeypatch)
    found, label = torchvision_weights_file("resnet18")
    assert found == path and label == "ResNet18_Weights.IMAGENET1K_V1"
    loaded = load_weights(build("resnet18"), found).state_dict()
    assert all(torch.equal(loaded[key], value) for key, value in state.items())


def test_cli_compresses_cached_torchvision_weights_and_names_them(cache, monkeypatch, tmp_path):
    _, path = cached_resnet18(cache, monkeypatch)
    report = tmp_path / "r.json"
    assert main(["compress", "--arch", "resnet18", "--weights", "torchvision", "--json", str(report),
                 "--quiet"]) == 0
    assert json.loads(report.read_text())["weights"] == f"torchvision ResNet18_Weights.IMAGENET1K_V1 ({path})"


def test_corrupt_cached_file_is_refused(cache, monkeypatch):
    cached_resnet18(cache, monkeypatch, corrupt=True)
    with pytest.raises(WeightError, match="corrupt or incomplete"):
        torchvision_weights_file("resnet18")


@pytest.mark.parametrize(("arch", "needle"), [("vgg16", "never downloads"),
                                              ("cifar-resnet20", "publishes no weights")])
def test_missing_or_unknown_torchvision_weights_are_one_line_errors(cache, arch, needle, capsys):
    assert main(["compress", "--arch", arch, "--weights", "torchvision", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert needle in err and err.count("\n") == 1 and "Traceback" not in err


@pytest.mark.slow
def test_densenet_checkpoint_with_torchvisions_old_key_names_loads(tmp_path):
    torch.manual_seed(2)
    state = build("densenet121").state_dict()
    old_style = {re.sub(r"(denselayer\d+\.(?:norm|relu|conv))([12])\.", r"\1.\2.", key): value
                 for key, value in state.items()}
    assert sum(key not in state for key in old_style) > 300  # the published file's naming
    torch.save(old_style, tmp_path / "densenet121-old.pth")
    loaded = load_weights(build("densenet121"), tmp_path / "densenet121-old.pth").state_dict()
    assert loaded.keys() == state.keys()
    assert all(torch.equal(loaded[key], value) for key, value in state.items())
