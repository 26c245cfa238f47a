"""The roofline: bytes counted beside FLOPs, the measured bandwidth, one step's ops on the roofs."""
import pytest
import torch
import torch.nn as nn
from conftest import assert_panels, assert_unchanged, snapshot

import pytorch_practice_demo as demo


def _count(fn, *tensors):
    """(FLOPs, bytes) of fn(*tensors) under the counting mode, with its per-(class, op) records."""
    mode = demo._CountingMode()
    with mode:
        fn(*tensors)
    flops = mode.flops["forward"] + mode.other["forward"]
    return flops, mode.bytes["forward"], mode.ops


# --- bytes: the convention of torch/utils/_runtime_estimation.py ------------------------------------

def test_linear_bytes_by_hand():
    r = demo.FLOPCalculator().analyze_model(nn.Linear(64, 32), (8, 64), training=False)
    # reads x (8*64) + W (64*32) + b (32), writes y (8*32) fp32 elements: (512 + 2048 + 32 + 256) * 4 = 11_392
    assert r["bytes"] == (8 * 64 + 64 * 32 + 32 + 8 * 32) * 4 == 11_392
    assert r["flops"] == 2 * 8 * 64 * 32  # 32_768
    assert r["intensity"] == pytest.approx(32_768 / 11_392)
    assert r["by_op_class"]["linear/matmul"]["bytes"] == 11_392


def test_broadcast_add_counts_the_broadcast_dimension_once():
    x, b = torch.randn(16, 32), torch.randn(32)
    flops, moved, _ = _count(lambda x, b: x + b.expand(16, 32), x, b)
    # reads x (512) + the stride-0 expanded b (32 distinct elements), writes 512: (512 + 32 + 512) * 4 = 4_224
    assert moved == (512 + 32 + 512) * 4 == 4_224
    assert flops == 512
    assert demo._CountingMode.tensor_bytes(b.expand(16, 32)) == 32 * 4


def test_a_view_moves_nothing():
    x = torch.randn(8, 16)
    flops, moved, ops = _count(lambda x: x.view(16, 8).t().unsqueeze(0), x)
    assert (flops, moved) == (0, 0)
    assert all(b == 0 for _, b, _ in ops.values())


def test_a_copy_moves_bytes_and_does_no_flops():
    x = torch.randn(8, 16)
    flops, moved, ops = _count(lambda x: (x.clone(), torch.cat([x, x])), x)
    # clone: reads 128, writes 128; cat: reads 2 x 128, writes 256 elements: (256 + 512) * 4 = 3_072
    assert moved == (128 + 128 + 2 * 128 + 256) * 4 == 3_072
    assert flops == 0
    assert {c for c, _ in ops} == {"copies"}


def test_training_bytes_cover_forward_and_backward():
    r = demo.FLOPCalculator().analyze_model(nn.Linear(64, 32), (8, 64))
    assert r["training_bytes"] > r["bytes"] > 0
    assert r["by_op_class_pass"] == "forward + backward"


# --- the roofs ---------------------------------------------------------------------------------------

def test_measure_bandwidth_returns_positive_rates_with_spread():
    bw = demo.measure_bandwidth("cpu", time_budget_s=0.05, array_bytes=2 ** 20)
    assert set(bw["kernels"]) == set(demo.STREAM_KERNELS)
    assert bw["kernel"] in demo.STREAM_KERNELS and bw["sizing"] == "given (array_bytes)"
    assert bw["array_bytes"] == 2 ** 20
    for k in bw["kernels"].values():
        assert k["runs"] >= demo.MIN_RUNS
        assert 0 < k["spread_lo"] <= k["median_bytes_per_s"] <= k["spread_hi"] <= k["bytes_per_s"]
    assert bw["kernels"]["triad"]["bytes_moved"] == 3 * 2 ** 20  # three arrays of 1 MiB


def test_last_level_cache_says_where_it_comes_from():
    size, source = demo.last_level_cache_bytes("cpu")
    assert (size is None) == (source.startswith("no ")) and source


# --- roofline() on the learner's model ------------------------------------------------------------------

ROOFS = {"peak": {"flops_per_s": 1e10}, "bandwidth": {"bytes_per_s": 1e10}, "dispatch": {"s_per_call": 1e-6},
         "page_faults": {"s_per_fault": 1e-6}}


def test_roofline_on_a_tiny_mlp_returns_rows_and_leaves_the_model_unchanged():
    model = demo.mlp(32, in_features=16)
    before = snapshot(model)
    r = demo.roofline(model, (4, 16), device="cpu", time_budget_s=0.05, **ROOFS)
    assert_unchanged(before, model)
    assert r["ridge_flops_per_byte"] == 1.0
    assert {"linear/matmul", "optimizer"} <= set(r["classes"])
    assert r["measured_step_s"] > 0 and r["predicted_step_s"] > 0
    mm = next(row for row in r["rows"] if row["op"] == "addmm" and row["class"] == "linear/matmul")
    assert mm["flops"] == 2 * 4 * (16 * 32 + 32 * 16 + 16 * 10) == 9_472  # the 3 forward addmm, batch 4
    assert mm["predicted_s"] == max(mm["flops"] / 1e10, mm["bytes"] / 1e10)
    for row in r["rows"]:
        assert set(row) >= {"flops", "bytes", "intensity", "measured_s", "achieved_flops_per_s", "bound",
                            "predicted_s"}
    assert r["predicted_with_dispatch_s"] == pytest.approx(r["predicted_step_s"] + r["calls"] * 1e-6)
    if r["page_faults"] is not None:  # counted (getrusage): each at the given 1 µs
        assert r["page_fault_s"] == pytest.approx(r["page_faults"] * 1e-6)


@pytest.mark.skipif(demo.minor_page_faults() is None, reason="this OS does not count page faults")
def test_a_fresh_tensor_pays_its_page_faults():
    cost = demo.measure_page_faults("cpu", time_budget_s=0.1)
    # 64 MiB of fresh memory: at most one fault per 4 KiB page and the mapping's header page (fewer with
    # huge pages), each costing time
    assert 0 < cost["faults_per_fill"] <= demo.FIRST_TOUCH_BYTES // 4096 + 1
    assert cost["s_per_fault"] is None or cost["s_per_fault"] > 0
    assert cost["fresh_s"] > 0 and cost["held_s"] > 0


def test_time_in_a_backend_kernel_goes_to_the_op_the_counter_priced():
    # aten::convolution (counted) runs aten::_convolution and a backend kernel (mkldnn_convolution on
    # CPU) the counter never sees: their self time is the convolution's, in the conv class
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.Flatten(), nn.Linear(8 * 6 * 6, 2))
    r = demo.roofline(model, (2, 3, 8, 8), device="cpu", time_budget_s=0.05, **ROOFS)
    uncounted = {row["op"] for row in r["rows"] if row["calls"] == 0}
    assert not uncounted & {"_convolution", "mkldnn_convolution"}
    conv = next(row for row in r["rows"] if row["op"] == "convolution")
    assert conv["class"] == "conv" and conv["calls"] == 1 and conv["measured_s"] > 0


def test_roofline_refuses_bad_inputs():
    model = demo.mlp(32, in_features=16)
    with pytest.raises(TypeError):
        demo.roofline("not a model", (4, 16), device="cpu", **ROOFS)
    with pytest.raises(ValueError, match="precision"):
        demo.roofline(model, (4, 16), device="cpu", precision="fp64", **ROOFS)
    with pytest.raises(TypeError, match="training"):
        demo.roofline(model, (4, 16), device="cpu", training="yes", **ROOFS)
    with pytest.raises(ValueError, match="dims"):
        demo.roofline(model, (4, -16), device="cpu", **ROOFS)
    with pytest.raises(ValueError, match="meta"):
        demo.roofline(model, (4, 16), device="meta", **ROOFS)
    with pytest.raises(ValueError):  # the wrong input width: the lab's short run error
        demo.roofline(model, (4, 17), device="cpu", **ROOFS)


# --- the stage and its figure ----------------------------------------------------------------------------

def test_roofline_figure_panels(tmp_path):
    data = demo.run_roofline_analysis(profile=demo.QUICK, models=("MLP-2048",),
                                      peak_flops=demo.measure_peak_flops("cpu", time_budget_s=0.1, sizes=(256,)))
    assert set(data["why"]["MLP-2048"]) == set(data["models"]["MLP-2048"]["classes"])
    fig = demo.visualize_roofline(tmp_path, data=data, dpi=50)
    assert_panels(fig, 4)
    assert (tmp_path / demo.FIGURE_FILES["roofline"]).exists()
    sizes = [t.get_fontsize() for ax in fig.axes for t in ax.texts + [ax.title, ax.xaxis.label, ax.yaxis.label]]
    assert min(sizes) >= 8
    assert list(demo.STAGES).index("roofline") == list(demo.STAGES).index("dashboard") + 1
