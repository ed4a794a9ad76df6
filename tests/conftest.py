"""Shared test settings.

Tiny models run fastest on one thread, and several test processes (pytest-xdist, the
subprocesses some tests start) would otherwise oversubscribe the cores: OpenMP threads
spin-waiting for a busy core made small matmuls ~100x slower on the 2-core CI machine.
"""

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")  # inherited by subprocesses started by tests
os.environ.setdefault("MKL_NUM_THREADS", "1")

import torch

torch.set_num_threads(1)
