"""The installed distribution: one import name, `gendertune`, whatever the user's folder holds.

The repository keeps the design's top-level folders (data_prep/, models/, tuning/, cluster/);
installed, they are gendertune's sub-packages only. A user's own `models.py` or `tuning.py` beside
a notebook must not shadow them, and the distribution must not put a generic `models` into
site-packages for other projects to collide with."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _tracked_copy(dest: Path) -> Path:
    """The repository's tracked files: setuptools builds in its source folder (build/, *.egg-info),
    and a test must not write into the checkout."""
    files = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, check=True, capture_output=True).stdout
    for name in filter(None, files.decode().split("\0")):
        if (ROOT / name).is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, dest / name)
    return dest


def test_an_installed_copy_has_one_import_name_and_ignores_stray_modules(tmp_path):
    site = tmp_path / "site"
    source = _tracked_copy(tmp_path / "source")
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(site), str(source)],
        check=True,
        capture_output=True,
        text=True,
    )
    # Import names: packages and modules (not the console script's bin/ or the metadata).
    top_level = {
        p.name.removesuffix(".py") for p in site.iterdir() if (p / "__init__.py").is_file() or p.suffix == ".py"
    }
    assert top_level == {"gendertune"}, top_level
    assert {p.name for p in (site / "gendertune").iterdir() if p.is_dir()} >= {
        "base",
        "cluster",
        "data_prep",
        "models",
        "tuning",
    }
    notebook = tmp_path / "notebook"
    notebook.mkdir()
    for stray in ("models.py", "tuning.py", "cluster.py", "data_prep.py"):
        (notebook / stray).write_text("raise ImportError('the stray module was imported')\n")
    code = (
        "import gendertune.tuning.train.config as c, gendertune.models.registry as r, gendertune.cluster.storage as s; "
        "print(c.__file__); print(r.__file__); print(s.__file__)"
    )
    env = {"PYTHONPATH": str(site), "PATH": "/usr/bin:/bin"}
    done = subprocess.run([sys.executable, "-c", code], cwd=notebook, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert all(line.startswith(str(site)) for line in done.stdout.split()), done.stdout
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    missing = subprocess.run(
        [sys.executable, "-c", "import models"], cwd=outside, env=env, capture_output=True, text=True
    )
    assert missing.returncode == 1 and "No module named 'models'" in missing.stderr
