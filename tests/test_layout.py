"""The architecture the README's Layout section draws, checked on the source: imports only point
down (command line -> stages -> models / cluster runtime and storage -> shared base), prep never
imports the training stages, and the modules that hold the pure work import no Ray, not even
through another module of the project."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# The repository's folders and the import names they install as: one import name, gendertune.
FOLDERS = {
    "gendertune": "gendertune",
    "cluster": "gendertune.cluster",
    "data_prep": "gendertune.data_prep",
    "models": "gendertune.models",
    "tuning": "gendertune.tuning",
}

# The layers, bottom first: a module may import its own layer or any layer below. Longest
# matching prefix wins; a sub-package's __init__ belongs to its own layer.
LAYERS = [
    ("gendertune.base",),  # what every layer shares: config base, errors, flags, console, figures
    ("gendertune.cluster",),  # the Ray runtime, task runner, storage, tracking, jobs
    ("gendertune.data_prep", "gendertune.models"),  # prep; the model registry and transforms
    ("gendertune.tuning.evaluate", "gendertune.tuning"),  # scoring and predicting with a run
    ("gendertune.tuning.train",),  # one training run
    ("gendertune.tuning.search",),  # one model's search
    ("gendertune.tuning.compare",),  # the comparison, its leaderboard and report, the demo
    ("gendertune.cli", "gendertune"),  # the command line and the Python API
]
# The work itself (parse, hash, align, split, transform, metrics, ...): plain Python, runnable and
# testable without Ray. Their project imports must be on this list too.
RAY_FREE = {
    # the packages' __init__, run by any import of a module
    "gendertune",
    "gendertune.base",
    "gendertune.cluster",
    "gendertune.data_prep",
    "gendertune.models",
    "gendertune.tuning",
    "gendertune.tuning.evaluate",
    "gendertune.tuning.train",
    "gendertune.tuning.search",
    "gendertune.tuning.compare",
    "gendertune.base.config",
    "gendertune.base.console",
    "gendertune.base.errors",
    "gendertune.base.flags",
    "gendertune.base.plots",
    "gendertune.data_prep.celeba",
    "gendertune.data_prep.config",
    "gendertune.data_prep.dedupe",
    "gendertune.data_prep.errors",
    "gendertune.data_prep.faces",
    "gendertune.data_prep.images",
    "gendertune.data_prep.labels",
    "gendertune.data_prep.layout",
    "gendertune.data_prep.splits",
    "gendertune.data_prep.synthetic",
    "gendertune.models.registry",
    "gendertune.models.transforms",
    "gendertune.models.weights",
    "gendertune.cluster.environment",
    "gendertune.cluster.storage",
    "gendertune.tuning.evaluate.calibration",
    "gendertune.tuning.evaluate.decision",
    "gendertune.tuning.evaluate.metrics",
    "gendertune.tuning.evaluate.run_layout",
    "gendertune.tuning.evaluate.slices",
    "gendertune.tuning.train.config",
    "gendertune.tuning.train.engine",
    "gendertune.tuning.train.pixels",
    "gendertune.tuning.search.config",
    "gendertune.tuning.search.figures",
    "gendertune.tuning.search.lr_range",
    "gendertune.tuning.search.policy",
    "gendertune.tuning.search.space",
    "gendertune.tuning.compare.config",
    "gendertune.tuning.compare.layout",
    "gendertune.tuning.compare.ensemble",
    "gendertune.tuning.compare.leaderboard",
    "gendertune.tuning.compare.report",
}


def _module_name(path: Path) -> str:
    """The import name of a source file: its folder's package plus its path below the folder."""
    folder, *rest = path.relative_to(ROOT).with_suffix("").parts
    parts = [FOLDERS[folder], *rest]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_module_name(path): path for folder in FOLDERS for path in sorted((ROOT / folder).rglob("*.py"))}


MODULES = _modules()


def _imports(path: Path) -> set[str]:
    """Every module `path` imports, at the top or inside a function; `from pkg import mod`
    counts as pkg.mod when mod is a module."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names |= {f"{node.module}.{alias.name}" for alias in node.names if f"{node.module}.{alias.name}" in MODULES}
    return names


PREFIXES = {prefix: layer for layer, prefixes in enumerate(LAYERS) for prefix in prefixes}


def _layer(module: str) -> int | None:
    matches = [prefix for prefix in PREFIXES if module == prefix or module.startswith(prefix + ".")]
    return PREFIXES[max(matches, key=len)] if matches else None


def test_every_module_has_a_layer_and_the_ray_free_list_is_real():
    assert all(_layer(module) is not None for module in MODULES)
    assert RAY_FREE <= set(MODULES)


@pytest.mark.parametrize("module", sorted(MODULES))
def test_imports_point_down(module):
    own = _layer(module)
    upward = [name for name in _imports(MODULES[module]) if (_layer(name) or 0) > own]
    assert not upward, f"{module} (layer {own}) imports {upward} from a layer above"
    if module.startswith("gendertune.data_prep"):
        assert not [name for name in _imports(MODULES[module]) if name.startswith("gendertune.tuning")], (
            f"{module}: prep comes before training and must not import it"
        )


@pytest.mark.parametrize("module", sorted(RAY_FREE))
def test_pure_modules_import_no_ray(module):
    imports = _imports(MODULES[module])
    assert not [name for name in imports if name == "ray" or name.startswith("ray.")], module
    project = {name for name in imports if name in MODULES}
    assert project <= RAY_FREE, f"{module} imports {sorted(project - RAY_FREE)}, which may import Ray"


def _modules_on_the_readme_map() -> set[str]:
    """The modules the README's Layout map names: a folder (`tuning/train/`) followed by the bare
    names of its files (`run.py`), or a file with its path (`gendertune/cli.py`)."""
    block = (ROOT / "README.md").read_text().split("\n## Layout\n", 1)[1].split("```")[1]
    named, folder = set(), None
    for path, new_folder in re.findall(r"(?<![\w/.])([\w/]+)\.py\b|(?<![\w/.])((?:\w+/)+)(?=\s)", block):
        if new_folder:
            folder = new_folder if new_folder.split("/")[0] in FOLDERS else folder
            continue
        full = path if "/" in path else f"{folder}{path}" if folder else None
        if full and Path(full).name != "__init__":
            named.add(_module_name(ROOT / f"{full}.py"))
    return named


def test_the_readme_layout_map_names_every_module_and_only_real_ones():
    modules = {name for name, path in MODULES.items() if path.name != "__init__.py"}
    mapped = _modules_on_the_readme_map()
    assert not modules - mapped, f"add to the README's Layout map: {sorted(modules - mapped)}"
    assert not mapped - modules, f"the README's Layout map names modules that don't exist: {sorted(mapped - modules)}"
