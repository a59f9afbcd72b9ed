"""Suite-wide settings.

The suite runs under pytest-xdist (`-n auto` in pyproject.toml): one worker per core, each with one torch thread.
Tiny models gain little from intra-op threads, and workers x threads > cores makes OpenMP spin against itself.
"""
import os

if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ["OMP_NUM_THREADS"] = "1"   # also for the training subprocesses the tests launch
    os.environ["MKL_NUM_THREADS"] = "1"
    import torch

    torch.set_num_threads(1)
