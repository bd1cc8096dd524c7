"""Label, partition and identity file parsing, including every bad-input case."""

from __future__ import annotations

import pandas as pd
import pytest

from gendertune.data_prep.errors import PrepInputError
from gendertune.data_prep.labels import read_identity_file, read_labels, read_partition_file

NAMES = ["5_o_Clock_Shadow", "Arched_Eyebrows", "Male", "Young"]


def write_attr(path, rows, names=NAMES, count=None):
    lines = [str(len(rows) if count is None else count), " ".join(names) + " "]
    for image_id, values in rows:
        # The official file right-aligns values, so 1 gets two spaces before it and -1 one.
        lines.append(image_id + "".join(f"{v:>3d}" for v in values))
    path.write_text("\n".join(lines) + "\n")
    return path


def test_official_format_with_double_spaces(tmp_path):
    path = write_attr(
        tmp_path / "list_attr_celeba.txt",
        [("000001.jpg", [-1, 1, 1, -1]), ("000002.jpg", [1, 1, -1, 1]), ("000003.jpg", [-1, -1, 1, 1])],
    )
    assert "  1" in path.read_text()
    labels = read_labels(path, "Male")
    assert labels["image_id"].tolist() == ["000001.jpg", "000002.jpg", "000003.jpg"]
    assert labels["label"].tolist() == [1, 0, 1]
    assert read_labels(path, "Young")["label"].tolist() == [0, 1, 1]


def test_csv_formats_zero_one_and_minus_one(tmp_path):
    notebook_csv = tmp_path / "gender_classification.csv"
    notebook_csv.write_text("images,Male\n000001.jpg,1\n000002.jpg,0\n")
    assert read_labels(notebook_csv, "Male")["label"].tolist() == [1, 0]
    signed = tmp_path / "signed.csv"
    signed.write_text("filename,Smiling,Male\na/1.png,1,-1\na/2.png,-1,1\n")
    table = read_labels(signed, "Male")
    assert table["image_id"].tolist() == ["a/1.png", "a/2.png"]
    assert table["label"].tolist() == [0, 1]


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("images,Gender\n1.jpg,1\n", "no attribute column 'Male'"),
        ("name,Male\n1.jpg,1\n", "no image-name column"),
        ("images,Male\n1.jpg,2\n", "values other than 0/1 or -1/1"),
        ("images,Male\n1.jpg,yes\n", "values other than 0/1 or -1/1"),
        ("images,Male\n1.jpg,0\n2.jpg,-1\n", "mixes 0 and -1"),
        ("images,Male\n1.jpg,1\n1.jpg,0\n", "appear more than once"),
        ("images,Male\n../secret.jpg,1\n", "escapes the data folder"),
        ("images,Male\n/etc/passwd,1\n", "escapes the data folder"),
    ],
)
def test_csv_bad_input_names_file_and_problem(tmp_path, content, message):
    path = tmp_path / "labels.csv"
    path.write_text(content)
    with pytest.raises(PrepInputError, match=message) as info:
        read_labels(path, "Male")
    assert str(path) in str(info.value)


def test_official_format_errors(tmp_path):
    path = write_attr(tmp_path / "a.txt", [("000001.jpg", [1, 1, 1, 1])], names=["Young", "Smiling", "X", "Y"])
    with pytest.raises(PrepInputError, match="no attribute 'Male'; available: Young"):
        read_labels(path, "Male")
    truncated = write_attr(tmp_path / "b.txt", [("000001.jpg", [1, 1, 1, 1])], count=5)
    with pytest.raises(PrepInputError, match="says 5 images but 1 rows"):
        read_labels(truncated, "Male")
    with pytest.raises(PrepInputError, match="does not exist"):
        read_labels(tmp_path / "missing.txt", "Male")


def test_partition_and_identity_files(tmp_path):
    part = tmp_path / "list_eval_partition.txt"
    part.write_text("000001.jpg 0\n000002.jpg 2\n")
    assert read_partition_file(part).to_dict() == {"000001.jpg": 0, "000002.jpg": 2}
    ident = tmp_path / "identity_CelebA.txt"
    ident.write_text("000001.jpg 2880\n000002.jpg 17\n")
    assert read_identity_file(ident).to_dict() == {"000001.jpg": 2880, "000002.jpg": 17}
    part.write_text("000001.jpg 5\n")
    with pytest.raises(PrepInputError, match="0 \\(train\\), 1 \\(val\\) or 2"):
        read_partition_file(part)
    ident.write_text("000001.jpg x\n")
    with pytest.raises(PrepInputError, match="image_id <integer identity>"):
        read_identity_file(ident)


def test_real_file_scale_parses_quickly(tmp_path):
    """202,599 rows like the original notebook's CSV parse in well under a few seconds (pandas C engine)."""
    ids = [f"{i:06d}.jpg" for i in range(1, 202_600)]
    path = tmp_path / "big.csv"
    pd.DataFrame({"images": ids, "Male": [i % 2 for i in range(len(ids))]}).to_csv(path, index=False)
    labels = read_labels(path, "Male")
    assert len(labels) == 202_599 and labels["label"].sum() == 101_299


def test_a_byte_order_mark_is_read_as_nothing(tmp_path):
    from gendertune.data_prep.labels import read_labels

    official = tmp_path / "list_attr_celeba.txt"
    official.write_text("\ufeff2\nSmiling Male\n000001.jpg -1 1\n000002.jpg 1 -1\n", encoding="utf-8")
    table = read_labels(official, "Male")
    assert list(table["image_id"]) == ["000001.jpg", "000002.jpg"] and list(table["label"]) == [1, 0]
    csv = tmp_path / "labels.csv"
    csv.write_text("\ufeffimage,Male\na.jpg,1\n", encoding="utf-8")
    assert list(read_labels(csv, "Male")["label"]) == [1]


def test_a_bom_in_a_toml_config_is_read(tmp_path):
    from gendertune.base.config import load_config_file

    path = tmp_path / "gt.toml"
    path.write_text("\ufeff[prep]\nimage_size = 64\n", encoding="utf-8")
    assert load_config_file(path) == {"prep": {"image_size": 64}}
