"""The architecture zoo and checkpoint loading.

``build(arch)`` returns a fresh float model tagged with its registry name (``model.cbdnet.arch``), which is
what :func:`cbdnet.save` records so that :func:`cbdnet.load` can rebuild it. ``load_weights`` reads a
checkpoint with ``torch.load(weights_only=True)``: a bare state dict or a dict with a ``state_dict`` (or
``model``) entry, keys with or without the ``module.`` prefix of ``nn.DataParallel``.
"""

from __future__ import annotations

import hashlib
import io
import os
import pickle
import re
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import CBDError, WeightError
from ..fileio import escape_name, read_regular_file
from ..nn.state import record, recorded

__all__ = ["ARCHS", "register", "build", "load_weights", "known_archs", "CifarResNet", "DigitsCNN",
           "TORCHVISION_WEIGHTS", "torchvision_weights_file", "torchvision_builders", "import_factory", "file_sha256"]

ARCHS: dict[str, Callable[..., nn.Module]] = {}


def register(name: str) -> Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
    def wrap(builder: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        ARCHS[name] = builder
        return builder

    return wrap


def known_archs() -> list[str]:
    return sorted(ARCHS)


def torchvision_builders() -> dict[str, Callable[..., nn.Module]]:
    """torchvision's classification and segmentation builders by name (``resnet50``, ``mobilenet_v2``,
    ``deeplabv3_resnet50``, ...)."""
    from torchvision import models as tv

    names = tv.list_models(module=tv) + tv.list_models(module=tv.segmentation)
    return {name: tv.get_model_builder(name) for name in names}


def _torchvision(name: str, kwargs: dict) -> nn.Module:
    builders = torchvision_builders()
    if name not in builders:
        close = sorted(n for n in builders if name.lower()[:4] in n)[:8]
        raise CBDError(f"torchvision has no classification or segmentation model {name!r}"
                       + (f" (did you mean {', '.join(close)}?)" if close else ""))
    options = {"weights": None, **({"weights_backbone": None} if name in _segmentation_names() else {}), **kwargs}
    return builders[name](**options)


def _segmentation_names() -> set[str]:
    from torchvision import models as tv

    return set(tv.list_models(module=tv.segmentation))


def import_factory(spec: str) -> Callable[..., nn.Module]:
    """The factory ``module.path:name`` of the user's own code. This imports (runs) that module: only for an
    architecture named on the command line or in Python, never for one read from a file."""
    import importlib

    module_name, _, attr = spec.partition(":")
    if not module_name or not attr or not all(part.isidentifier() for part in module_name.split(".") + attr.split(".")):
        raise CBDError(f"architecture {spec!r}: expected a registered name, torchvision:NAME or module.path:factory")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise CBDError(f"architecture {spec}: cannot import {module_name} ({exc}); is it on PYTHONPATH?") from None
    factory: object = module
    for part in attr.split("."):
        factory = getattr(factory, part, None)
    if not callable(factory):
        raise CBDError(f"architecture {spec}: {module_name} has no callable {attr}")
    return factory


def build(arch: str, *, allow_import: bool = False, **kwargs) -> nn.Module:
    """A fresh (randomly initialised, float32) model of ``arch``: a registered name, ``torchvision:NAME`` (any
    torchvision classification or segmentation builder, ``weights=None``) or, with ``allow_import``,
    ``module.path:factory`` (the user's own code: imported, so never for a name read from a file)."""
    if arch.startswith("torchvision:"):
        model = _torchvision(arch.removeprefix("torchvision:"), kwargs)
    elif ":" in arch:
        if not allow_import:
            raise CBDError(f"the architecture {arch!r} is the user's own code, which cbdnet does not import on a "
                           f"file's word: name it yourself (--arch {arch} on the command line, or pass a model "
                           f"skeleton)")
        model = import_factory(arch)(**kwargs)
        if not isinstance(model, nn.Module):
            raise CBDError(f"architecture {arch}: the factory returned a {type(model).__name__}, not a torch.nn.Module")
    elif arch in ARCHS:
        model = ARCHS[arch](**kwargs)
    else:
        raise CBDError(f"unknown architecture {arch!r}; known: {', '.join(known_archs())}, torchvision:NAME "
                       f"or module.path:factory")
    record(model, arch=arch, arch_kwargs=dict(kwargs))
    return model


# ---------------------------------------------------------------- CIFAR ResNets (He et al. 2016, option A)

class _BasicBlock(nn.Module):
    def __init__(self, in_planes: int, planes: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.pad = planes // 4 if stride != 1 or in_planes != planes else 0

    def shortcut(self, x: torch.Tensor) -> torch.Tensor:
        if not self.pad:
            return x
        return F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, self.pad, self.pad))  # option A: parameter-free

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """The 6n+2-layer CIFAR ResNet, state-dict compatible with the common public checkpoints."""

    if TYPE_CHECKING:  # set by name in __init__ (not a class annotation at run time, which TorchScript would read)
        layer1: nn.Sequential
        layer2: nn.Sequential
        layer3: nn.Sequential

    def __init__(self, blocks_per_stage: int, num_classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        in_planes = 16
        for index, planes in enumerate((16, 32, 64), start=1):
            stage = []
            for block in range(blocks_per_stage):
                stride = 2 if index > 1 and block == 0 else 1
                stage.append(_BasicBlock(in_planes, planes, stride))
                in_planes = planes
            setattr(self, f"layer{index}", nn.Sequential(*stage))
        self.linear = nn.Linear(64, num_classes)
        for module in self.modules():
            if isinstance(module, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(module.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer3(self.layer2(self.layer1(out)))
        out = F.adaptive_avg_pool2d(out, 1).flatten(1)
        return self.linear(out)


for _depth in (20, 32, 44, 56, 110):
    register(f"cifar-resnet{_depth}")(lambda num_classes=10, _n=(_depth - 2) // 6: CifarResNet(_n, num_classes))


# ---------------------------------------------------------------- the demo's small CNN (8x8 digits)

class DigitsCNN(nn.Module):
    """A small CNN for scikit-learn's 8x8 digits: the embedded default of ``cbdnet demo``."""

    def __init__(self, num_classes: int = 10, width: int = 32) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(),
            nn.Conv2d(width, 2 * width, 3, padding=1), nn.BatchNorm2d(2 * width), nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(2 * width, 2 * width, 3, padding=1), nn.BatchNorm2d(2 * width), nn.ReLU(),
            nn.MaxPool2d(2),
        )
        self.classifier = nn.Sequential(nn.Flatten(), nn.Linear(2 * width * 4, 128), nn.ReLU(),
                                        nn.Linear(128, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


register("digits-cnn")(DigitsCNN)


# ---------------------------------------------------------------- checkpoints

MAX_CHECKPOINT_BYTES = 8 << 30  # VGG-16's float32 checkpoint is 0.55 GB
# the tensor dtypes a state dict may hold (what the .cbd file can store); sparse, quantized, complex, float8 and
# meta tensors are refused by name
CHECKPOINT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int64, torch.int32,
                     torch.int16, torch.int8, torch.uint8, torch.bool)


def _read_checkpoint(path: str | os.PathLike) -> tuple[object, str]:
    """The unpickled (``weights_only``) checkpoint and the SHA-256 of its bytes. Only a regular file of at most
    :data:`MAX_CHECKPOINT_BYTES` is read, once: no FIFO or device is opened, and the digest is of what was read."""
    data = read_regular_file(path, what="weights file", max_bytes=MAX_CHECKPOINT_BYTES)
    file = escape_name(os.fspath(path))
    if not (data.startswith(b"PK\x03\x04") or data.startswith(b"\x80")):  # torch zip archive / legacy pickle
        raise WeightError(f"{file} is not a PyTorch checkpoint (expected a state dict written by torch.save)")
    try:
        with warnings.catch_warnings():  # e.g. "pickle protocol 4": the one-line error below says what matters
            warnings.simplefilter("ignore", UserWarning)
            checkpoint = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        found = re.search(r"GLOBAL ([\w.]+)", str(exc))
        what = f"Python objects ({found.group(1)})" if found else "Python objects"
        raise WeightError(
            f"{file} is not a plain state dict: it pickles {what}, e.g. a whole model saved with torch.save(model); "
            f"loading it would need full unpickling, which can run arbitrary code, so it is refused. "
            f"Save model.state_dict() instead") from None
    except Exception as exc:  # noqa: BLE001 - any failure of torch's reader on these bytes is a bad file
        first = (str(exc).splitlines() or [type(exc).__name__])[0]
        raise WeightError(f"cannot read weights {file}: {escape_name(first)}") from None
    return checkpoint, hashlib.sha256(data).hexdigest()


def _check_tensor(key: str, value: torch.Tensor, source: str) -> None:
    """Refuse what a state dict of a float CNN cannot hold: sparse, quantized, meta, complex, float8 tensors."""
    kind = ("sparse" if value.layout != torch.strided else "quantized" if value.is_quantized else
            "meta (data-less)" if value.is_meta else None)
    if kind is None and value.dtype not in CHECKPOINT_DTYPES:
        kind = str(value.dtype).removeprefix("torch.")
    if kind is not None:
        raise WeightError(f"{source}: tensor {escape_name(key)} is a {kind} tensor; cbdnet reads dense float or "
                          "integer tensors only")


# torchvision's published DenseNet files predate its module names: "denselayer1.norm.1.weight" for "norm1.weight"
_OLD_DENSENET_KEY = re.compile(
    r"^(.*denselayer\d+\.(?:norm|relu|conv))\.((?:[12])\.(?:weight|bias|running_mean|running_var|num_batches_tracked))$")


def _modernise_keys(state: dict[str, torch.Tensor], expected: dict) -> dict[str, torch.Tensor]:
    """Rename old-style DenseNet keys (as torchvision's own loader does), only where the new name is expected."""
    renamed = {}
    for key, value in state.items():
        match = _OLD_DENSENET_KEY.match(key)
        new_key = match.group(1) + match.group(2) if match else key
        renamed[new_key if new_key in expected and key not in expected else key] = value
    return renamed


def _state_dict_of(checkpoint: object, source: str) -> dict[str, torch.Tensor]:
    if isinstance(checkpoint, dict):
        for key in ("state_dict", "model", "model_state_dict"):
            if isinstance(checkpoint.get(key), dict):
                checkpoint = checkpoint[key]
                break
    if not isinstance(checkpoint, dict) or not all(isinstance(v, torch.Tensor) for v in checkpoint.values()):
        raise WeightError(f"{source} holds no state dict (expected a dict of tensors or a dict with 'state_dict')")
    odd = next((k for k in checkpoint if not isinstance(k, str)), None)
    if odd is not None:
        raise WeightError(f"{source}: state-dict key {escape_name(repr(odd))} is a {type(odd).__name__}, not a "
                          "string")
    for key, value in checkpoint.items():
        _check_tensor(key, value, source)
    return {k.removeprefix("module."): v for k, v in checkpoint.items()}


def load_weights(model: nn.Module, path: str | os.PathLike) -> nn.Module:
    """Load a checkpoint into ``model`` strictly, listing missing/unexpected keys when it does not fit."""
    expected = model.state_dict()
    checkpoint, digest = _read_checkpoint(path)
    state = _modernise_keys(_state_dict_of(checkpoint, escape_name(os.fspath(path))), expected)
    # old checkpoints predate BatchNorm's num_batches_tracked counter, which inference never reads
    missing = sorted(k for k in set(expected) - set(state) if not k.endswith("num_batches_tracked"))
    unexpected = sorted(set(state) - set(expected))
    mismatched = sorted(k for k in set(state) & set(expected) if state[k].shape != expected[k].shape)
    if missing or unexpected or mismatched:
        parts = []
        for label, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", mismatched)):
            if keys:
                parts.append(f"{label} {len(keys)}: {', '.join(keys[:6])}{' …' if len(keys) > 6 else ''}")
        arch = recorded(model, "arch", type(model).__name__)
        raise WeightError(f"{path} does not fit {arch}: " + "; ".join(parts))
    for key, value in state.items():
        if value.is_floating_point() and not torch.isfinite(value).all():
            raise WeightError(f"{path}: tensor {key} holds NaN/Inf values")
    model.load_state_dict(state, strict=False)
    record(model, weights_sha256=digest)
    return model


def file_sha256(path: str | os.PathLike) -> str:
    """SHA-256 of a file's bytes (what the ``.cbd`` file records of the checkpoint, not its path)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()


# ---------------------------------------------------------------- torchvision's own weights, from the local cache

TORCHVISION_WEIGHTS = {"resnet18": "ResNet18_Weights", "vgg16": "VGG16_Weights",
                       "densenet121": "DenseNet121_Weights", "ssd300": "SSD300_VGG16_Weights"}


def _torchvision_default(arch: str) -> tuple[str, str]:
    """``(enum label, url)`` of torchvision's default weights for ``arch``, e.g. ``ResNet18_Weights.IMAGENET1K_V1``."""
    from torchvision import models as tv
    from torchvision.models import detection as tvd

    name = TORCHVISION_WEIGHTS[arch]
    enum = getattr(tv, name, None) or getattr(tvd, name)
    return f"{name}.{enum.DEFAULT.name}", enum.DEFAULT.url


def torchvision_weights_file(arch: str) -> tuple[Path, str]:
    """The cached file of torchvision's default weights for ``arch`` and their label. cbdnet never downloads:
    the file must already be in ``torch.hub.get_dir()/checkpoints`` (where torchvision itself caches it, e.g.
    after ``torchvision.models.resnet18(weights="DEFAULT")`` on a machine with network access). The file name
    carries the first hex digits of its SHA-256, which are checked, so a truncated copy is refused."""
    if arch not in TORCHVISION_WEIGHTS:
        raise CBDError(f"torchvision weights: torchvision publishes no weights for {arch!r} (it does for "
                       f"{', '.join(sorted(TORCHVISION_WEIGHTS))}); give a checkpoint path instead")
    label, url = _torchvision_default(arch)
    path = Path(torch.hub.get_dir()) / "checkpoints" / url.rsplit("/", 1)[-1]
    if not path.is_file():
        raise WeightError(f"torchvision's {label} weights are not in the local cache ({path}) and cbdnet never "
                          f"downloads: copy {url} there, or give a checkpoint path instead")
    prefix = re.search(r"-([a-f0-9]+)\.", path.name)
    if prefix:
        digest = hashlib.sha256()
        with open(path, "rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 22), b""):
                digest.update(chunk)
        if not digest.hexdigest().startswith(prefix.group(1)):
            raise WeightError(f"{path} is corrupt or incomplete: its SHA-256 does not start with {prefix.group(1)} "
                              f"as its name says")
    return path, label


# ---------------------------------------------------------------- the paper's ImageNet/detection/segmentation nets

def _vision(name: str, num_classes: int) -> Callable[..., nn.Module]:
    """torchvision's classifier ``name`` (weights=None); torchvision is imported when one is built, not when
    cbdnet is imported (it pulls in torch._dynamo: seconds at every ``cbdnet`` start)."""
    def builder(num_classes: int = num_classes, **kw) -> nn.Module:
        from torchvision import models as tv
        return getattr(tv, name)(weights=None, num_classes=num_classes, **kw)
    return builder


def _ssd300(num_classes: int = 91, **kw) -> nn.Module:
    from torchvision.models import detection as tvd
    return tvd.ssd300_vgg16(weights=None, weights_backbone=None, num_classes=num_classes, **kw)


def _register_zoo() -> None:
    """torchvision definitions (weights=None, so torchvision state dicts load unchanged) and SegNet."""
    from .segnet import SegNet, SegNetBasic

    for name in ("resnet18", "vgg16", "densenet121"):
        register(name)(_vision(name, 1000))
    register("ssd300")(_ssd300)
    register("segnet")(SegNet)
    register("segnet-basic")(SegNetBasic)


_register_zoo()


# ---------------------------------------------------------------- architecture arguments a file may give

MAX_CLASSES = 22_000  # ImageNet-21k has 21,841 classes
_CLASSES: dict[str, tuple[type, float, float]] = {"num_classes": (int, 1, MAX_CLASSES)}
# per registered builder: the parameters it documents, with the bounds a file's arch_kwargs may give them (so
# that a small file cannot have the loader build an enormous model; the largest allowed is about 100 M weights)
ARCH_PARAMS: dict[str, dict[str, tuple[type, float, float]]] = {
    **{f"cifar-resnet{depth}": _CLASSES for depth in (20, 32, 44, 56, 110)},
    "digits-cnn": {**_CLASSES, "width": (int, 1, 1024)},
    "resnet18": _CLASSES, "vgg16": _CLASSES, "densenet121": _CLASSES,
    "ssd300": {"num_classes": (int, 1, 1000)},
    "segnet": {"num_classes": (int, 1, 1000), "in_channels": (int, 1, 64), "width_mult": (float, 1 / 64, 4.0)},
    "segnet-basic": {"num_classes": (int, 1, 1000), "in_channels": (int, 1, 64), "width": (int, 1, 1024),
                     "kernel_size": (int, 1, 15), "depth": (int, 1, 8)},
}
TORCHVISION_PARAMS = _CLASSES  # torchvision:NAME read from a file: its head size only


def check_arch_kwargs(arch: str, kwargs: dict) -> None:
    """Refuse (CBDError, one line) architecture arguments read from a file that the builder does not document
    or that are out of their bounds (:data:`ARCH_PARAMS`). An architecture registered by the user (not in that
    table) gets the file reader's generic bounds only."""
    params = TORCHVISION_PARAMS if arch.startswith("torchvision:") else ARCH_PARAMS.get(arch)
    if params is None:
        return
    for key, value in kwargs.items():
        shown = escape_name(str(key), max_len=60)
        name = escape_name(arch, max_len=60)
        if key not in params:
            raise CBDError(f"cannot build {name} with arch_kwargs {shown}: not a parameter it takes from a file (it "
                           f"takes {', '.join(params)}); to build it otherwise, pass the model: load(path, model)")
        kind, low, high = params[key]
        number = isinstance(value, (int, float)) and not isinstance(value, bool) and (
            kind is float or isinstance(value, int))
        if not number or not low <= value <= high:
            raise CBDError(f"cannot build {name} with arch_kwargs {shown} = {value!r}"[:160] + f": it takes "
                           f"{kind.__name__} {key} in [{low:g}, {high:g}] from a file")
