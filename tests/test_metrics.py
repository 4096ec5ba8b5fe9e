"""Tests for lightning_modules.metrics against hand-computed and independently derived values."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from lightning_modules.metrics import (
    ConfusionMatrix,
    _count,
    confusion_matrix_update,
    format_scores_table,
    scores_to_json,
    segmentation_scores,
)

IGNORE = 255


def test_scores_hand_computed_3x3() -> None:
    # rows = ground truth, columns = prediction
    conf = np.array([[5, 1, 0], [2, 3, 1], [0, 1, 4]])
    # row sums (GT) 6, 6, 5; column sums (predicted) 7, 5, 5; diagonal 5, 3, 4; total 17
    s = segmentation_scores(conf, mpa="precision")
    assert s["PA"] == pytest.approx(100 * 12 / 17)
    expected_cpa = [100 * 5 / 7, 100 * 3 / 5, 100 * 4 / 5]
    expected_recall = [100 * 5 / 6, 100 * 3 / 6, 100 * 4 / 5]
    expected_iou = [100 * 5 / 8, 100 * 3 / 8, 100 * 4 / 6]  # union = row + col - diag
    torch.testing.assert_close(s["CPA"], torch.tensor(expected_cpa, dtype=torch.float64))
    torch.testing.assert_close(s["recall"], torch.tensor(expected_recall, dtype=torch.float64))
    torch.testing.assert_close(s["IoU"], torch.tensor(expected_iou, dtype=torch.float64))
    torch.testing.assert_close(s["precision"], s["CPA"])
    assert s["MPA"] == pytest.approx(sum(expected_cpa) / 3)
    assert s["mPrecision"] == pytest.approx(sum(expected_cpa) / 3)
    assert s["mAcc"] == pytest.approx(sum(expected_recall) / 3)
    assert s["mRecall"] == pytest.approx(sum(expected_recall) / 3)
    assert s["mIoU"] == pytest.approx(sum(expected_iou) / 3)
    for key in ("PA", "MPA", "mIoU", "mAcc", "mPrecision", "mRecall"):
        assert type(s[key]) is float
    # the default reading: MPA and CPA follow recall; every other entry is unchanged
    r = segmentation_scores(conf)
    assert r["mpa_definition"] == "recall" and s["mpa_definition"] == "precision"
    assert r["MPA"] == pytest.approx(sum(expected_recall) / 3)
    torch.testing.assert_close(r["CPA"], torch.tensor(expected_recall, dtype=torch.float64))
    assert r["mPrecision"] == s["mPrecision"] and r["mIoU"] == s["mIoU"]
    with pytest.raises(ValueError, match="metrics.mpa"):
        segmentation_scores(conf, mpa="accuracy")
    # torch input gives the same
    assert segmentation_scores(torch.as_tensor(conf))["mIoU"] == pytest.approx(s["mIoU"])


def test_scores_hand_computed_with_undefined_classes() -> None:
    # class 1: never in GT but predicted once -> recall NaN, CPA 0, IoU 0 (counts in the means)
    # class 2: absent from GT and prediction -> all NaN, excluded from every mean
    conf = np.array([[3, 1, 0], [0, 0, 0], [0, 0, 0]])
    s = segmentation_scores(conf, mpa="precision")
    assert s["PA"] == pytest.approx(75.0)
    assert s["CPA"][0] == pytest.approx(100.0) and s["CPA"][1] == 0.0
    assert math.isnan(s["CPA"][2])
    assert s["recall"][0] == pytest.approx(75.0)
    assert math.isnan(s["recall"][1]) and math.isnan(s["recall"][2])
    assert s["IoU"][0] == pytest.approx(75.0) and s["IoU"][1] == 0.0
    assert math.isnan(s["IoU"][2])
    assert s["MPA"] == pytest.approx(50.0)
    assert s["mAcc"] == pytest.approx(75.0)
    assert s["mIoU"] == pytest.approx(37.5)
    # recall reading: only class 0 is in the ground truth
    assert segmentation_scores(conf)["MPA"] == pytest.approx(75.0)


def _loop_scores(pred: np.ndarray, target: np.ndarray, num_classes: int) -> dict:
    """Per-pixel Python reference that never builds a confusion matrix."""
    tp = [0] * num_classes
    n_gt = [0] * num_classes
    n_pred = [0] * num_classes
    correct = total = 0
    for p, t in zip(pred.ravel().tolist(), target.ravel().tolist(), strict=True):
        if t == IGNORE:
            continue
        total += 1
        n_gt[t] += 1
        n_pred[p] += 1
        if p == t:
            tp[t] += 1
            correct += 1

    def div(a: float, b: float) -> float:
        return 100.0 * a / b if b else math.nan

    cpa = [div(tp[c], n_pred[c]) for c in range(num_classes)]
    recall = [div(tp[c], n_gt[c]) for c in range(num_classes)]
    iou = [div(tp[c], n_gt[c] + n_pred[c] - tp[c]) for c in range(num_classes)]

    def mean(xs: list[float]) -> float:
        xs = [x for x in xs if not math.isnan(x)]
        return sum(xs) / len(xs)

    return {
        "PA": div(correct, total),
        "CPA": cpa,
        "MPA": mean(cpa),
        "recall": recall,
        "mAcc": mean(recall),
        "IoU": iou,
        "mIoU": mean(iou),
    }


def test_scores_match_per_pixel_loop_on_random_data() -> None:
    rng = np.random.default_rng(0)
    num_classes = 5
    shape = (3, 17, 23)
    # class 3 appears nowhere (NaN everywhere); class 4 is predicted but never ground truth
    target = rng.choice([0, 1, 2], size=shape)
    target[rng.random(shape) < 0.2] = IGNORE
    pred = rng.choice([0, 1, 2, 4], size=shape, p=[0.4, 0.3, 0.2, 0.1])
    copy = rng.random(shape) < 0.5  # better than chance, like a real network
    pred[copy] = target[copy]
    pred[pred == IGNORE] = 0

    conf = confusion_matrix_update(torch.from_numpy(pred), torch.from_numpy(target), num_classes)
    scores = segmentation_scores(conf, mpa="precision")
    expected = _loop_scores(pred, target, num_classes)
    for key in ("PA", "MPA", "mAcc", "mIoU"):
        assert scores[key] == pytest.approx(expected[key], rel=1e-12), key
    for key in ("CPA", "recall", "IoU"):
        torch.testing.assert_close(
            scores[key], torch.tensor(expected[key], dtype=torch.float64), equal_nan=True
        )
    assert math.isnan(scores["IoU"][3]) and scores["IoU"][4] == 0.0
    assert math.isnan(scores["recall"][4])


def test_confusion_matrix_update_ignores_and_drops_out_of_range() -> None:
    target = torch.tensor([0, 1, 2, IGNORE, 1, 7, -1])
    pred = torch.tensor([0, 2, 2, 1, 9, 1, 0])
    conf = confusion_matrix_update(pred, target, num_classes=3)
    expected = torch.zeros(3, 3, dtype=torch.int64)
    expected[0, 0] = expected[1, 2] = expected[2, 2] = 1  # the rest is ignored / out of range
    assert conf.dtype == torch.int64
    torch.testing.assert_close(conf, expected)
    with pytest.raises(ValueError, match="differ"):
        confusion_matrix_update(pred[:3], target, num_classes=3)


def test_scatter_histogram_matches_bincount() -> None:
    # The accelerator path (scatter-add) cannot run on a CPU-only machine through the device
    # check, so compare its arithmetic directly.
    index = torch.randint(0, 10, (1000,))
    counts = torch.zeros(10, dtype=torch.int64).scatter_add_(0, index, torch.ones_like(index))
    torch.testing.assert_close(counts, torch.bincount(index, minlength=10))
    torch.testing.assert_close(_count(index, 10), counts)


def test_confusion_matrix_metric_accumulates() -> None:
    gen = torch.Generator().manual_seed(0)
    num_classes = 4
    metric = ConfusionMatrix(num_classes)
    reference = np.zeros((num_classes, num_classes), dtype=np.int64)
    for step in range(3):
        target = torch.randint(0, num_classes, (2, 9, 11), generator=gen)
        target[torch.rand(target.shape, generator=gen) < 0.1] = IGNORE
        logits = torch.randn(2, num_classes, 9, 11, generator=gen)
        pred = logits.argmax(1)
        # alternate logits and class indices
        metric.update(logits if step % 2 else pred, target)
        t, p = target.numpy().ravel(), pred.numpy().ravel()
        keep = t != IGNORE
        np.add.at(reference, (t[keep], p[keep]), 1)
    conf = metric.compute()
    assert conf.dtype == torch.int64 and conf.shape == (num_classes, num_classes)
    np.testing.assert_array_equal(conf.numpy(), reference)
    metric.reset()
    assert int(metric.confmat.sum()) == 0


def test_json_and_table() -> None:
    names = ["background", "hat", "hair"]
    conf = np.array([[3, 1, 0], [0, 0, 0], [0, 0, 0]])
    scores = {**segmentation_scores(conf, mpa="precision"), "confusion": torch.as_tensor(conf)}
    result = scores_to_json(scores, names)
    assert set(result) == {
        "PA",
        "MPA",
        "mIoU",
        "mAcc",
        "mPrecision",
        "mRecall",
        "mpa_definition",
        "IoU",
        "precision",
        "recall",
        "CPA",
        "confusion",
    }
    assert result["IoU"] == {"background": 75.0, "hat": 0.0, "hair": None}
    assert result["CPA"]["hair"] is None and result["PA"] == pytest.approx(75.0)
    assert result["precision"] == {"background": 100.0, "hat": 0.0, "hair": None}
    assert result["recall"] == {"background": 75.0, "hat": None, "hair": None}
    assert result["confusion"] == conf.tolist() and result["mpa_definition"] == "precision"
    json.dumps(result, allow_nan=False)  # strict JSON: NaN became null

    table = format_scores_table(scores, names)
    assert all(name in table for name in names)
    assert "mIoU 37.50" in table and "MPA(precision) 50.00" in table
    # every table says what its MPA is
    assert table.splitlines()[0].startswith("MPA (mean precision)")
    recall_table = format_scores_table(segmentation_scores(conf), names)
    assert recall_table.splitlines()[0].startswith("MPA (mean recall)")
    assert "MPA(recall) 75.00" in recall_table and "mPrecision 50.00" in recall_table
    with pytest.raises(ValueError):
        scores_to_json(scores, names[:2])
