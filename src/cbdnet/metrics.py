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
