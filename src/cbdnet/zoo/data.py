"""Data specs (``KIND:PATH``) -> evaluation/calibration data sets, validated with clear messages.

- ``cifar10-npz:PATH``: the npz layout of ``../shared`` (``images`` uint8 [N,32,32,3] RGB, ``labels`` [N]),
  normalised with the ImageNet mean/std that the public CIFAR ResNet checkpoints were trained with.
- ``digits[:train|test]``: scikit-learn's bundled 8x8 digits (the demo's data), a fixed 70/30 split.
- ``imagefolder:PATH``: an ImageNet-style folder (one sub-folder per class, sorted names = class indices, as
  torchvision's ``ImageFolder``), read lazily with the standard 256-resize / 224-centre-crop and ImageNet mean/std.
- ``camvid-npz:PATH[:split]``: the CamVid npz of ``../shared`` (``{split}_images`` uint8 [N,H,W,3],
  ``{split}_labels`` [N,H,W], classes 0..10, 11 = void); split defaults to ``test``; ImageNet mean/std.
- ``voc:PATH``: a VOCdevkit-style folder (``JPEGImages/``, ``Annotations/``, ``ImageSets/Main/test.txt``), the
  20 VOC classes; images go to the model as [0, 1] tensors (torchvision detectors normalise internally).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..errors import DataError
from ..fileio import NpzFormatError, escape_name, open_image_bounded, read_npz, read_regular_file, walk_files

__all__ = ["ClassificationData", "ImageFolderData", "SegmentationData", "DetectionData", "load_spec", "SPEC_KINDS",
           "CIFAR_MEAN", "CIFAR_STD", "CAMVID_CLASSES", "VOC_CLASSES", "calibration_data", "spec_path"]

MAX_DATA_BYTES = 8 << 30  # one .npz data file, as stored
MAX_NPZ_ARRAY_BYTES = 4 << 30  # the arrays read from one .npz, inflated (a compressed .npz can be a zip bomb)
MAX_IMAGE_PIXELS = 64_000_000  # one decoded image (8000 x 8000)
MAX_IMAGE_ASPECT = 50.0  # longest side / shortest side, checked before resizing (1 x 6000 would resize to 256 x 1.5M)
MAX_IMAGES = 10_000_000  # files in an image folder
MAX_LIST_BYTES = 64 << 20  # a VOC image list or annotation
CIFAR_MEAN = (0.485, 0.456, 0.406)
CIFAR_STD = (0.229, 0.224, 0.225)
SPEC_KINDS = ("cifar10-npz", "digits", "imagefolder", "camvid-npz", "voc")
IMAGENET_MEAN, IMAGENET_STD = CIFAR_MEAN, CIFAR_STD
CAMVID_CLASSES = ("Sky", "Building", "Pole", "Road", "Pavement", "Tree", "SignSymbol", "Fence", "Car",
                  "Pedestrian", "Bicyclist")
VOC_CLASSES = ("aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
               "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train",
               "tvmonitor")


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
    if not os.path.lexists(path):
        raise DataError(f"data file not found: {escape_name(path)}" + (f" (expected {layout})" if layout else ""))
    data = read_regular_file(path, what="data file", max_bytes=MAX_DATA_BYTES)  # no FIFO/device, bounded
    try:  # member sizes and .npy headers checked before anything is inflated; bounded reads
        return read_npz(data, list(required), shown=escape_name(path), max_array_bytes=MAX_NPZ_ARRAY_BYTES)
    except KeyError as exc:
        raise DataError(f"{path}: missing array(s) {exc.args[0]}; expected {layout or sorted(required)}") from None
    except NpzFormatError as exc:
        raise DataError(f"{exc}" + (f"; expected {layout}" if layout else "")) from None


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


IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


class ImageFolderData:
    """An ImageNet-style folder, decoded lazily batch by batch (256 resize, 224 centre crop, mean/std). Files
    are found without following a symbolic-link loop (:func:`cbdnet.fileio.walk_files`); each image's size and
    aspect ratio are checked from its header before it is decoded or resized, and Pillow's decompression-bomb
    checks become :class:`DataError`."""

    task = "classification"

    def __init__(self, root: str) -> None:
        from torchvision import transforms

        if not os.path.isdir(root):
            raise DataError(f"imagefolder: {escape_name(root)} is not a directory")
        self.classes = sorted(entry.name for entry in os.scandir(root) if entry.is_dir())
        if not self.classes:
            raise DataError(f"imagefolder: {escape_name(root)} has no class sub-folders")
        self.samples: list[tuple[str, int]] = []
        for label, name in enumerate(self.classes):
            files = walk_files(os.path.join(root, name), suffixes=IMAGE_SUFFIXES, max_files=MAX_IMAGES)
            self.samples += [(os.fspath(f), label) for f in files]
            if len(self.samples) > MAX_IMAGES:
                raise DataError(f"imagefolder: {escape_name(root)} holds more than {MAX_IMAGES:,} images")
        self.transform = transforms.Compose([transforms.Resize(256), transforms.CenterCrop(224),
                                             transforms.ToTensor(), transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)])
        self.name = f"imagefolder:{root}"
        self.labels = torch.tensor([label for _, label in self.samples], dtype=torch.int64)

    def __len__(self) -> int:
        return len(self.samples)

    def image(self, index: int) -> torch.Tensor:
        path = self.samples[index][0]
        picture = open_image_bounded(path, MAX_IMAGE_PIXELS, max_aspect=MAX_IMAGE_ASPECT)
        return self.transform(picture.convert("RGB"))

    def batches(self, batch_size: int):
        for start in range(0, len(self), batch_size):
            index = range(start, min(start + batch_size, len(self)))
            yield torch.stack([self.image(i) for i in index]), self.labels[start:index.stop]


@dataclass
class SegmentationData:
    images: torch.Tensor  # float32 [N, 3, H, W], normalised
    labels: torch.Tensor  # int64 [N, H, W]; values >= num_classes are ignored (void)
    name: str
    classes: tuple[str, ...]
    ignore_index: int
    task: str = "segmentation"

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def batches(self, batch_size: int):
        for start in range(0, len(self), batch_size):
            yield self.images[start:start + batch_size], self.labels[start:start + batch_size]


def _camvid(rest: str) -> SegmentationData:
    path, split = rest, "test"
    head, _, tail = rest.rpartition(":")
    if head and tail in ("train", "val", "test"):
        path, split = head, tail
    keys = {f"{split}_images": (), f"{split}_labels": ()}
    arrays = _open_npz(path, keys)
    images, labels = arrays[f"{split}_images"], arrays[f"{split}_labels"]
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[3] != 3:
        raise DataError(f"{path}: '{split}_images' is {images.dtype} {images.shape}; expected uint8 [N,H,W,3] RGB")
    if labels.shape != images.shape[:3] or not np.issubdtype(labels.dtype, np.integer):
        raise DataError(f"{path}: '{split}_labels' is {labels.dtype} {labels.shape}; expected integers "
                        f"{list(images.shape[:3])}")
    if labels.size and (labels.min() < 0 or labels.max() > len(CAMVID_CLASSES)):
        raise DataError(f"{path}: labels must lie in 0..{len(CAMVID_CLASSES)} (void = {len(CAMVID_CLASSES)})")
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float().div_(255.0)
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return SegmentationData((x - mean) / std, torch.from_numpy(labels.astype(np.int64)),
                            f"camvid-npz:{path}:{split}", CAMVID_CLASSES, len(CAMVID_CLASSES))


@dataclass
class DetectionData:
    """VOC-style detection data: image paths and, per image, float boxes [K,4] (x1,y1,x2,y2 as in the XML),
    class indices [K] (0-based into ``classes``; the model's label is this + 1, 0 being background) and
    difficult flags [K]."""

    root: Path
    ids: list[str]
    boxes: list[np.ndarray]
    labels: list[np.ndarray]
    difficult: list[np.ndarray]
    classes: tuple[str, ...]
    name: str
    task: str = "detection"

    def __len__(self) -> int:
        return len(self.ids)

    def image(self, index: int) -> torch.Tensor:
        path = self.root / "JPEGImages" / f"{self.ids[index]}.jpg"
        picture = open_image_bounded(path, MAX_IMAGE_PIXELS, max_aspect=MAX_IMAGE_ASPECT)
        array = np.asarray(picture.convert("RGB"))
        return torch.from_numpy(array.copy()).permute(2, 0, 1).float().div_(255.0)

    def batches(self, batch_size: int):
        for start in range(0, len(self), batch_size):
            index = range(start, min(start + batch_size, len(self)))
            yield [self.image(i) for i in index], list(index)


def _voc_annotation(path: Path, classes: tuple[str, ...]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    import xml.etree.ElementTree as ET

    raw = read_regular_file(path, what="VOC annotation", max_bytes=MAX_LIST_BYTES)
    try:
        root = ET.fromstring(raw)
    except ET.ParseError as exc:
        raise DataError(f"cannot read annotation {path}: {exc}") from None
    boxes, labels, difficult = [], [], []
    for obj in root.iter("object"):
        name = (obj.findtext("name") or "").strip()
        if name not in classes:
            raise DataError(f"{path}: unknown class {name!r}; expected one of the VOC classes")
        box = obj.find("bndbox")
        try:
            coords = [float(box.findtext(k, "")) for k in ("xmin", "ymin", "xmax", "ymax")]  # type: ignore[union-attr]
        except (AttributeError, ValueError):  # no bndbox, or a coordinate missing or not a number
            raise DataError(f"{path}: an object has no valid bndbox") from None
        boxes.append(coords)
        labels.append(classes.index(name))
        difficult.append((obj.findtext("difficult") or "0").strip() == "1")
    return (np.asarray(boxes, np.float64).reshape(-1, 4), np.asarray(labels, np.int64),
            np.asarray(difficult, np.bool_))


def _voc(rest: str) -> DetectionData:
    root = Path(rest)
    listing = root / "ImageSets" / "Main" / "test.txt"
    if not os.path.lexists(listing):
        raise DataError(f"voc: {listing} not found (expected a VOCdevkit-style folder: JPEGImages, Annotations, "
                        "ImageSets/Main/test.txt)")
    raw = read_regular_file(listing, what="VOC image list", max_bytes=MAX_LIST_BYTES)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(f"voc: {escape_name(os.fspath(listing))} is not UTF-8 text (byte {exc.start})") from None
    ids = [line.split()[0] for line in text.splitlines() if line.strip()]
    if not ids:
        raise DataError(f"voc: {listing} lists no images")
    parsed = [_voc_annotation(root / "Annotations" / f"{i}.xml", VOC_CLASSES) for i in ids]
    return DetectionData(root, ids, [p[0] for p in parsed], [p[1] for p in parsed], [p[2] for p in parsed],
                         VOC_CLASSES, f"voc:{rest}")


def spec_path(spec: str) -> str | None:
    """The file or folder a data spec reads (None for the bundled digits): an input no output may replace."""
    kind, _, rest = spec.partition(":")
    if kind == "camvid-npz":
        head, _, tail = rest.rpartition(":")
        return head if head and tail in ("train", "val", "test") else rest or None
    return rest or None if kind in SPEC_KINDS and kind != "digits" else None


def load_spec(spec: str):
    """Open a data spec such as ``cifar10-npz:../shared/data/cifar10_test.npz``."""
    kind, _, rest = spec.partition(":")
    if kind == "cifar10-npz":
        if not rest:
            raise DataError("cifar10-npz needs a path: cifar10-npz:PATH")
        return _cifar10(rest)
    if kind == "digits":
        return digits(rest or "test")
    if kind in ("imagefolder", "camvid-npz", "voc") and not rest:
        raise DataError(f"{kind} needs a path: {kind}:PATH")
    if kind == "imagefolder":
        return ImageFolderData(rest)
    if kind == "camvid-npz":
        return _camvid(rest)
    if kind == "voc":
        return _voc(rest)
    raise DataError(f"unknown data spec {spec!r}; expected one of: {', '.join(k + ':PATH' for k in SPEC_KINDS)}")


def _is_test_split(spec: str, data) -> bool:
    if re.search(r"(^|[^a-z])test", spec.rsplit("/", 1)[-1].lower()):
        return True
    return str(getattr(data, "name", "")).endswith(":test")  # e.g. camvid-npz:PATH, whose default split is test


def calibration_data(spec: str):
    """The data set of a spec, checked to be usable for calibration: labelled images (classification or
    segmentation), not empty, and not test images (by file name or split)."""
    if re.search(r"(^|[^a-z])test", spec.rsplit("/", 1)[-1].lower()):
        raise DataError(f"refusing to calibrate on {spec}: calibration must not use test images")
    data = load_spec(spec)
    if _is_test_split(spec, data):
        raise DataError(f"refusing to calibrate on {data.name}: calibration must not use test images; "
                        f"name a training split (e.g. {spec}:train)")
    if getattr(data, "task", "classification") not in ("classification", "segmentation"):
        raise DataError(f"calibration needs labelled images (classification or segmentation data); {spec} is "
                        f"{data.task} data")
    if len(data) == 0:
        raise DataError(f"calibration set {spec} is empty")
    return data
