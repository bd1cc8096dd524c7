"""The command line's contract for errors: the project's own are one line (exit 2), with the
traceback under --debug; anything else is a bug and keeps its traceback."""

from __future__ import annotations

import pytest

from cluster.cli import main
from cluster.errors import GendertuneError, MissingInputError
from tuning import leaderboard


def test_a_project_error_is_one_line_and_debug_shows_it_whole(tmp_path, capsys):
    assert main(["leaderboard", str(tmp_path / "nothing")]) == 2
    error = capsys.readouterr().err
    assert error.startswith("gendertune leaderboard: error: ") and len(error.strip().splitlines()) == 1
    with pytest.raises(MissingInputError, match="has no leaderboard.csv"):
        main(["--debug", "leaderboard", str(tmp_path / "nothing")])


def test_a_bug_keeps_its_traceback(tmp_path, monkeypatch):
    def broken(out):
        raise ValueError("a bug, not an input problem")

    monkeypatch.setattr(leaderboard, "read_leaderboard", broken)
    with pytest.raises(ValueError, match="a bug") as raised:
        main(["leaderboard", str(tmp_path)])
    assert not isinstance(raised.value, GendertuneError)
