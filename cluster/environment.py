"""Provenance: `environment.json`, written beside every run, prep output and comparison, records the
software and hardware that produced it, so a `--deterministic` number can be tied to what made it.

It holds the versions of gendertune and the packages its numbers depend on, the git commit of the
source when it runs from a checkout, Python, the CPU's model and flags, the GPUs' names, and the Ray
cluster's resources when Ray is up. Ray is never started or imported here: a stage that writes this
file has already connected, and a Ray-free caller just gets no resources.
"""

from __future__ import annotations

import importlib.metadata
import platform
import subprocess
import sys
from pathlib import Path

ENVIRONMENT = "environment.json"
PACKAGES = ("gendertune", "torch", "torchvision", "ray", "optuna", "numpy", "pandas")
SOURCE = Path(__file__).resolve().parents[1]  # the repository when installed editable or run from a checkout


def package_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def _command(*args: str, cwd: Path | None = None) -> str | None:
    """A short command's stdout, or None where the tool is missing or fails."""
    try:
        done = subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=10, check=True)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip() or None


def git_commit() -> str | None:
    """The source's commit, with `+dirty` when it has uncommitted changes; None outside a checkout."""
    commit = _command("git", "rev-parse", "HEAD", cwd=SOURCE)
    if commit is None:
        return None
    return commit + ("+dirty" if _command("git", "status", "--porcelain", "--untracked-files=no", cwd=SOURCE) else "")


def cpu() -> dict:
    """The CPU's model and instruction-set flags (what decides bf16, AVX-512 kernels and so numbers)."""
    info = {"model": platform.processor() or platform.machine(), "flags": []}
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return info
    fields = dict(line.split(":", 1) for line in lines if ":" in line)  # the last CPU's; all are alike
    fields = {key.strip(): value.strip() for key, value in fields.items()}
    return {"model": fields.get("model name", info["model"]), "flags": sorted(fields.get("flags", "").split())}


def gpu_names() -> list[str]:
    # nvidia-smi rather than torch.cuda: it does not initialise CUDA in the driver of a CPU-only stage.
    names = _command("nvidia-smi", "--query-gpu=name", "--format=csv,noheader")
    return names.splitlines() if names else []


def ray_resources() -> dict | None:
    """The cluster's total resources when this process is connected to Ray, else None."""
    ray = sys.modules.get("ray")
    if ray is None or not ray.is_initialized():
        return None
    return {key: value for key, value in ray.cluster_resources().items() if not key.startswith("node:")}


def environment() -> dict:
    return {
        "packages": {name: package_version(name) for name in PACKAGES},
        "git_commit": git_commit(),
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "cpu": cpu(),
        "gpus": gpu_names(),
        "ray_cluster_resources": ray_resources(),
    }


def write_environment(folder: str | Path) -> None:
    """Write environment.json into `folder` (a stage's local output folder, next to its config.json)."""
    # Imported here: storage loads pyarrow (~0.4 s), which `gendertune --version` and `--help` need not.
    from gendertune.cluster.storage import write_json_atomic

    write_json_atomic(Path(folder) / ENVIRONMENT, environment())
