import os
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
os.environ.setdefault("OMP_NUM_THREADS", str(os.cpu_count() or 1))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # import the module as users do


def pytest_configure(config):
    """On a busy machine extra torch threads stall at every op (see threads_for_load): the suite
    uses the threads the machine leaves free, as the CLI does."""
    import torch

    import pytorch_practice_demo as demo
    torch.set_num_threads(demo.threads_for_load()[0])
