"""Hostile Label Studio regions in training data are skipped and counted, never decoded blindly."""
from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
from label_studio_sdk.converter.brush import mask2rle

from ml_backend.annotations import _annotation_samples


def brush(mask: np.ndarray, rle=None, **size) -> dict:
    h, w = mask.shape
    return {"id": "a", "type": "brushlabels", "original_width": size.get("w", w), "original_height": size.get("h", h),
            "value": {"format": "rle", "rle": rle if rle is not None else mask2rle(mask.astype(np.uint8) * 255),
                      "brushlabels": ["cat"]}}


def polygon(points, w=100, h=100) -> dict:
    return {"id": "p", "type": "polygonlabels", "original_width": w, "original_height": h,
            "value": {"points": points, "polygonlabels": ["cat"]}}


def test_valid_brush_and_polygon_become_samples():
    mask = np.zeros((40, 50), bool)
    mask[10:20, 5:25] = True
    skipped = Counter()
    samples = _annotation_samples("img", [brush(mask), polygon([[10, 10], [50, 10], [50, 50]])], skipped)
    assert len(samples) == 2 and sum(skipped.values()) == 0
    assert np.array_equal(samples[0].mask, mask)


@pytest.mark.parametrize("region", [
    brush(np.ones((4, 4), bool), rle=[255, 255, 255, 255, 0, 0]),  # header claims 4 G values: a memory bomb
    brush(np.ones((4, 4), bool), h=100_000, w=100_000),  # 10 G pixels
    brush(np.ones((4, 4), bool), rle="not a list"),
    polygon([[0, 0]] * 200_000),
    polygon([[0, 0], [float("inf"), 1], [2, 2]]),
    polygon([[0, 0], [1, 1], [2, 2]], w=-5),
])
def test_hostile_regions_are_skipped_and_counted(region):
    skipped = Counter()
    assert _annotation_samples("img", [region], skipped) == []
    assert skipped["unreadable_regions"] == 1
