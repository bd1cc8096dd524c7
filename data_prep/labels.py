"""Read label, partition and identity files into tidy DataFrames (pure parsing, no Ray).

Two label formats are accepted:
- CelebA's official `list_attr_celeba.txt`: line 1 the image count, line 2 the 40 attribute names,
  then `image_id` and 40 values of -1/1 separated by one *or more* spaces (the real file pads
  single-digit values with a double space so columns line up).
- A CSV with an image-name column and the attribute column, values 0/1 or -1/1 (the original notebook's
  `gender_classification.csv` is `images,Male`).
Labels become 0/1 with the attribute's positive value (Male) = 1. The label file's other columns
are kept as slice columns (`read_slice_columns`): the groups evaluation reports accuracy for.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from gendertune.data_prep.errors import PrepInputError

IMAGE_COLUMN_CANDIDATES = ("image_id", "images", "image", "filename", "file", "path")


def _check_image_ids(ids: pd.Series, path: Path) -> None:
    """Reject duplicate ids and names that would escape the image folder."""
    dupes = ids[ids.duplicated()].unique()
    if len(dupes):
        shown = ", ".join(map(str, dupes[:5]))
        raise PrepInputError(
            f"{path}: {len(dupes)} image id(s) appear more than once (e.g. {shown}); "
            "each image must have exactly one label row"
        )
    # Vectorised string tests, the regex only on ids that contain ".." at all: the label files have
    # 200k rows and run in the driver, before any parallel work starts.
    names = ids.astype(str)
    bad = names.str.strip().eq("") | names.str.startswith(("/", "\\"))
    dotted = names.str.contains("..", regex=False)
    bad[dotted] |= names[dotted].str.replace("\\", "/", regex=False).str.contains(r"(?:^|/)\.\.(?:/|$)")
    if bad.any():
        raise PrepInputError(
            f"{path}: image name {ids[bad].iloc[0]!r} is empty, absolute or escapes the data folder "
            "('..'); use names relative to the image folder"
        )


def _to_binary(values: pd.Series, path: Path, attribute: str) -> pd.Series:
    """Map {-1, 1} or {0, 1} to {0, 1}; anything else is an error naming the offending values."""
    numeric = pd.to_numeric(values, errors="coerce")
    bad = values[numeric.isna() | ~numeric.isin([-1, 0, 1])]
    if len(bad):
        shown = ", ".join(repr(v) for v in bad.unique()[:5])
        raise PrepInputError(
            f"{path}: column {attribute!r} has values other than 0/1 or -1/1 ({shown}); "
            "fix those rows or pick another --attribute"
        )
    has_zero, has_minus = (numeric == 0).any(), (numeric == -1).any()
    if has_zero and has_minus:
        raise PrepInputError(f"{path}: column {attribute!r} mixes 0 and -1; use either 0/1 or -1/1 encoding")
    return (numeric == 1).astype("int8")


def _head(path: Path, lines: int) -> list[str]:
    """A label file's first lines as UTF-8 text, a byte-order mark skipped (editors on Windows write one)."""
    try:
        with path.open(encoding="utf-8-sig") as handle:
            return [handle.readline() for _ in range(lines)]
    except UnicodeDecodeError as err:
        raise PrepInputError(f"{path}: not UTF-8 text ({err}); save it as UTF-8") from None


def read_celeba_attributes(path: str | Path, attribute: str) -> pd.DataFrame:
    """Parse the official attribute file; return columns `image_id`, `label`."""
    path = Path(path)
    count_line, names_line = _head(path, 2)
    count_line, names = count_line.strip(), names_line.split()
    if not count_line.isdigit() or not names:
        raise PrepInputError(
            f"{path}: not in CelebA list_attr format (line 1 must be the image count, line 2 the attribute names)"
        )
    if attribute not in names:
        raise PrepInputError(f"{path}: no attribute {attribute!r}; available: {', '.join(names)}")
    twice = sorted({name for name in names if names.count(name) > 1})
    if twice:
        raise PrepInputError(f"{path}: line 2 names the attribute(s) {', '.join(twice)} more than once")
    # Rows have one more field than the header (the image id), and single or double spaces. Every
    # row is checked here, not only the attribute's column: the other columns become slices later.
    try:
        table = pd.read_csv(
            path,
            sep=r"\s+",
            skiprows=2,
            header=None,
            names=["image_id", *names],
            dtype=str,
            engine="c",
            encoding="utf-8-sig",
        )
    except (pd.errors.ParserError, UnicodeDecodeError) as err:
        raise PrepInputError(f"{path}: every row must be an image name and {len(names)} values ({err})") from None
    short = table[names].isna().any(axis=1)
    if short.any():
        raise PrepInputError(f"{path}: row {int(short.to_numpy().argmax()) + 3} has fewer than {len(names)} values")
    if len(table) != int(count_line):
        raise PrepInputError(
            f"{path}: line 1 says {count_line} images but {len(table)} rows follow; the file is truncated or malformed"
        )
    _check_image_ids(table["image_id"], path)
    return pd.DataFrame({"image_id": table["image_id"], "label": _to_binary(table[attribute], path, attribute)})


def read_label_csv(path: str | Path, attribute: str, image_column: str | None = None) -> pd.DataFrame:
    """Parse a CSV of image names and one 0/1 or -1/1 attribute column."""
    path = Path(path)
    try:
        table = pd.read_csv(path, dtype=str, skipinitialspace=True, encoding="utf-8-sig")
    except (pd.errors.ParserError, UnicodeDecodeError, pd.errors.EmptyDataError) as err:
        raise PrepInputError(f"{path}: not a readable CSV file ({err})") from err
    if table.empty:
        raise PrepInputError(f"{path}: a header and no rows; the file lists no images")
    columns = list(table.columns)
    if image_column is None:
        image_column = next((c for c in IMAGE_COLUMN_CANDIDATES if c in columns), None)
        if image_column is None:
            raise PrepInputError(
                f"{path}: no image-name column (looked for {', '.join(IMAGE_COLUMN_CANDIDATES)}); "
                f"columns are {', '.join(columns)}; pass --image-column"
            )
    elif image_column not in columns:
        raise PrepInputError(f"{path}: no column {image_column!r}; columns are {', '.join(columns)}")
    if attribute not in columns:
        raise PrepInputError(
            f"{path}: no attribute column {attribute!r}; columns are {', '.join(columns)}; pass --attribute"
        )
    ids = table[image_column].str.strip()
    _check_image_ids(ids, path)
    return pd.DataFrame({"image_id": ids, "label": _to_binary(table[attribute].str.strip(), path, attribute)})


def read_labels(path: str | Path, attribute: str, image_column: str | None = None) -> pd.DataFrame:
    """Read either label format, chosen by content: the official file starts with a count line."""
    path = Path(path)
    if not path.is_file():
        raise PrepInputError(f"label file {path} does not exist; pass --labels FILE")
    if _head(path, 1)[0].strip().isdigit():
        return read_celeba_attributes(path, attribute)
    return read_label_csv(path, attribute, image_column)


def _read_id_value_file(path: Path, value_name: str) -> pd.Series:
    try:
        table = pd.read_csv(path, sep=r"\s+", header=None, names=["image_id", value_name], dtype={"image_id": str})
    except (pd.errors.ParserError, pd.errors.EmptyDataError) as err:
        raise PrepInputError(f"{path}: expected lines of 'image_id {value_name}' ({err})") from err
    values = pd.to_numeric(table[value_name], errors="coerce")
    if values.isna().any():
        raise PrepInputError(f"{path}: every line must be 'image_id <integer {value_name}>'")
    _check_image_ids(table["image_id"], path)
    return pd.Series(values.astype("int64").to_numpy(), index=table["image_id"], name=value_name)


def read_partition_file(path: str | Path) -> pd.Series:
    """`image_id 0|1|2` (train/val/test) -> Series indexed by image_id."""
    path = Path(path)
    series = _read_id_value_file(path, "partition")
    if not series.isin([0, 1, 2]).all():
        raise PrepInputError(f"{path}: partition values must be 0 (train), 1 (val) or 2 (test)")
    return series


def read_identity_file(path: str | Path) -> pd.Series:
    """`image_id person_id` -> Series indexed by image_id."""
    return _read_id_value_file(Path(path), "identity")


def read_slice_columns(path: str | Path, attribute: str, image_column: str | None = None) -> pd.DataFrame:
    """`image_id` plus every other column of a label file, as strings: the groups a model is
    evaluated per (CelebA's other attributes as yes/no, a CSV's own columns such as age or race).
    Call after `read_labels` accepted the file."""
    path = Path(path)
    if _head(path, 1)[0].strip().isdigit():
        table = pd.read_csv(path, sep=r"\s+", skiprows=2, header=None, dtype=str, engine="c", encoding="utf-8-sig")
        names = pd.read_csv(path, sep=r"\s+", skiprows=1, nrows=0, encoding="utf-8-sig").columns.tolist()
        table.columns = ["image_id", *names]
        others = [n for n in names if n != attribute]
        return table[["image_id", *others]].replace({"1": "yes", "-1": "no"})
    table = pd.read_csv(path, dtype=str, skipinitialspace=True, encoding="utf-8-sig")
    image_column = image_column or next(c for c in IMAGE_COLUMN_CANDIDATES if c in table.columns)
    others = [c for c in table.columns if c not in (image_column, attribute)]
    return pd.DataFrame({"image_id": table[image_column].str.strip(), **{c: table[c].str.strip() for c in others}})
