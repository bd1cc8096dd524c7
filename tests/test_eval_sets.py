"""Tests for gendertune.tuning.evaluate.eval_sets: a labelled folder read with its group columns, and bad eval-set
folders checked before any work."""

from __future__ import annotations

import pandas as pd
import pytest

from gendertune.base.config import ConfigError
from gendertune.data_prep.errors import PrepInputError
from gendertune.tuning.evaluate.eval_sets import load_eval_set


def _write_set(folder, rows, *, name="labels.csv"):
    (folder / "images").mkdir(parents=True, exist_ok=True)
    for image in rows["image_id"]:
        (folder / "images" / image).write_bytes(b"not checked here")
    rows.to_csv(folder / name, index=False)


def test_eval_set_is_read_with_its_group_columns(tmp_path):
    _write_set(tmp_path, pd.DataFrame({"image_id": ["a.jpg", "b.jpg"], "Male": [1, 0], "race": ["x", "y"]}))
    eval_set = load_eval_set(f"mine={tmp_path}", attribute="Male")
    assert eval_set.name == "mine" and eval_set.slice_columns == ["race"]
    assert eval_set.table["path"].tolist() == [str(tmp_path / "images" / "a.jpg"), str(tmp_path / "images" / "b.jpg")]
    assert eval_set.table["label"].tolist() == [1, 0]


@pytest.mark.parametrize(
    "case, error, match",
    [
        ("no_equals", ConfigError, "expected NAME=DIR"),
        ("bad_name", ConfigError, "expected NAME=DIR"),
        ("no_folder", ConfigError, "does not exist"),
        ("two_csvs", ConfigError, "2 CSV files"),
        ("no_attribute", PrepInputError, "no attribute column 'Male'"),
        ("missing_image", ConfigError, "1 image\\(s\\) named in .* are missing"),
    ],
)
def test_bad_eval_sets_fail_before_any_work(tmp_path, case, error, match):
    rows = pd.DataFrame({"image_id": ["a.jpg"], "Male": [1]})
    spec = f"set={tmp_path}"
    if case == "no_equals":
        spec = str(tmp_path)
    elif case == "bad_name":
        spec = f"1st={tmp_path}"
    elif case == "no_folder":
        spec = f"set={tmp_path / 'absent'}"
    elif case == "two_csvs":
        _write_set(tmp_path, rows, name="a.csv")
        rows.to_csv(tmp_path / "b.csv", index=False)
    elif case == "no_attribute":
        _write_set(tmp_path, rows.rename(columns={"Male": "gender"}))
    elif case == "missing_image":
        _write_set(tmp_path, rows)
        pd.DataFrame({"image_id": ["a.jpg", "gone.jpg"], "Male": [1, 0]}).to_csv(tmp_path / "labels.csv", index=False)
    with pytest.raises(error, match=match):
        load_eval_set(spec, attribute="Male")
