"""Task metrics: classification top-1 / top-5, segmentation IoU / mIoU / pixel accuracy, detection VOC mAP@0.5."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from ..errors import DataError

__all__ = ["iter_batches", "evaluate", "evaluate_classification", "evaluate_segmentation", "evaluate_detection",
           "confusion_matrix", "segmentation_scores", "voc_iou", "voc_ap", "voc_class_ap", "voc_map",
           "check_data_fits"]


def iter_batches(data, batch_size: int):
    """``(images, labels)`` batches of a cbdnet data set (its ``batches(size)``) or of any iterable of pairs
    (a ``DataLoader``, a list)."""
    if hasattr(data, "batches") and callable(data.batches):
        yield from data.batches(batch_size)
        return
    for item in data:
        if not isinstance(item, (tuple, list)) or len(item) != 2:
            raise TypeError("evaluation data must yield (images, labels) pairs")
        yield item[0], torch.as_tensor(item[1])


def logits_of(output):
    """The class scores of a model's output: the tensor itself, or the ``"out"`` entry of torchvision's
    segmentation models' dict."""
    return output["out"] if isinstance(output, dict) and "out" in output else output


def _total(data) -> int | None:
    try:
        return len(data.dataset) if hasattr(data, "dataset") else len(data)
    except TypeError:
        return None


@torch.no_grad()
def evaluate_classification(model: nn.Module, data, batch_size: int = 500, progress: bool = True) -> dict:
    """Top-1 and top-5 accuracy (fractions) of ``model`` on ``data`` (a cbdnet data set or any iterable of
    ``(images, labels)`` batches)."""
    model.eval()
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    top1 = top5 = total = 0
    bar = tqdm(total=_total(data), desc="eval", unit="img", disable=None if progress else True, leave=False)
    for images, labels in iter_batches(data, batch_size):
        logits = logits_of(model(images.to(dtype))).float()
        k = min(5, logits.shape[1])
        best = logits.topk(k, dim=1).indices
        top1 += int((best[:, 0] == labels).sum())
        top5 += int((best == labels[:, None]).any(dim=1).sum())
        total += len(labels)
        bar.update(len(labels))
    bar.close()
    return {"top1": top1 / total if total else 0.0, "top5": top5 / total if total else 0.0, "n": total}


# ---------------------------------------------------------------- segmentation: IoU from a confusion matrix

def confusion_matrix(pred: torch.Tensor, target: torch.Tensor, num_classes: int) -> torch.Tensor:
    """``[num_classes, num_classes]`` int64 counts (rows: true class, columns: predicted); targets outside
    ``0..num_classes-1`` (e.g. CamVid's void = 11) are ignored."""
    pred, target = pred.reshape(-1).long(), target.reshape(-1).long()
    keep = (target >= 0) & (target < num_classes)
    index = target[keep] * num_classes + pred[keep].clamp(0, num_classes - 1)
    return torch.bincount(index, minlength=num_classes * num_classes).view(num_classes, num_classes)


def segmentation_scores(confusion: torch.Tensor) -> dict:
    """Per-class IoU = TP / (TP + FP + FN), their mean over classes present in the truth or the predictions
    (``miou``), and global pixel accuracy over non-ignored pixels."""
    confusion = confusion.double()
    tp = confusion.diag()
    union = confusion.sum(0) + confusion.sum(1) - tp
    iou = torch.where(union > 0, tp / union.clamp(min=1), torch.full_like(tp, float("nan")))
    valid = ~torch.isnan(iou)
    total = confusion.sum()
    return {"miou": float(iou[valid].mean()) if valid.any() else 0.0,
            "pixel_acc": float(tp.sum() / total) if total > 0 else 0.0,
            "iou": [None if torch.isnan(v) else float(v) for v in iou], "pixels": int(total)}


@torch.no_grad()
def evaluate_segmentation(model: nn.Module, data, batch_size: int = 8, progress: bool = True) -> dict:
    """Per-class IoU, mIoU over the data's classes (void/ignored pixels excluded) and global pixel accuracy of
    ``model`` (logits [N, C, H, W]) on ``data`` (a ``SegmentationData``)."""
    model.eval()
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    confusion = torch.zeros(data.num_classes, data.num_classes, dtype=torch.int64)
    bar = tqdm(total=len(data), desc="eval", unit="img", disable=None if progress else True, leave=False)
    for images, labels in data.batches(batch_size):
        logits = logits_of(model(images.to(dtype))).float()
        if logits.shape[-2:] != labels.shape[-2:]:
            raise ValueError(f"model output {tuple(logits.shape)} does not match labels {tuple(labels.shape)}")
        confusion += confusion_matrix(logits.argmax(1), labels, data.num_classes)
        bar.update(len(labels))
    bar.close()
    scores = segmentation_scores(confusion)
    return {"miou": scores["miou"], "pixel_acc": scores["pixel_acc"],
            "iou": dict(zip(data.classes, scores["iou"], strict=True)), "pixels": scores["pixels"], "n": len(data)}


# ---------------------------------------------------------------- detection: PASCAL VOC mAP@0.5
# Hand-written rather than taken from a library: the common packaged mAP metrics (torchmetrics,
# pycocotools, faster-coco-eval) implement the COCO protocol (101-point interpolation, crowd regions),
# which gives different numbers from the VOC devkit's (all-point or 11-point interpolation, "difficult"
# objects neither rewarded nor penalised, a detection matched only when IoU > 0.5, +1-pixel box areas).

def voc_iou(box: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    """IoU of one box with each of ``boxes`` (x1, y1, x2, y2, inclusive pixel coordinates: the VOC devkit's
    +1 convention for widths, heights and areas)."""
    ix1 = np.maximum(boxes[:, 0], box[0])
    iy1 = np.maximum(boxes[:, 1], box[1])
    ix2 = np.minimum(boxes[:, 2], box[2])
    iy2 = np.minimum(boxes[:, 3], box[3])
    inter = np.maximum(ix2 - ix1 + 1.0, 0.0) * np.maximum(iy2 - iy1 + 1.0, 0.0)
    area = (box[2] - box[0] + 1.0) * (box[3] - box[1] + 1.0)
    areas = (boxes[:, 2] - boxes[:, 0] + 1.0) * (boxes[:, 3] - boxes[:, 1] + 1.0)
    return inter / (area + areas - inter)


def voc_ap(recall: np.ndarray, precision: np.ndarray, eleven_point: bool = False) -> float:
    """Average precision from a precision/recall curve: the area under its monotone (running-max from the
    right) envelope (VOC2010+), or the mean of the best precision at recall >= 0, 0.1, ..., 1 (VOC2007)."""
    if eleven_point:
        points = [precision[recall >= t].max() if (recall >= t).any() else 0.0 for t in np.linspace(0, 1, 11)]
        return float(np.mean(points))
    mrec = np.concatenate([[0.0], recall, [1.0]])
    mpre = np.concatenate([[0.0], precision, [0.0]])
    mpre = np.maximum.accumulate(mpre[::-1])[::-1]
    change = np.where(mrec[1:] != mrec[:-1])[0]
    return float(np.sum((mrec[change + 1] - mrec[change]) * mpre[change + 1]))


def voc_class_ap(detections: list[tuple[int, float, np.ndarray]], truths: dict[int, tuple[np.ndarray, np.ndarray]],
                 iou_threshold: float = 0.5, eleven_point: bool = False) -> float | None:
    """AP of one class. ``detections``: (image index, score, box); ``truths``: image index -> (boxes [K,4],
    difficult [K]). Detections are taken by falling score; each is a true positive when its best-overlapping
    ground truth (IoU > threshold) is not difficult and not yet claimed, ignored when that box is difficult,
    and a false positive otherwise. None when the class has no non-difficult ground truth."""
    positives = sum(int((~difficult).sum()) for _, difficult in truths.values())
    if positives == 0:
        return None
    claimed = {image: np.zeros(len(boxes), np.bool_) for image, (boxes, _) in truths.items()}
    order = sorted(range(len(detections)), key=lambda i: -detections[i][1])
    tp, fp = [], []
    for i in order:
        image, _, box = detections[i]
        boxes, difficult = truths.get(image, (np.zeros((0, 4)), np.zeros(0, np.bool_)))
        hit, miss = 0.0, 1.0
        if len(boxes):
            overlaps = voc_iou(np.asarray(box, np.float64), boxes)
            best = int(overlaps.argmax())
            if overlaps[best] > iou_threshold:
                if difficult[best]:
                    hit, miss = 0.0, 0.0
                elif not claimed[image][best]:
                    claimed[image][best] = True
                    hit, miss = 1.0, 0.0
        if hit or miss:
            tp.append(hit)
            fp.append(miss)
    tp_sum, fp_sum = np.cumsum(tp), np.cumsum(fp)
    recall = tp_sum / positives
    precision = tp_sum / np.maximum(tp_sum + fp_sum, np.finfo(np.float64).eps)
    return voc_ap(recall, precision, eleven_point)


def voc_map(predictions: list[dict], data, iou_threshold: float = 0.5, eleven_point: bool = False) -> dict:
    """mAP over the classes of ``data`` (a ``DetectionData``) from per-image predictions (``boxes`` [D,4],
    ``scores`` [D], ``labels`` [D] with 1-based class labels, 0 = background, as torchvision detectors give)."""
    per_class = {}
    for c, name in enumerate(data.classes):
        truths = {i: (data.boxes[i][data.labels[i] == c], data.difficult[i][data.labels[i] == c])
                  for i in range(len(data))}
        detections = []
        for i, pred in enumerate(predictions):
            keep = np.asarray(pred["labels"]) == c + 1
            for box, score in zip(np.asarray(pred["boxes"])[keep], np.asarray(pred["scores"])[keep], strict=True):
                detections.append((i, float(score), box))
        per_class[name] = voc_class_ap(detections, truths, iou_threshold, eleven_point)
    scored = [ap for ap in per_class.values() if ap is not None]
    return {"map50": float(np.mean(scored)) if scored else 0.0, "ap": per_class, "n": len(data),
            "iou_threshold": iou_threshold, "interpolation": "11-point" if eleven_point else "all-point"}


@torch.no_grad()
def evaluate_detection(model: nn.Module, data, batch_size: int = 8, progress: bool = True,
                       eleven_point: bool = False) -> dict:
    """VOC mAP@0.5 of a torchvision-style detector (list of images in, list of dicts out) on ``data``."""
    model.eval()
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    predictions = []
    bar = tqdm(total=len(data), desc="eval", unit="img", disable=None if progress else True, leave=False)
    for images, index in data.batches(batch_size):
        outputs = model([image.to(dtype) for image in images])
        predictions += [{k: v.detach().float().cpu().numpy() if k != "labels" else v.cpu().numpy()
                         for k, v in out.items()} for out in outputs]
        bar.update(len(index))
    bar.close()
    return voc_map(predictions, data, eleven_point=eleven_point)


# ---------------------------------------------------------------- does the data fit the model? (before any work)

def _first_conv_channels(model: nn.Module) -> int | None:
    conv = next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)
    return None if conv is None else int(conv.in_channels)


def _label_range(data) -> tuple[int, int] | None:
    labels = getattr(data, "labels", None)
    if isinstance(labels, torch.Tensor) and labels.numel():
        return int(labels.min()), int(labels.max())
    return None


@torch.no_grad()
def check_data_fits(model: nn.Module, data, name: str) -> None:
    """Refuse data that does not fit ``model`` before any work, with a :class:`DataError` naming the problem:
    an empty set, a channel count the first convolution does not take, a task the model's output does not
    serve (a classifier on segmentation or detection data), labels that are negative or not below the model's
    class count. Runs the model once on (at most) two images."""
    if len(data) == 0:
        raise DataError(f"the data {name} is empty: nothing to evaluate or calibrate on")
    task = getattr(data, "task", "classification")
    if task == "detection":
        _check_detection(model, data, name)
        return
    images, _ = next(iter(iter_batches(data, 2)))
    channels, wanted = int(images.shape[1]), _first_conv_channels(model)
    if wanted is not None and channels != wanted:
        raise DataError(f"the data {name} does not fit the model: it has {channels}-channel images; the model's "
                        f"first convolution takes {wanted} channels")
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    try:
        output = logits_of(model(images.to(dtype)))
    except (RuntimeError, ValueError, IndexError, TypeError) as exc:
        first = (str(exc).splitlines() or [type(exc).__name__])[0][:200]
        raise DataError(f"the data {name} does not fit the model: {first}") from None
    want_dims = 2 if task == "classification" else 4
    if not isinstance(output, torch.Tensor) or output.ndim != want_dims:
        got = f"{output.ndim}-d output" if isinstance(output, torch.Tensor) else type(output).__name__
        kind = "a classifier" if isinstance(output, torch.Tensor) and output.ndim == 2 else "this model"
        raise DataError(f"the data {name} is {task} data, but {kind} gives {got}; a {task} model needs "
                        f"{'[N, classes]' if want_dims == 2 else '[N, classes, H, W]'}")
    classes = int(output.shape[1])
    span = _label_range(data)
    if span is not None and span[0] < 0 and task == "classification":
        raise DataError(f"the data {name} has a negative label ({span[0]})")
    if span is not None and task == "classification" and span[1] >= classes:
        raise DataError(f"the data {name} has label {span[1]}, but the model has {classes} classes (0..{classes - 1})")
    listed = getattr(data, "classes", None)
    if task == "classification" and listed is not None and len(listed) > classes:
        raise DataError(f"the data {name} has {len(listed)} classes, but the model has {classes}")
    if task == "segmentation" and getattr(data, "num_classes", classes) > classes:
        raise DataError(f"the data {name} has {data.num_classes} classes, but the model gives {classes}")


def _check_detection(model: nn.Module, data, name: str) -> None:
    image = data.image(0)
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    try:
        output = model([image.to(dtype)])
    except (RuntimeError, ValueError, IndexError, TypeError, AttributeError) as exc:
        first = (str(exc).splitlines() or [type(exc).__name__])[0][:200]
        raise DataError(f"the data {name} is detection data, which the model does not take: {first}") from None
    if not (isinstance(output, list) and output and isinstance(output[0], dict) and "boxes" in output[0]):
        raise DataError(f"the data {name} is detection data, but the model does not give boxes (a classifier?); "
                        "a detection model (e.g. ssd300) is needed")


def evaluate(model: nn.Module, data, batch_size: int = 500, progress: bool = True) -> dict:
    """The metrics of ``data``'s task (its ``task`` attribute, default classification): top-1/top-5, mIoU and
    pixel accuracy, or VOC mAP@0.5. Segmentation and detection run at most 8 images a batch."""
    task = getattr(data, "task", "classification")
    if task == "segmentation":
        return evaluate_segmentation(model, data, batch_size=min(batch_size, 8), progress=progress)
    if task == "detection":
        return evaluate_detection(model, data, batch_size=min(batch_size, 8), progress=progress)
    return evaluate_classification(model, data, batch_size=batch_size, progress=progress)
