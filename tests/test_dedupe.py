"""Tests for gendertune.data_prep.dedupe: exact dedupe keeps the smallest id and flags label conflicts, and
the copies of an image that fails to decode are rejected with it."""

from __future__ import annotations

import pandas as pd

from gendertune.data_prep.dedupe import find_duplicates


def test_dedupe_keeps_smallest_id_and_flags_label_conflicts():
    images = pd.DataFrame(
        {
            "image_id": ["000009.jpg", "000002.jpg", "000005.jpg", "000003.jpg"],
            "hash": ["h1", "h1", "h2", "h1"],
            "label": [1, 1, 0, 0],
        }
    )
    kept, duplicates = find_duplicates(images)
    assert kept["image_id"].tolist() == ["000002.jpg", "000005.jpg"]
    assert duplicates[["kept_id", "dropped_id"]].values.tolist() == [
        ["000002.jpg", "000003.jpg"],
        ["000002.jpg", "000009.jpg"],
    ]
    assert duplicates["label_conflict"].tolist() == [True, False]


def test_duplicates_of_an_image_that_fails_to_decode_are_rejected_with_it():
    """Dedupe runs before decoding, so the copy of a corrupt file must be rejected, not listed."""
    from gendertune.data_prep.pipeline import settle_failures

    images = pd.DataFrame(
        {"image_id": ["a.jpg", "b.jpg", "c.jpg", "d.jpg"], "hash": ["h1", "h1", "h2", "h2"], "label": [0, 0, 1, 1]}
    )
    kept, duplicates = find_duplicates(images)
    failed = pd.DataFrame({"image_id": ["c.jpg"], "reason": ["corrupt or truncated image: x"]})
    kept, duplicates, failed = settle_failures(kept, duplicates, failed)
    assert kept["image_id"].tolist() == ["a.jpg"]
    assert duplicates[["kept_id", "dropped_id"]].values.tolist() == [["a.jpg", "b.jpg"]]
    assert sorted(failed["image_id"]) == ["c.jpg", "d.jpg"]
    assert failed["reason"].eq("corrupt or truncated image: x").all()
