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
PACKAGES = ("gendertune", "data_prep", "models", "tuning", "cluster")

# Longest matching prefix wins. A module may import its own layer or any layer below.
LAYERS = {
    "gendertune.cli": 3,  # the command line
    "tuning": 2, "data_prep": 2,  # the stages
    "models": 1, "cluster": 1,  # models; the Ray runtime, storage and jobs
    "gendertune": 0,  # what every layer shares: config base, errors, figures
}
# The work itself (parse, hash, align, split, transform, metrics, ...): plain Python, runnable and
# testable without Ray. Their project imports must be on this list too.
RAY_FREE = {
    "gendertune", "data_prep", "tuning", "cluster",  # the packages' __init__, run by any import of a module
    "gendertune.config", "gendertune.console", "gendertune.errors", "gendertune.flags", "gendertune.plots",
    "data_prep.celeba", "data_prep.config", "data_prep.dedupe", "data_prep.errors", "data_prep.faces", "data_prep.images",
    "data_prep.labels", "data_prep.layout", "data_prep.splits", "data_prep.synthetic",
    "models", "models.registry", "models.transforms", "models.weights",
    "cluster.storage",
    "tuning.calibration", "tuning.engine", "tuning.metrics", "tuning.run_layout", "tuning.slices",
    "tuning.config", "tuning.ensemble", "tuning.leaderboard", "tuning.report", "tuning.pixels",
}


def _modules() -> dict[str, Path]:
    found = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


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


def _layer(module: str) -> int | None:
    matches = [prefix for prefix in LAYERS if module == prefix or module.startswith(prefix + ".")]
    return LAYERS[max(matches, key=len)] if matches else None


def test_every_module_has_a_layer_and_the_ray_free_list_is_real():
    assert all(_layer(module) is not None for module in MODULES)
    assert RAY_FREE <= set(MODULES)


@pytest.mark.parametrize("module", sorted(MODULES))
def test_imports_point_down(module):
    own = _layer(module)
    upward = [name for name in _imports(MODULES[module]) if (_layer(name) or 0) > own]
    assert not upward, f"{module} (layer {own}) imports {upward} from a layer above"
    if module.startswith("data_prep"):
        assert not [name for name in _imports(MODULES[module]) if name.startswith("tuning")], \
            f"{module}: prep comes before training and must not import it"


@pytest.mark.parametrize("module", sorted(RAY_FREE))
def test_pure_modules_import_no_ray(module):
    imports = _imports(MODULES[module])
    assert not [name for name in imports if name == "ray" or name.startswith("ray.")], module
    project = {name for name in imports if name.split(".")[0] in PACKAGES and name in MODULES}
    assert project <= RAY_FREE, f"{module} imports {sorted(project - RAY_FREE)}, which may import Ray"


def _modules_on_the_readme_map() -> set[str]:
    """The modules the README's Layout map names: `pkg/mod.py`, or a bare `mod.py` after `pkg/`."""
    block = (ROOT / "README.md").read_text().split("\n## Layout\n", 1)[1].split("```")[1]
    named, package = set(), None
    for with_package, folder, bare in re.findall(r"\b(\w+/\w+)\.py|\b(\w+)/(?=\s)|\b(\w+)\.py", block):
        if with_package:
            package = with_package.split("/")[0]
            named.add(with_package.replace("/", "."))
        elif folder in PACKAGES:
            package = folder
        elif bare and package:
            named.add(f"{package}.{bare}")
    return named


def test_the_readme_layout_map_names_every_module_and_only_real_ones():
    modules = {name for name, path in MODULES.items() if path.name != "__init__.py"}
    mapped = _modules_on_the_readme_map()
    assert not modules - mapped, f"add to the README's Layout map: {sorted(modules - mapped)}"
    assert not mapped - modules, f"the README's Layout map names modules that don't exist: {sorted(mapped - modules)}"
