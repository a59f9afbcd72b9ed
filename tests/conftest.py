"""Suite-wide settings.

The suite runs under pytest-xdist (`-n auto` in pyproject.toml): one worker per core, each with one torch thread.
Tiny models gain little from intra-op threads, and workers x threads > cores makes OpenMP spin against itself.
"""
import importlib.util
import os
from pathlib import Path

import pytest

if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ["OMP_NUM_THREADS"] = "1"   # also for the training subprocesses the tests launch
    os.environ["MKL_NUM_THREADS"] = "1"
    import torch

    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def load_benchmark():
    """`load_benchmark(name)`: benchmarks/<name>.py as a module (benchmarks/ holds scripts, not a package)."""
    return _load_benchmark


def _load_benchmark(name: str):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", Path(__file__).resolve().parents[1] / "benchmarks"
                                                  / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
