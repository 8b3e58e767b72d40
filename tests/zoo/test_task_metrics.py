"""Segmentation and detection metrics on small generated data with hand-computed answers, and the data specs
(camvid-npz, voc, imagefolder) that feed them."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from cbdnet.errors import DataError
from cbdnet.zoo.data import VOC_CLASSES, load_spec
from cbdnet.zoo.metrics import (
    confusion_matrix,
    evaluate_classification,
    evaluate_detection,
    evaluate_segmentation,
    segmentation_scores,
    voc_ap,
    voc_class_ap,
    voc_iou,
    voc_map,
)

# ---------------------------------------------------------------- segmentation


def test_confusion_ignores_void_and_perfect_prediction_scores_one():
    target = torch.tensor([[0, 1, 2], [11, 2, 1]])
    confusion = confusion_matrix(target.clamp(max=2), target, 3)
    assert int(confusion.sum()) == 5  # the void pixel is not counted
    scores = segmentation_scores(confusion)
    assert scores["miou"] == 1.0 and scores["pixel_acc"] == 1.0


def test_hand_computed_iou():
    # truth:  0 0 1 1 ; prediction: 0 1 1 1  -> class 0: TP 1, FN 1 -> 1/2 ; class 1: TP 2, FP 1 -> 2/3
    target = torch.tensor([0, 0, 1, 1, 11, 11])
    pred = torch.tensor([0, 1, 1, 1, 0, 1])
    scores = segmentation_scores(confusion_matrix(pred, target, 2))
    assert scores["iou"] == pytest.approx([0.5, 2 / 3])
    assert scores["miou"] == pytest.approx((0.5 + 2 / 3) / 2)
    assert scores["pixel_acc"] == pytest.approx(3 / 4)


def _camvid_npz(tmp_path, labels: np.ndarray):
    n, h, w = labels.shape
    images = np.random.default_rng(0).integers(0, 255, (n, h, w, 3), dtype=np.uint8)
    path = tmp_path / "camvid.npz"
    np.savez(path, test_images=images, test_labels=labels.astype(np.uint8), val_images=images[:1],
             val_labels=labels[:1].astype(np.uint8))
    return path


class _Oracle(torch.nn.Module):
    """Returns one-hot logits of fixed label maps (a 'model' with known predictions)."""

    def __init__(self, maps: torch.Tensor, classes: int) -> None:
        super().__init__()
        self.maps, self.classes, self.dummy = maps, classes, torch.nn.Parameter(torch.zeros(1))
        self.seen = 0

    def forward(self, x):
        maps = self.maps[self.seen:self.seen + len(x)]
        self.seen += len(x)
        return torch.nn.functional.one_hot(maps.clamp(max=self.classes - 1), self.classes).permute(0, 3, 1, 2).float()


def test_camvid_spec_and_segmentation_eval(tmp_path):
    labels = np.random.default_rng(1).integers(0, 12, (3, 6, 8))
    path = _camvid_npz(tmp_path, labels)
    data = load_spec(f"camvid-npz:{path}")
    assert data.task == "segmentation" and len(data) == 3 and data.num_classes == 11
    assert tuple(data.images.shape) == (3, 3, 6, 8)
    perfect = evaluate_segmentation(_Oracle(torch.from_numpy(labels), 11), data, batch_size=2, progress=False)
    assert perfect["miou"] == 1.0 and perfect["pixel_acc"] == 1.0
    assert perfect["pixels"] == int((labels != 11).sum())
    # everything predicted as class 0: IoU(0) = |truth 0| / |non-void|, every other class 0
    zeros = evaluate_segmentation(_Oracle(torch.zeros_like(torch.from_numpy(labels)), 11), data, progress=False)
    valid = labels != 11
    assert zeros["iou"]["Sky"] == pytest.approx((labels == 0).sum() / valid.sum())
    assert zeros["miou"] == pytest.approx((labels == 0).sum() / valid.sum() / 11)
    assert len(load_spec(f"camvid-npz:{path}:val")) == 1


def test_camvid_spec_errors(tmp_path):
    path = _camvid_npz(tmp_path, np.full((1, 2, 2), 12))
    with pytest.raises(DataError, match="labels must lie"):
        load_spec(f"camvid-npz:{path}")
    with pytest.raises(DataError, match="missing"):
        load_spec(f"camvid-npz:{path}:train")
    with pytest.raises(DataError, match="needs a path"):
        load_spec("camvid-npz:")


# ---------------------------------------------------------------- detection


def test_voc_iou_uses_inclusive_pixels():
    box = np.array([0.0, 0.0, 9.0, 9.0])  # 10x10 pixels
    other = np.array([[5.0, 0.0, 14.0, 9.0], [0.0, 0.0, 9.0, 9.0], [20.0, 20.0, 30.0, 30.0]])
    assert voc_iou(box, other) == pytest.approx([50 / 150, 1.0, 0.0])


def test_voc_ap_interpolations():
    # one TP then one FP then one TP, 2 positives: recall .5,.5,1 ; precision 1,.5,2/3
    recall, precision = np.array([0.5, 0.5, 1.0]), np.array([1.0, 0.5, 2 / 3])
    assert voc_ap(recall, precision) == pytest.approx(0.5 * 1 + 0.5 * 2 / 3)
    assert voc_ap(recall, precision, eleven_point=True) == pytest.approx((6 * 1 + 5 * 2 / 3) / 11)


def test_voc_class_ap_matching_rules():
    truths = {0: (np.array([[0, 0, 9, 9], [20, 20, 29, 29]], float), np.array([False, False])),
              1: (np.array([[0, 0, 9, 9]], float), np.array([True]))}
    hit_a, hit_b = np.array([0, 0, 9, 9.0]), np.array([20, 20, 29, 29.0])
    # perfect
    assert voc_class_ap([(0, 0.9, hit_a), (0, 0.8, hit_b)], truths) == 1.0
    # a detection on the difficult box is ignored, not a false positive
    assert voc_class_ap([(1, 0.95, hit_a), (0, 0.9, hit_a), (0, 0.8, hit_b)], truths) == 1.0
    # duplicate (higher score) then the rest: TP, FP(duplicate), TP -> 0.5*1 + 0.5*2/3
    ap = voc_class_ap([(0, 0.9, hit_a), (0, 0.85, hit_a), (0, 0.8, hit_b)], truths)
    assert ap == pytest.approx(0.5 + 0.5 * 2 / 3)
    # a box overlapping by IoU 1/3 is a false positive
    half = np.array([5.0, 0.0, 14.0, 9.0])  # IoU 1/3 with hit_a
    assert voc_class_ap([(0, 0.9, half), (0, 0.8, hit_b)], truths) == pytest.approx(0.5 * 0.5)
    # IoU exactly 0.5 (50 of 100 pixels) is not a match: the devkit asks for IoU > 0.5
    top_half = np.array([0.0, 0.0, 9.0, 4.0])
    assert voc_iou(hit_a, top_half[None])[0] == pytest.approx(0.5)
    assert voc_class_ap([(0, 0.9, top_half)], truths) == 0.0
    # only one of the two positives found
    assert voc_class_ap([(0, 0.9, hit_b)], truths) == pytest.approx(0.5)
    # no detections at all, and a class with only difficult truths is undefined
    assert voc_class_ap([], truths) == 0.0
    assert voc_class_ap([(1, 0.9, hit_a)], {1: truths[1]}) is None


class _FixedDetector(torch.nn.Module):
    def __init__(self, outputs: list[dict]) -> None:
        super().__init__()
        self.outputs, self.seen, self.dummy = outputs, 0, torch.nn.Parameter(torch.zeros(1))

    def forward(self, images):
        assert all(image.dim() == 3 and image.max() <= 1.0 for image in images)
        out = self.outputs[self.seen:self.seen + len(images)]
        self.seen += len(images)
        return [{k: torch.as_tensor(v) for k, v in o.items()} for o in out]


def test_voc_spec_and_map(tmp_path, write_voc):
    write_voc(tmp_path, {"a": [("dog", [1, 1, 10, 10], 0), ("cat", [15, 5, 30, 25], 0)],
                          "b": [("dog", [5, 5, 20, 20], 0), ("person", [0, 0, 8, 8], 1)]})
    data = load_spec(f"voc:{tmp_path}")
    assert data.task == "detection" and len(data) == 2 and data.classes == VOC_CLASSES
    dog, cat = VOC_CLASSES.index("dog") + 1, VOC_CLASSES.index("cat") + 1
    perfect = [{"boxes": np.array([[1, 1, 10, 10], [15, 5, 30, 25]], np.float32), "scores": np.array([0.9, 0.8]),
                "labels": np.array([dog, cat])},
               {"boxes": np.array([[5, 5, 20, 20]], np.float32), "scores": np.array([0.7]), "labels": np.array([dog])}]
    result = evaluate_detection(_FixedDetector(perfect), data, batch_size=1, progress=False)
    assert result["map50"] == 1.0 and result["ap"]["dog"] == 1.0 and result["ap"]["person"] is None
    # miss the second dog and add a wrong-class box: dog AP 0.5, cat AP 1, the wrong box is a cat FP below
    partial = [dict(perfect[0]), {"boxes": np.array([[0, 0, 8, 8]], np.float32), "scores": np.array([0.95]),
                                  "labels": np.array([cat])}]
    result = voc_map(partial, data)
    assert result["ap"]["dog"] == pytest.approx(0.5)
    # cat: the false positive (0.95) ranks above the true positive (0.8): precision 1/2 at recall 1 -> AP 0.5
    assert result["ap"]["cat"] == pytest.approx(0.5)
    assert result["map50"] == pytest.approx(0.5)  # mean over dog and cat; person has only a difficult box


def test_voc_spec_errors(tmp_path, write_voc):
    with pytest.raises(DataError, match="test.txt"):
        load_spec(f"voc:{tmp_path}")
    write_voc(tmp_path, {"a": [("unicorn", [1, 1, 5, 5], 0)]})
    with pytest.raises(DataError, match="unknown class"):
        load_spec(f"voc:{tmp_path}")


# ---------------------------------------------------------------- imagefolder


def test_imagefolder_spec(tmp_path):
    rng = np.random.default_rng(0)
    for cls in ("n01", "n02"):
        (tmp_path / cls).mkdir()
        for i in range(2):
            Image.fromarray(rng.integers(0, 255, (300, 260, 3), dtype=np.uint8)).save(tmp_path / cls / f"{i}.png")
    data = load_spec(f"imagefolder:{tmp_path}")
    assert data.task == "classification" and len(data) == 4
    images, labels = next(data.batches(4))
    assert tuple(images.shape) == (4, 3, 224, 224) and labels.tolist() == [0, 0, 1, 1]

    class Always1(torch.nn.Module):
        def forward(self, x):
            return torch.tensor([[0.0, 1.0, 0.5]]).expand(len(x), 3)

    result = evaluate_classification(Always1(), data, batch_size=3, progress=False)
    assert result["top1"] == 0.5 and result["top5"] == 1.0
    with pytest.raises(DataError):
        load_spec(f"imagefolder:{tmp_path / 'nope'}")
