"""Exact-duplicate detection by content hash (pure): keep the smallest image_id per hash.

Files are never deleted — the original notebook deleted duplicates from disk; we record them instead.
"""

from __future__ import annotations

import pandas as pd


def find_duplicates(images: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Split `images` (image_id, hash, label, ...) into kept rows and a duplicates table.

    The duplicates table has kept_id, dropped_id, hash and label_conflict (True when the same
    bytes carry different labels — a labelling error worth a look, since one of them is wrong).
    """
    ordered = images.sort_values(["hash", "image_id"]).reset_index(drop=True)
    first = ordered.groupby("hash", sort=False).head(1)
    kept = first.sort_values("image_id").reset_index(drop=True)
    dropped = ordered.drop(index=first.index)
    kept_by_hash = first.set_index("hash")
    duplicates = pd.DataFrame(
        {
            "kept_id": dropped["hash"].map(kept_by_hash["image_id"]).to_numpy(),
            "dropped_id": dropped["image_id"].to_numpy(),
            "hash": dropped["hash"].to_numpy(),
            "label_conflict": (dropped["label"].to_numpy() != dropped["hash"].map(kept_by_hash["label"]).to_numpy()),
        }
    ).sort_values(["kept_id", "dropped_id"], ignore_index=True)
    return kept, duplicates
