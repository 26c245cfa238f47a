import os
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
os.environ.setdefault("OMP_NUM_THREADS", str(os.cpu_count() or 1))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # import the module as users do

import torch  # noqa: E402  (after OMP_NUM_THREADS is set)
import torch.nn as nn  # noqa: E402


def pytest_configure(config):
    """On a busy machine extra torch threads stall at every op (see threads_for_load): the suite
    uses the threads the machine leaves free, as the CLI does."""
    import torch

    import pytorch_practice_demo as demo
    torch.set_num_threads(demo.threads_for_load()[0])


# --- helpers shared by the test files (imported as `from conftest import ...`) -----------------------

def snapshot(model):
    """Everything analysing a model must leave as it was: state, modes, grads, attributes, hooks."""
    return {
        "state": {k: v.clone() for k, v in model.state_dict().items()},
        "training": [m.training for m in model.modules()],
        "requires_grad": [p.requires_grad for p in model.parameters()],
        "grads": [p.grad for p in model.parameters()],
        "dicts": [sorted(m.__dict__) for m in model.modules()],
        "hooks": [(len(m._forward_hooks), len(m._forward_pre_hooks), len(m._backward_hooks))
                  for m in model.modules()],
        "global_hooks": (len(nn.modules.module._global_forward_hooks),
                         len(nn.modules.module._global_forward_pre_hooks)),
        "devices": [t.device for t in model.state_dict().values()],
    }


def assert_unchanged(before, model):
    """The model matches its `snapshot` and has no gradients."""
    after = snapshot(model)
    for key in before["state"]:
        assert torch.equal(before["state"][key], after["state"][key]), key
    for key in ("training", "requires_grad", "dicts", "hooks", "global_hooks", "devices"):
        assert before[key] == after[key], key
    assert all(g is None for g in after["grads"])


def bn_model():
    """A small CNN with BatchNorm, Dropout, a frozen weight and mixed train/eval modes."""
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Dropout(0.1),
                          nn.Flatten(), nn.Linear(8 * 6 * 6, 4))
    model[0].weight.requires_grad_(False)
    model[3].eval()  # mixed modes must survive
    return model


def assert_panels(fig, n):
    """A figure test: `n` panels (colour bars aside), each with a title and something drawn in it."""
    panels = [ax for ax in fig.axes if ax.get_label() != "<colorbar>"]
    assert len(panels) == n
    for ax in panels:
        assert ax.get_title(), "a panel without a title"
        drawn = (len(ax.lines) + len(ax.patches) + len(ax.collections) + len(ax.texts) + len(ax.tables)
                 + len(ax.images))
        assert drawn > 0, f"nothing drawn in {ax.get_title()!r}"


def same_title(ax, title):
    """A panel's title as written, whatever lines the figure wrapped it into."""
    return "".join(ax.get_title().split()) == "".join(title.split())
