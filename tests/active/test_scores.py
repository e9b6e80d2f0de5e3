"""Acquisition scores and Label Studio's brush RLE, on arrays whose right answer is known."""

from __future__ import annotations

import numpy as np
import pytest

from medsam2.active.scores import ACQUISITIONS, PoolSignals, kcenter_greedy
from medsam2.data.labelstudio import decode_rle, encode_rle, mask_to_rle, rle_to_mask, task
from medsam2.engine.predict import Prediction


def test_brush_rle_matches_the_rle_pack_layout():
    # a 1x1 mask that is set: 4 values of 255. Header: N=4 in 32 bits, word size-1 = 7 in 5 bits, widths-1
    # (2, 3, 7, 15) in 4 bits each; one repeat run: flag 1, width index 00, length-1 = 3 in 3 bits, word 255
    bits = f"{4:032b}" + "00111" + "0010" + "0011" + "0111" + "1111" + "1" + "00" + "011" + "11111111"
    bits += "0" * (-len(bits) % 8)
    expected = [int(bits[i:i + 8], 2) for i in range(0, len(bits), 8)]
    assert mask_to_rle(np.ones((1, 1), bool)) == expected


def test_brush_rle_decodes_literal_runs():
    # a literal run (flag 0) of 3 words, as Label Studio's own encoder may write
    bits = f"{3:032b}" + "00111" + "0010" + "0011" + "0111" + "1111" + "0" + "00" + "010"
    bits += "00000001" + "00000010" + "00000011"
    bits += "0" * (-len(bits) % 8)
    assert decode_rle(bytes(int(bits[i:i + 8], 2) for i in range(0, len(bits), 8))).tolist() == [1, 2, 3]


@pytest.mark.parametrize("shape", [(1, 1), (7, 13), (300, 400)])
def test_brush_rle_round_trip(shape):
    rng = np.random.default_rng(0)
    mask = np.zeros(shape, bool)
    mask[shape[0] // 4: 3 * shape[0] // 4 + 1, shape[1] // 3:] = True
    mask ^= rng.random(shape) < 0.01  # scattered single pixels: runs of 4 values
    assert np.array_equal(rle_to_mask(mask_to_rle(mask), *shape), mask)
    assert decode_rle(encode_rle(np.zeros(70_000 * 4, np.uint8))).size == 280_000  # runs past 2^16 are split
    with pytest.raises(ValueError, match="values"):
        rle_to_mask(mask_to_rle(mask), shape[0] + 1, shape[1])


def test_label_studio_task_carries_the_mask_as_a_prediction():
    mask = np.zeros((5, 8), bool)
    mask[1:3, 2:6] = True
    t = task("/data/local-files/?d=q/images/001_a.png", mask, image_id="a", label="polyp", model_version="m",
             score=0.7)
    assert t["data"] == {"image": "/data/local-files/?d=q/images/001_a.png", "medsam2_id": "a"}
    (pred,) = t["predictions"]
    (res,) = pred["result"]
    assert pred["score"] == 0.7 and res["type"] == "brushlabels" and res["value"]["brushlabels"] == ["polyp"]
    assert (res["original_height"], res["original_width"]) == (5, 8)
    assert np.array_equal(rle_to_mask(res["value"]["rle"], 5, 8), mask)


def _pred(prob: np.ndarray, iou: float, agreement: float) -> Prediction:
    return Prediction(mask=prob > 0.5, prob=prob.astype(np.float32), iou_pred=iou, flip_agreement=agreement)


def _signals() -> PoolSignals:
    sure = np.zeros((8, 8))
    sure[2:6, 2:6] = 1.0
    unsure = np.full((8, 8), 0.5)
    unsure[2:6, 2:6] = 0.6
    left = np.zeros((8, 8))
    left[:, :4] = 1.0
    preds = [_pred(sure, 0.9, 1.0), _pred(unsure, 0.8, 0.9), _pred(left, 0.2, 0.0)]  # the third disagrees
    emb = np.array([[0.0, 0.0], [0.1, 0.0], [5.0, 5.0]], np.float32)  # completely with its mirror view
    return PoolSignals(preds=preds, embeddings=emb,
                       labelled_embeddings=np.zeros((1, 2), np.float32))


def test_each_score_ranks_the_image_it_should_first():
    sig = _signals()
    assert ACQUISITIONS.get("pred_iou")(sig, 1)[0][0] == 2  # lowest predicted IoU
    assert ACQUISITIONS.get("entropy")(sig, 1)[0][0] == 1  # probabilities near 0.5
    assert ACQUISITIONS.get("tta_flip")(sig, 1) == [(2, 1.0)]
    assert ACQUISITIONS.get("kcenter")(sig, 1)[0][0] == 2  # farthest from the labelled centre
    ranked = ACQUISITIONS.get("entropy")(sig, 3)
    assert [s for _, s in ranked] == sorted((s for _, s in ranked), reverse=True)
    assert sorted(i for i, _ in ranked) == [0, 1, 2]
    assert set(ACQUISITIONS.names()) == {"entropy", "kcenter", "pred_iou", "random", "tta_flip"}


def test_random_is_seeded_and_budget_is_checked():
    sig = _signals()
    rand = ACQUISITIONS.get("random")
    assert rand(sig, 3, seed=1) == rand(sig, 3, seed=1)
    assert {tuple(i for i, _ in rand(sig, 3, seed=s)) for s in range(10)} != {(0, 1, 2)}
    for budget in (0, 4):
        with pytest.raises(ValueError, match="budget"):
            rand(sig, budget)
    with pytest.raises(ValueError, match="flip"):
        ACQUISITIONS.get("tta_flip")(PoolSignals(preds=[_pred(p.prob, p.iou_pred, None) for p in sig.preds]), 1)


def test_kcenter_covers_clusters_before_revisiting_one():
    rng = np.random.default_rng(0)
    centres_true = np.array([[0, 0], [10, 0], [0, 10], [10, 10]], float)
    pool = np.concatenate([c + rng.normal(0, 0.3, (25, 2)) for c in centres_true])
    chosen = [i for i, _ in kcenter_greedy(pool, np.zeros((0, 2)), 4)]
    assert sorted({i // 25 for i in chosen}) == [0, 1, 2, 3]  # one per cluster
    # a labelled point in cluster 0 makes its first pick come from another cluster; distances never increase
    picks = kcenter_greedy(pool, centres_true[:1], 3)
    assert all(i // 25 != 0 for i, _ in picks)
    assert [d for _, d in picks] == sorted((d for _, d in picks), reverse=True)
