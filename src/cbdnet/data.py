"""Data specs (``KIND:PATH``) -> evaluation/calibration data sets, validated with clear messages.

- ``cifar10-npz:PATH``: the npz layout of ``../shared`` (``images`` uint8 [N,32,32,3] RGB, ``labels`` [N]),
  normalised with the ImageNet mean/std that the public CIFAR ResNet checkpoints were trained with.
- ``digits[:train|test]``: scikit-learn's bundled 8x8 digits (the demo's data), a fixed 70/30 split.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .errors import DataError

__all__ = ["ClassificationData", "load_spec", "SPEC_KINDS", "CIFAR_MEAN", "CIFAR_STD"]

CIFAR_MEAN = (0.485, 0.456, 0.406)
CIFAR_STD = (0.229, 0.224, 0.225)
SPEC_KINDS = ("cifar10-npz", "digits")


@dataclass
class ClassificationData:
    images: torch.Tensor  # float32 [N, C, H, W], normalised
    labels: torch.Tensor  # int64 [N]
    name: str
    task: str = "classification"

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def batches(self, batch_size: int):
        for start in range(0, len(self), batch_size):
            yield self.images[start:start + batch_size], self.labels[start:start + batch_size]


CIFAR_LAYOUT = "an .npz with 'images' uint8 [N,32,32,3] RGB and 'labels' integers [N]"


def _open_npz(path: str, required: dict[str, tuple], layout: str = "") -> dict[str, np.ndarray]:
    file = Path(path)
    if not file.is_file():
        raise DataError(f"data file not found: {path}" + (f" (expected {layout})" if layout else ""))
    try:
        with np.load(file, allow_pickle=False) as npz:
            missing = [key for key in required if key not in npz.files]
            if missing:
                raise DataError(f"{path}: missing array(s) {missing}; expected {layout or sorted(required)}")
            arrays = {key: npz[key] for key in required}
    except DataError:
        raise
    except Exception as exc:
        raise DataError(f"{path} is not a readable .npz file ({type(exc).__name__}: {exc})"
                        + (f"; expected {layout}" if layout else "")) from None
    return arrays


def _cifar10(path: str) -> ClassificationData:
    arrays = _open_npz(path, {"images": (), "labels": ()}, CIFAR_LAYOUT)
    images, labels = arrays["images"], arrays["labels"]
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[1:] != (32, 32, 3):
        raise DataError(f"{path}: 'images' is {images.dtype} {images.shape}; expected uint8 [N,32,32,3] RGB")
    if labels.shape != (images.shape[0],) or not np.issubdtype(labels.dtype, np.integer):
        raise DataError(f"{path}: 'labels' is {labels.dtype} {labels.shape}; expected integers [{images.shape[0]}]")
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float().div_(255.0)
    mean = torch.tensor(CIFAR_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(CIFAR_STD).view(1, 3, 1, 1)
    return ClassificationData((x - mean) / std, torch.from_numpy(labels.astype(np.int64)), f"cifar10-npz:{path}")


def digits(split: str = "test") -> ClassificationData:
    """scikit-learn's 1,797 8x8 digits, scaled to [0, 1]; a fixed seeded 70/30 train/test split."""
    from sklearn.datasets import load_digits

    if split not in ("train", "test"):
        raise DataError(f"digits split must be train or test, got {split!r}")
    bunch = load_digits()
    order = np.random.default_rng(0).permutation(len(bunch.target))
    cut = int(0.7 * len(order))
    index = order[:cut] if split == "train" else order[cut:]
    x = torch.from_numpy(bunch.images[index].astype(np.float32) / 16.0).unsqueeze(1)
    return ClassificationData(x, torch.from_numpy(bunch.target[index].astype(np.int64)), f"digits:{split}")


def load_spec(spec: str) -> ClassificationData:
    """Open a data spec such as ``cifar10-npz:../shared/data/cifar10_test.npz``."""
    kind, _, rest = spec.partition(":")
    if kind == "cifar10-npz":
        if not rest:
            raise DataError("cifar10-npz needs a path: cifar10-npz:PATH")
        return _cifar10(rest)
    if kind == "digits":
        return digits(rest or "test")
    raise DataError(f"unknown data spec {spec!r}; expected one of: {', '.join(k + ':PATH' for k in SPEC_KINDS)}")
