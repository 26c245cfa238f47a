"""run_training_comparison: strategies that must agree do agree, the loss falls, budgets hold, MNIST reads."""

import gzip

import matplotlib.figure
import numpy as np
import pytest
import torch

import pytorch_practice_demo as demo
from conftest import assert_panels, same_title
from pytorch_practice_demo import (FIGURE_FILES, QUICK, ResMLPClassifier, load_mnist, measure_peak_flops,
                                   plot_training_performance, run_training_comparison,
                                   visualize_training_performance)

RUN_KEYS = {"train_loss", "val_loss", "val_steps", "samples_per_s", "peak_memory_bytes", "wall_s",
            "achieved_flops_per_s", "mfu", "activation_bytes", "at_peak", "cut", "steps_done", "precision",
            "grad_norm", "grad_norm_by_group", "nonfinite_grads", "loss_scale_per_step", "skipped_steps"}


@pytest.fixture(scope="module")
def four_strategies():
    return run_training_comparison(steps=12, batch=64, time_budget_s=60)


def test_every_run_reports_what_the_issue_asks(four_strategies):
    data = four_strategies
    assert list(data["runs"]) == ["baseline", "mixed_precision", "gradient_accumulation", "gradient_checkpointing"]
    for run in data["runs"].values():
        assert RUN_KEYS <= run.keys()
        assert len(run["train_loss"]) == run["steps_done"] == 12 and run["cut"] is None
        assert run["val_steps"][0] == 0 and run["val_steps"][-1] == 12
        assert len(run["val_steps"]) == len(run["val_loss"])
        assert run["samples_per_s"] > 0 and run["peak_memory_bytes"] > 0 and 0 < run["mfu"] <= 1
        assert run["achieved_flops_per_s"] == pytest.approx(data["training_flops_per_step"] / run["median_step_s"])
    assert data["runs"]["mixed_precision"]["precision"] == "amp_bf16"  # CPU autocast
    assert data["runs"]["mixed_precision"]["loss_scale_per_step"] is None  # no GradScaler on CPU
    assert data["runs"]["mixed_precision"]["skipped_steps"] is None
    assert {"fp32", "amp_bf16"} == set(data["peak_flops"])
    assert "matmul" in data["peak_flops"]["fp32"]["method"]
    # model FLOPs of a step: 3x the forward of a matmul-only model = 6 x parameters x batch, minus
    # the input-gradient of the first layer (its input needs no grad)
    n = data["parameters"]
    assert 5 * n * 64 < data["training_flops_per_step"] <= 6 * n * 64


def test_gradient_accumulation_reproduces_the_baseline(four_strategies):
    base, accum = four_strategies["runs"]["baseline"], four_strategies["runs"]["gradient_accumulation"]
    assert accum["micro_batches"] == 4
    np.testing.assert_allclose(accum["train_loss"], base["train_loss"], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(accum["val_loss"], base["val_loss"], rtol=1e-5, atol=1e-6)
    assert accum["activation_bytes"] < base["activation_bytes"]  # one micro-batch's activations at a time


def test_checkpointing_reproduces_the_baseline_with_fewer_activations(four_strategies):
    base, ckpt = four_strategies["runs"]["baseline"], four_strategies["runs"]["gradient_checkpointing"]
    assert ckpt["checkpointed_blocks"] == 8
    np.testing.assert_allclose(ckpt["train_loss"], base["train_loss"], rtol=1e-6, atol=1e-7)
    assert ckpt["activation_bytes"] < 0.5 * base["activation_bytes"]
    # at this small batch the peak is Adam's step for both, so the peaks can tie
    assert ckpt["peak_memory_bytes"] <= base["peak_memory_bytes"]


def test_accumulation_and_checkpointing_see_the_baselines_gradients():
    data = run_training_comparison(steps=3, batch=32, width=32,
                                   strategies=["baseline", "gradient_accumulation", "gradient_checkpointing"])
    base = data["runs"]["baseline"]
    assert len(base["grad_norm"]) == 3 and base["nonfinite_grads"] == [0, 0, 0]
    first = base["grad_norm_by_group"]["first"]
    assert list(first) == ["embed", "blocks", "ln", "head"]  # ResMLPClassifier's top-level children
    # the global norm is the root of the groups' squared norms
    assert base["grad_norm"][0] == pytest.approx(sum(v ** 2 for v in first.values()) ** 0.5, rel=1e-9)
    for strategy in ("gradient_accumulation", "gradient_checkpointing"):
        run = data["runs"][strategy]
        np.testing.assert_allclose(run["grad_norm"], base["grad_norm"], rtol=1e-5)
        for when in ("first", "last"):
            np.testing.assert_allclose(list(run["grad_norm_by_group"][when].values()),
                                       list(base["grad_norm_by_group"][when].values()), rtol=1e-5, atol=1e-7)
        assert run["loss_scale_per_step"] is None and run["skipped_steps"] is None


def test_nonfinite_gradients_are_counted():
    run = demo._StrategyRun(ResMLPClassifier(width=32, depth=1), "baseline", torch.device("cpu"), 1, 1e-3)
    x, y = torch.randn(4, 784), torch.tensor([0, 1, 2, 3])
    run.step(x, y)
    assert run.gradient_health()["nonfinite"] == 0
    x[0, 0] = float("nan")  # one sample's NaN reaches every weight's gradient through the batch sum
    run.step(x, y)
    health = run.gradient_health()
    assert health["nonfinite"] == sum(p.numel() for p in run.replica.parameters())
    assert run.gradients is None  # read once: the gradients are let go


def test_loss_falls_well_below_its_start():
    run = run_training_comparison(strategies=["baseline"], steps=40, batch=128, time_budget_s=30)["runs"]["baseline"]
    assert run["train_loss"][-1] < 0.5 * run["train_loss"][0]
    assert run["val_loss"][-1] < 0.5 * run["val_loss"][0]


def test_default_run_plans_equal_steps_and_records_its_conditions():
    data = run_training_comparison(strategies=["baseline", "gradient_checkpointing"], profile=QUICK)
    steps = {run["steps_done"] for run in data["runs"].values()}
    assert len(steps) == 1 and steps.pop() >= 30  # the same steps for every strategy, at least 30
    plan = data["plan"]
    assert plan["steps"] == data["steps"] and plan["batch"] == data["batch"]
    assert {"load_start", "load_end", "busy", "budget_s", "wall_s"} <= data["conditions"].keys()
    for run in data["runs"].values():
        assert run["cut"] is None and run["val_steps"][-1] == run["steps_done"]
        lo, hi = run["samples_per_s_range"]
        assert lo <= run["samples_per_s"] <= hi  # the spread brackets the median
        assert run["mfu"] is None or 0 < run["mfu"] <= 1


def test_same_seed_same_curves_and_the_model_class():
    a = run_training_comparison(strategies=["baseline"], steps=5, batch=32, seed=3)
    b = run_training_comparison(strategies=["baseline"], steps=5, batch=32, seed=3)
    assert a["runs"]["baseline"]["train_loss"] == b["runs"]["baseline"]["train_loss"]
    model = ResMLPClassifier()
    assert not any(isinstance(m, (torch.nn.Dropout, torch.nn.BatchNorm1d)) for m in model.modules())


@pytest.mark.parametrize("kwargs, match", [
    ({"strategies": ["fastest"]}, "strategies"),
    ({"strategies": []}, "strategies"),
    ({"steps": 2}, "steps"),
    ({"batch": 30, "accumulation": 4}, "multiple"),
    ({"time_budget_s": 0}, "time_budget_s"),
    ({"dataset": "cifar"}, "dataset"),
    ({"dataset": "mnist"}, "data_dir"),
])
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        run_training_comparison(**kwargs)


def _write_idx(path, array, gz=False):
    header = bytes([0, 0, 8, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    payload = header + array.astype(np.uint8).tobytes()
    with (gzip.open if gz else open)(path, "wb") as f:  # closed (and the gzip stream ended) before reading
        f.write(payload)


def _tiny_mnist(folder, n_train=512, n_test=128):
    """MNIST-format files whose label is drawn as a bright row of pixels: learnable in a few steps."""
    rng = np.random.default_rng(0)
    for split, n, gz in (("train", n_train, True), ("t10k", n_test, False)):
        labels = rng.integers(0, 10, n)
        images = rng.integers(0, 60, (n, 28, 28))
        images[np.arange(n), 2 + 2 * labels] = 255
        suffix = ".gz" if gz else ""
        _write_idx(folder / f"{split}-images-idx3-ubyte{suffix}", images, gz)
        _write_idx(folder / f"{split}-labels-idx1-ubyte{suffix}", labels, gz)


def test_mnist_from_idx_files_written_here(tmp_path):
    _tiny_mnist(tmp_path)
    data = load_mnist(tmp_path)
    assert data["train_x"].shape == (512, 28, 28) and data["val_x"].shape == (128, 28, 28)
    assert data["train_y"].dtype == torch.long and int(data["train_y"].max()) <= 9
    result = run_training_comparison(strategies=["baseline"], dataset="mnist", data_dir=tmp_path, steps=20, batch=32)
    assert result["dataset"] == "mnist" and result["train_samples"] == 512 and result["val_samples"] == 128
    run = result["runs"]["baseline"]
    assert run["val_loss"][-1] < 0.5 * run["val_loss"][0]


def test_mnist_missing_or_corrupt_files_say_what_to_do(tmp_path):
    with pytest.raises(ValueError, match="train-images-idx3-ubyte.*download"):
        load_mnist(tmp_path)  # and nothing is fetched: download defaults to False
    _tiny_mnist(tmp_path)
    (tmp_path / "t10k-labels-idx1-ubyte").write_bytes(b"\x00\x00\x0d\x01garbage")
    with pytest.raises(ValueError, match="magic"):
        load_mnist(tmp_path)


def test_peak_flops_is_a_measurement():
    peak = measure_peak_flops("cpu", time_budget_s=0.5)
    assert peak["flops_per_s"] > 1e8 and peak["matmul_size"] >= 512
    assert peak["sweep"][0]["size"] == 512 and peak["stopped"]
    best = max(s["best_flops_per_s"] for s in peak["sweep"])
    assert peak["flops_per_s"] == best  # the best rate of the sweep, not the last size tried


def test_figure_from_data_and_saved_file(four_strategies, tmp_path):
    fig = plot_training_performance(four_strategies)
    assert isinstance(fig, matplotlib.figure.Figure)
    assert_panels(fig, 9)  # six of the strategies, then gradient norms, per-group norms, the input pipeline
    for key in ("grad_norm_title", "grad_groups_title"):
        assert any(same_title(ax, demo._t(key)) for ax in fig.axes)
    gap = next(ax for ax in fig.axes if same_title(ax, demo._t("grad_norm_title")))
    assert len(gap.get_lines()) == len(four_strategies["runs"])  # one gradient-norm curve per strategy
    visualize_training_performance(tmp_path, data=four_strategies, dpi=40)
    assert (tmp_path / FIGURE_FILES["training"]).exists()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_mixed_precision_uses_fp16_with_grad_scaler():
    data = run_training_comparison(device="cuda", strategies=["baseline", "mixed_precision"], steps=5, batch=64)
    assert data["runs"]["mixed_precision"]["precision"] == "amp_fp16"
    assert data["runs"]["mixed_precision"]["peak_memory_bytes"] > 0
    assert data["runs"]["mixed_precision"]["loss_scale"] > 1  # trained through a GradScaler
    assert data["runs"]["baseline"]["loss_scale"] is None
    mixed = data["runs"]["mixed_precision"]
    assert len(mixed["loss_scale_per_step"]) == 5 and 0 <= mixed["skipped_steps"] <= 5
    # GradScaler skips a step (and backs its scale off) exactly when an unscaled gradient is inf/NaN
    assert mixed["skipped_steps"] == sum(n > 0 for n in mixed["nonfinite_grads"])


# --- the input pipeline ----------------------------------------------------------------------------

def test_input_pipeline_times_each_worker_setting_and_leaves_no_worker_behind():
    import multiprocessing
    data = demo.measure_input_pipeline(batch_size=16, num_workers=(0, 1), time_budget_s=0.5)
    assert [r["num_workers"] for r in data["rows"]] == [0, 1]
    for r in data["rows"]:
        assert r["runs"] >= demo.MIN_RUNS and r["samples_per_s"] > 0 and r["start_s"] >= 0
        lo, hi = r["samples_per_s_range"]
        assert lo <= r["samples_per_s"] <= hi
    assert data["pin_memory"] is False and "pin_memory does nothing" in data["pin_memory_note"]  # CPU only
    assert not multiprocessing.active_children()  # the worker was shut down
    verdict = demo._input_bound(data, step_samples_per_s=1e12)  # no loader keeps up with an infinitely fast step
    assert verdict["input_bound"] and verdict["best_samples_per_s"] == max(r["samples_per_s"] for r in data["rows"])


def test_input_pipeline_refuses_bad_worker_counts():
    for bad in (-1, 1.5, True):
        with pytest.raises(ValueError, match="num_workers"):
            demo.measure_input_pipeline(batch_size=4, num_workers=(bad,), time_budget_s=0.2)


def test_synthetic_images_are_decoded_per_sample_and_seeded():
    data = demo.SyntheticImages(n=4, size=8)
    x, y = data[1]
    assert x.shape == (1, 8, 8) and x.dtype == torch.float32 and y == 1
    assert torch.equal(x, data[1][0]) and not torch.equal(x, data[2][0])
