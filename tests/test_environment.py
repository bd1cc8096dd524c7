"""Provenance (gendertune.cluster.environment): environment.json names the software and hardware
that produced an output, and `gendertune --version` the installed version. That each stage writes
it beside its config.json, with the Ray cluster's resources, is checked on real outputs by
tests/test_api.py."""

from __future__ import annotations

import importlib.metadata
import json
import subprocess
import sys
from pathlib import Path

import pytest

from gendertune.cli import main
from gendertune.cluster.environment import ENVIRONMENT, PACKAGES, write_environment

ROOT = Path(__file__).resolve().parents[1]


def test_environment_json_records_versions_commit_python_and_cpu(tmp_path):
    write_environment(tmp_path)
    written = json.loads((tmp_path / ENVIRONMENT).read_text())
    assert written["packages"] == {name: importlib.metadata.version(name) for name in PACKAGES}
    assert written["python"] == ".".join(map(str, sys.version_info[:3]))
    assert written["cpu"]["model"]
    if Path("/proc/cpuinfo").is_file():  # Linux: the instruction sets that pick the kernels
        assert {"sse2"} <= set(written["cpu"]["flags"]) or {"fp", "asimd"} <= set(written["cpu"]["flags"])
    assert isinstance(written["gpus"], list)
    ray = sys.modules.get("ray")  # up when an earlier test of the session started it
    if ray is not None and ray.is_initialized():
        assert written["ray_cluster_resources"]["CPU"] >= 1
    else:
        assert written["ray_cluster_resources"] is None
    if (ROOT / ".git").exists():
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
        assert written["git_commit"].removesuffix("+dirty") == head


def test_version_flag_prints_the_installed_version(capsys):
    with pytest.raises(SystemExit) as exited:
        main(["--version"])
    assert exited.value.code == 0
    assert capsys.readouterr().out.strip() == f"gendertune {importlib.metadata.version('gendertune')}"
