"""The input each registered architecture expects: its shape and normalisation, for the exporter's example
input and the ONNX file's metadata. Kept in the zoo so that the exporter knows no architecture names."""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import CBDError
from .data import IMAGENET_MEAN, IMAGENET_STD

__all__ = ["InputSpec", "input_spec"]


@dataclass(frozen=True)
class InputSpec:
    """What the model expects: one input of ``shape`` (batch 1), normalised by ``(x - mean) / std``."""

    shape: tuple[int, ...]
    task: str
    mean: tuple[float, ...]
    std: tuple[float, ...]


def input_spec(arch: str | None, shape: tuple[int, ...] | None = None) -> InputSpec:
    """The input of a registered architecture (CIFAR ResNets 1x3x32x32, digits-cnn 1x1x8x8, SegNets
    1x3x180x240 as the CamVid data, ImageNet models 1x3x224x224); ``shape`` overrides the size."""
    name = (arch or "").lower()
    task = "segmentation" if "segnet" in name or "segmentation" in name else "classification"
    default: tuple[int, ...] | None
    if name.startswith("cifar-resnet"):
        default = (1, 3, 32, 32)
    elif name == "digits-cnn":
        return InputSpec(tuple(shape or (1, 1, 8, 8)), task, (0.0,), (1.0,))
    elif name.startswith("segnet"):
        default = (1, 3, 180, 240)
    elif name in ("resnet18", "vgg16", "densenet121") or name.startswith("torchvision:"):
        default = (1, 3, 224, 224)
    else:
        default = None
    size = shape or default
    if size is None:
        raise CBDError(f"no known input shape for architecture {arch!r}: pass --input-shape N,C,H,W")
    return InputSpec(tuple(size), task, IMAGENET_MEAN, IMAGENET_STD)
