"""Progress lines: the command line prints them to stdout, once each however often main() runs in
one process; a stage function called as a library prints nothing until logging is configured."""

from __future__ import annotations

import logging

import pandas as pd
import pytest
from PIL import Image

from gendertune.base import console
from gendertune.cli import main
from gendertune.cluster.storage import OutputExistsError
from gendertune.data_prep.config import PrepConfig
from gendertune.data_prep.pipeline import run_prep

FIRST_LINE = "3 labelled images to process from "


@pytest.fixture
def fresh_loggers():
    """The project's loggers as a new process has them (another test's main() configured them in
    this one), put back afterwards."""
    saved = {name: (logging.getLogger(name).level, list(logging.getLogger(name).handlers)) for name in console.PACKAGES}
    for name, (_, handlers) in saved.items():
        logging.getLogger(name).setLevel(logging.NOTSET)
        for handler in handlers:
            logging.getLogger(name).removeHandler(handler)
    yield
    for name, (level, handlers) in saved.items():
        logger = logging.getLogger(name)
        for handler in list(logger.handlers):
            logger.removeHandler(handler)
        logger.setLevel(level)
        for handler in handlers:
            logger.addHandler(handler)


@pytest.fixture
def finished_prep(tmp_path):
    """Three labelled images and an --out that already exists: prep logs its first line, then
    refuses to overwrite the output, within seconds."""
    images = tmp_path / "images"
    images.mkdir()
    for index in range(3):
        Image.new("RGB", (64, 64), (index * 40, 90, 90)).save(images / f"{index}.jpg")
    labels = tmp_path / "labels.csv"
    pd.DataFrame({"images": ["0.jpg", "1.jpg", "2.jpg"], "Male": [1, 0, 1]}).to_csv(labels, index=False)
    out = tmp_path / "prep"
    out.mkdir()
    return {"data": str(images), "labels": str(labels), "out": str(out)}


def test_main_prints_a_stage_line_once_each_time_it_runs(ray_session, finished_prep, fresh_loggers, capsys):
    args = ["prep", "--data", finished_prep["data"], "--labels", finished_prep["labels"], "--out", finished_prep["out"]]
    for _ in range(2):  # a second main() in the process must not add a second handler
        assert main(args) == 2
        printed = capsys.readouterr()
        assert printed.out.count(FIRST_LINE) == 1, printed.out
        assert FIRST_LINE not in printed.err and "--overwrite" in printed.err


def test_a_stage_function_prints_nothing_unless_logging_is_configured(
    ray_session, finished_prep, fresh_loggers, capsys, caplog
):
    with pytest.raises(OutputExistsError):
        run_prep(PrepConfig.from_dict(finished_prep))
    printed = capsys.readouterr()
    assert printed.out == "" and FIRST_LINE not in printed.err
    # The line is logged all the same: a caller who configures logging gets it.
    caplog.set_level(logging.INFO, logger="gendertune")
    with pytest.raises(OutputExistsError):
        run_prep(PrepConfig.from_dict(finished_prep))
    assert any(line.startswith(FIRST_LINE) for line in caplog.messages), caplog.messages
    assert capsys.readouterr().out == ""
