"""Train SegNet-Basic (the library's ``segnet-basic``) on ../shared CamVid 240x180, on the CPU, time-boxed.

Adam (lr 1e-3) with a cosine schedule over the *wall-clock* budget (so the rate has annealed to ~0 when the
budget ends, however fast the machine is), median-frequency class weights over the 11 classes (void = 11
ignored), random horizontal flips; train split for training, val mIoU for model selection; the best weights
are written as a plain state dict, and the test-split scores at the end.

    PYTHONPATH=src python bench/train_segnet.py --until 21:25 --out models/segnet_basic_camvid.pt
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from cbdnet.format.cbdfile import atomic_write  # noqa: E402
from cbdnet.zoo.data import CIFAR_MEAN, CIFAR_STD  # noqa: E402  (ImageNet mean/std, also used by camvid-npz)
from cbdnet.zoo.metrics import confusion_matrix, segmentation_scores  # noqa: E402
from cbdnet.zoo.models import build  # noqa: E402

NUM_CLASSES, VOID = 11, 11


def load_split(npz, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    images = torch.from_numpy(npz[f"{split}_images"]).permute(0, 3, 1, 2).float().div_(255.0)
    mean, std = torch.tensor(CIFAR_MEAN).view(1, 3, 1, 1), torch.tensor(CIFAR_STD).view(1, 3, 1, 1)
    return (images - mean) / std, torch.from_numpy(npz[f"{split}_labels"].astype(np.int64))


def median_frequency_weights(labels: torch.Tensor) -> torch.Tensor:
    """freq(c) = pixels of c / pixels of the images that contain c; weight(c) = median(freq) / freq(c)."""
    counts = torch.stack([torch.bincount(l.reshape(-1), minlength=VOID + 1)[:NUM_CLASSES] for l in labels]).double()
    image_pixels = labels[0].numel()
    present = (counts > 0).double() * image_pixels
    freq = counts.sum(0) / present.sum(0).clamp(min=1)
    return (freq.median() / freq).float()


@torch.no_grad()
def evaluate(model, images, labels, batch: int = 16) -> dict:
    model.eval()
    confusion = torch.zeros(NUM_CLASSES, NUM_CLASSES, dtype=torch.int64)
    for start in range(0, len(images), batch):
        pred = model(images[start:start + batch]).argmax(1)
        confusion += confusion_matrix(pred, labels[start:start + batch], NUM_CLASSES)
    return segmentation_scores(confusion)


def save_state(model, path: Path) -> None:
    import io

    buffer = io.BytesIO()
    torch.save({k: v.detach().clone() for k, v in model.state_dict().items()}, buffer)
    atomic_write(path, buffer.getvalue())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=str(Path(__file__).resolve().parents[2] / "shared/data/camvid_240x180.npz"))
    parser.add_argument("--out", default="models/segnet_basic_camvid.pt")
    parser.add_argument("--report", default="bench/out/segnet_train.json")
    parser.add_argument("--until", default=None, help="UTC HH:MM when training stops (default: --minutes)")
    parser.add_argument("--minutes", type=float, default=60.0, help="training budget when --until is not given")
    parser.add_argument("--max-epochs", type=int, default=1000)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    start = time.time()
    if args.until:
        now = dt.datetime.now(dt.UTC)
        hh, mm = map(int, args.until.split(":"))
        end = now.replace(hour=hh, minute=mm, second=0, microsecond=0)
        if end <= now:
            end += dt.timedelta(days=1)
        budget = (end - now).total_seconds()
    else:
        budget = args.minutes * 60
    with np.load(args.data, allow_pickle=False) as npz:
        train_x, train_y = load_split(npz, "train")
        val_x, val_y = load_split(npz, "val")
        test_x, test_y = load_split(npz, "test")
    weights = median_frequency_weights(train_y)
    print(f"train {len(train_x)} val {len(val_x)} test {len(test_x)}; budget {budget / 60:.1f} min; "
          f"class weights {[round(float(w), 3) for w in weights]}", flush=True)

    model = build("segnet-basic")
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    generator = torch.Generator().manual_seed(args.seed)
    best, history, last_epoch_s = -1.0, [], 0.0
    for epoch in range(1, args.max_epochs + 1):
        elapsed = time.time() - start
        if elapsed + last_epoch_s > budget:
            break
        epoch_start, running, steps = time.time(), 0.0, 0
        model.train()
        order = torch.randperm(len(train_x), generator=generator)
        for first in range(0, len(order), args.batch_size):
            index = order[first:first + args.batch_size]
            x, y = train_x[index], train_y[index]
            flip = torch.rand(len(index), generator=generator) < 0.5
            x[flip], y[flip] = x[flip].flip(-1), y[flip].flip(-1)
            fraction = min(1.0, (time.time() - start) / budget)
            for group in optimizer.param_groups:
                group["lr"] = args.lr * 0.5 * (1 + math.cos(math.pi * fraction))
            loss = F.cross_entropy(model(x), y, weight=weights, ignore_index=VOID)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            running, steps = running + float(loss.detach()), steps + 1
        scores = evaluate(model, val_x, val_y)
        last_epoch_s = time.time() - epoch_start
        history.append({"epoch": epoch, "loss": running / steps, "val_miou": scores["miou"],
                        "val_pixel_acc": scores["pixel_acc"], "lr": optimizer.param_groups[0]["lr"],
                        "seconds": last_epoch_s})
        if scores["miou"] > best:
            best = scores["miou"]
            save_state(model, Path(args.out))
        print(f"epoch {epoch:3d} loss {running / steps:.4f} val mIoU {scores['miou']:.4f} "
              f"acc {scores['pixel_acc']:.4f} lr {optimizer.param_groups[0]['lr']:.2e} {last_epoch_s:.0f}s "
              f"(best {best:.4f})", flush=True)

    model.load_state_dict(torch.load(args.out, map_location="cpu", weights_only=True))
    test = evaluate(model, test_x, test_y)
    val = evaluate(model, val_x, val_y)
    report = {"arch": "segnet-basic", "weights": args.out, "test": test, "val": val, "history": history,
              "train_seconds": time.time() - start, "threads": args.threads, "batch_size": args.batch_size,
              "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"), "machine": os.uname().nodename}
    Path(args.report).parent.mkdir(parents=True, exist_ok=True)
    Path(args.report).write_text(json.dumps(report, indent=2) + "\n")
    print(f"test mIoU {test['miou']:.4f} pixel acc {test['pixel_acc']:.4f}; val mIoU {val['miou']:.4f}", flush=True)


if __name__ == "__main__":
    main()
