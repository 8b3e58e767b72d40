"""Calibration data: any iterable of batches, materialised once into :class:`CalibrationSet`.

Accepted (like nncf's ``dataset=``): a ``DataLoader``, a list or generator of image tensors ``[N, C, H, W]``
(or single images ``[C, H, W]``), or of ``(images, labels)`` pairs, or an object with a ``batches(size)``
method (cbdnet's own data sets). Labels are integer class indices ``[N]`` (classification) or per-pixel maps
``[N, H, W]`` (segmentation, ``ignore_index`` marking void pixels). Where no labels are given, the float
model's own predictions are used (its argmax), computed once before anything is compressed: the calibration
loss then measures how far the compressed model moves from the float one.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import torch
from torch import nn

from ..errors import DataError

__all__ = ["CalibrationSet", "as_calibration_set", "PIXELS_PER_BATCH", "MAX_CALIBRATION_BYTES"]

PIXELS_PER_BATCH = 100 * 32 * 32  # a CIFAR batch of 100; larger images go in proportionally smaller batches
# The calibration images are decoded once and held as float32 (every pass over them, statistics, losses, refit,
# reuses them: an ``imagefolder:`` is never decoded again); more than this is refused, naming the image limit.
# 4 GiB: 6,966 images of 3x224x224, all 50,000 CIFAR-10 training images 15 times over.
MAX_CALIBRATION_BYTES = 4 << 30


@dataclass
class CalibrationSet:
    """Calibration images and labels held in host memory (CPU tensors: a GPU holds one batch at a time),
    re-batched on demand; each batch is moved to ``device`` (None: left on the CPU), where the model runs."""

    images: torch.Tensor  # float32 [N, C, H, W], as the model takes them
    labels: torch.Tensor  # int64 [N] or [N, H, W]
    name: str = "calibration data"
    ignore_index: int = -100
    pseudo_labels: bool = False
    device: torch.device | None = None

    @property
    def task(self) -> str:
        return "segmentation" if self.labels.ndim == 3 else "classification"

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def batches(self, batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for start in range(0, len(self), batch_size):
            images, labels = self.images[start:start + batch_size], self.labels[start:start + batch_size]
            if self.device is not None:
                images, labels = images.to(self.device), labels.to(self.device)
            yield images, labels

    def batch_size_for(self, batch_size: int) -> int:
        """``batch_size`` for 32x32 images, scaled down with the pixel count (240x180 CamVid frames: 2), so
        that the activations kept for the backward pass stay small on a CPU machine."""
        pixels = int(self.images.shape[-1] * self.images.shape[-2]) if self.images.ndim >= 3 else 1
        return max(1, min(batch_size, batch_size * PIXELS_PER_BATCH // (100 * max(pixels, 1))))


def _pairs(data, limit: int | None = None) -> Iterator:
    if hasattr(data, "batches") and callable(data.batches):  # a lazily decoded folder: no image past the limit
        yield from data.batches(100 if limit is None else min(100, limit))
        return
    if isinstance(data, torch.Tensor):
        yield data
        return
    if not isinstance(data, Iterable):
        raise DataError(f"calibration data must be an iterable of batches (a DataLoader, a list of tensors or of "
                        f"(images, labels) pairs); got {type(data).__name__}")
    yield from data


def _split(item, index: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    if isinstance(item, dict):
        item = (item.get("images", item.get("image", item.get("input"))), item.get("labels", item.get("label")))
    if isinstance(item, (tuple, list)):
        if len(item) != 2:
            raise DataError(f"calibration batch {index}: expected images or (images, labels), got a "
                            f"{type(item).__name__} of {len(item)} items")
        images, labels = item
    else:
        images, labels = item, None
    if not isinstance(images, torch.Tensor) or not images.is_floating_point():
        raise DataError(f"calibration batch {index}: images must be a float tensor, got "
                        f"{getattr(images, 'dtype', type(images).__name__)}")
    if images.ndim == 3:
        images = images.unsqueeze(0)
        labels = None if labels is None else torch.as_tensor(labels).reshape(1, *torch.as_tensor(labels).shape)
    if images.ndim != 4:
        raise DataError(f"calibration batch {index}: images must be [N, C, H, W] or [C, H, W], got "
                        f"{list(images.shape)}")
    if labels is not None:
        labels = torch.as_tensor(labels)
        if labels.dtype.is_floating_point or labels.dtype == torch.bool or labels.shape[0] != images.shape[0] \
                or labels.ndim not in (1, 3):
            raise DataError(f"calibration batch {index}: labels must be integers [N] or [N, H, W] matching "
                            f"{images.shape[0]} images, got {labels.dtype} {list(labels.shape)}")
    return images.detach().to("cpu", torch.float32), None if labels is None else labels.to("cpu", torch.int64)


@torch.no_grad()
def _predict(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    was_training = model.training
    parameter = next(model.parameters(), None)
    model.eval()
    try:  # on the model's device (a CUDA model labels CPU-held images batch by batch)
        out = model(images.to(parameter.device) if parameter is not None else images)
    finally:
        model.train(was_training)
    if isinstance(out, dict):
        out = out.get("out", next(iter(out.values())))
    if not isinstance(out, torch.Tensor) or out.ndim not in (2, 4):
        raise DataError("calibration without labels needs a model that returns class scores [N, K] or "
                        "[N, K, H, W]")
    return out.argmax(1).cpu()


def as_calibration_set(data, model: nn.Module | None = None, *, limit: int | None = None,
                       ignore_index: int | None = None, name: str | None = None) -> CalibrationSet:
    """Materialise ``data`` (see the module docstring) into a :class:`CalibrationSet` of at most ``limit``
    images, decoded once (at most :data:`MAX_CALIBRATION_BYTES` of them). Batches without labels get the float
    ``model``'s predictions."""
    if isinstance(data, CalibrationSet) and limit is None:
        return data
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise DataError(f"the calibration image limit must be a positive integer, got {limit!r}")
    images: list[torch.Tensor] = []
    labels: list[torch.Tensor] = []
    unlabelled, count, held = False, 0, 0
    for index, item in enumerate(_pairs(data, limit)):
        x, y = _split(item, index)
        if limit is not None:
            x, y = x[:limit - count], None if y is None else y[:limit - count]
        held += x.numel() * x.element_size()
        if held > MAX_CALIBRATION_BYTES:
            raise DataError(f"the calibration images take more than {MAX_CALIBRATION_BYTES >> 30} GiB as float32 "
                            f"after {count + x.shape[0]:,} images of {list(x.shape[1:])}: use fewer (--calib-images "
                            f"N, CalibrationConfig(images=N))")
        if y is None:
            if model is None:
                raise DataError("calibration batches without labels need the float model to label them")
            y, unlabelled = _predict(model, x), True
        if images and (x.shape[1:] != images[0].shape[1:] or y.ndim != labels[0].ndim):
            raise DataError(f"calibration batch {index} has images {list(x.shape[1:])}; earlier batches had "
                            f"{list(images[0].shape[1:])} (all calibration images must have one size)")
        images.append(x)
        labels.append(y)
        count += x.shape[0]
        if limit is not None and count >= limit:
            break
    if count == 0:
        raise DataError("the calibration data is empty")
    ignore = getattr(data, "ignore_index", -100) if ignore_index is None else ignore_index
    label = name or str(getattr(data, "name", "calibration data"))
    return CalibrationSet(torch.cat(images), torch.cat(labels), label, int(ignore), unlabelled)
