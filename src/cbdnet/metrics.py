"""Task metrics: classification top-1 / top-5."""

from __future__ import annotations

import torch
from torch import nn
from tqdm.auto import tqdm

__all__ = ["evaluate_classification"]


@torch.no_grad()
def evaluate_classification(model: nn.Module, data, batch_size: int = 500, progress: bool = True) -> dict:
    """Top-1 and top-5 accuracy (fractions) of ``model`` on ``data`` (a ``ClassificationData``)."""
    model.eval()
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    top1 = top5 = 0
    total = len(data)
    bar = tqdm(total=total, desc="eval", unit="img", disable=None if progress else True, leave=False)
    for images, labels in data.batches(batch_size):
        logits = model(images.to(dtype)).float()
        k = min(5, logits.shape[1])
        best = logits.topk(k, dim=1).indices
        top1 += int((best[:, 0] == labels).sum())
        top5 += int((best == labels[:, None]).any(dim=1).sum())
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
