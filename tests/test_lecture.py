"""The lecture's claims: KV cache, the independent CPU memory reading, formula checks, fusion,
torch.compile's bounds, the optimisation table and TensorBoard logs."""

import subprocess

import pytest
import torch
import torch.nn as nn

import pytorch_practice_demo as demo
from conftest import assert_panels


def small_gpt(**kw):
    return demo.TinyGPT(vocab_size=256, n_layer=2, n_embd=64, n_head=4, block_size=64, **kw)


# --- KV cache ------------------------------------------------------------------------------------

def test_cached_generation_matches_full_recompute():
    torch.manual_seed(0)
    model = small_gpt().eval()
    prompt = torch.randint(0, 256, (2, 5))
    assert torch.equal(model.generate(prompt, 12), model.generate(prompt, 12, use_cache=False))
    cache = demo.KVCache(2)
    with torch.no_grad():
        ids = torch.randint(0, 256, (2, 11))
        chunks = [model(ids[:, :4], cache), model(ids[:, 4:5], cache), model(ids[:, 5:], cache)]
        torch.testing.assert_close(torch.cat(chunks, 1), model(ids), atol=1e-4, rtol=1e-4)
    assert len(cache) == 11
    # B x T x layers x hidden x 2 (key and value) x 4 bytes
    assert cache.nbytes() == demo.KVCache.formula_bytes(2, 11, 2, 64, 4) == 2 * 11 * 2 * 64 * 2 * 4


def test_kv_cache_measured_by_the_allocator_follows_the_formula():
    model = small_gpt()
    was = [m.training for m in model.modules()]
    kv = demo.measure_kv_cache(model, batch=4, prompt=8, new_tokens=16)
    assert [m.training for m in model.modules()] == was
    assert kv["method"] == demo._AllocatorPeak.SOURCE
    assert kv["tokens"] == list(range(9, 25)) and len(kv["held_bytes"]) == 16
    assert kv["cache_bytes"] == kv["formula_bytes"]  # the cache's tensors are exactly the formula
    # held after the last token: the cache, plus the ids and the last logits (a few kB)
    assert 0 <= kv["held_bytes"][-1] - kv["formula_bytes"][-1] < 0.1 * kv["formula_bytes"][-1]
    assert all(peak >= held for peak, held in zip(kv["step_peak_bytes"], kv["held_bytes"]))


def test_kv_cache_refuses_what_it_cannot_measure():
    with pytest.raises(TypeError, match="TinyGPT"):
        demo.measure_kv_cache(nn.Linear(2, 2))
    with pytest.raises(ValueError, match="64 positions"):
        demo.measure_kv_cache(small_gpt(), prompt=60, new_tokens=10)


# --- measured memory from the allocator, not from the estimate's tracker -------------------------------

def test_running_peak_ignores_frees_of_blocks_allocated_before_the_window():
    # (time, address, bytes, the allocator's total after it); 999 bytes were held before the window
    events = [(1, 0xA, 100, 1099), (2, 0xB, 50, 1149), (3, 0xF, -999, 150), (4, 0, None, None),
              (5, 0xA, -100, 50), (6, 0xC, 30, 80), (7, 0, None, None)]
    peak, end, marks = demo._AllocatorPeak.running_peak(events)
    assert (peak, end) == (150, 80)
    assert marks == [(150, 150), (80, 150)]


def test_running_peak_counts_a_free_the_events_do_not_show():
    # 0xA is freed on a thread the profiler does not follow (gloo's worker): no event, but the
    # allocator's total drops by its 100 bytes before 0xC is allocated
    events = [(1, 0xA, 100, 100), (2, 0xB, 50, 150), (3, 0xC, 30, 80), (4, 0, None, None)]
    peak, end, marks = demo._AllocatorPeak.running_peak(events)
    assert (peak, end, marks) == (150, 80, [(80, 150)])


def test_measure_memory_reads_the_cpu_allocator():
    model = demo.MnistNet()
    result = demo.measure_memory(model, (8, 1, 28, 28))
    assert result["method"] == demo._AllocatorPeak.SOURCE
    assert result["total"] >= result["tracked_total"] > 0


def test_inside_another_profiler_measure_memory_says_it_fell_back():
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU]):
        result = demo.measure_memory(demo.mlp(64), (2, 1024))
    assert "tracker" in result["method"] and "another torch.profiler" in result["method"]
    assert result["total"] == result["tracked_total"]


@pytest.mark.parametrize("training", [True, False])
def test_conv_estimate_counts_onednn_scratch(training):
    # oneDNN's blocked-layout buffers are seen only by the allocator; the estimate adds them by rule
    model = demo.MnistNet()
    est = demo.estimate_memory(model, (32, 1, 28, 28), training=training)
    meas = demo.measure_memory(model, (32, 1, 28, 28), training=training)
    assert abs(est["total"] - meas["total"]) / meas["total"] <= 0.03


def test_blas_compatible_layouts():
    assert demo.CpuScratch.blas_compatible(torch.empty(4, 3)) and demo.CpuScratch.blas_compatible(torch.empty(3, 4).t())
    assert not demo.CpuScratch.blas_compatible(torch.empty(1, 3).expand(4, 3))  # stride 0: copied before the GEMM


# --- formulas ------------------------------------------------------------------------------------

def test_lecture_memory_terms():
    terms = demo.lecture_memory_terms(1000, batch=2, seq=8, hidden=16, layers=3)
    assert terms == {"parameter_bytes": 4000, "gradient_bytes": 4000, "optimizer_bytes": 8000,
                     "activation_bytes": 2 * 8 * 16 * 3 * 4}


def test_flop_formulas_against_counting():
    record = demo.run_flop_analysis(models=["TinyGPT"])["records"][0]
    rows = {r["name"]: r for r in demo.lecture_flop_check(record, layers=4, hidden=256, vocab=1024)}
    assert rows["matmul"]["error"] == 0 and rows["attention"]["error"] == 0
    # 2·L·H·(H+4H) leaves out qkv, proj and half the MLP, the attention scores and the LM head
    assert rows["per_token"]["error"] == pytest.approx(10 / 30 - 1)
    assert rows["per_token"]["correct_error"] == pytest.approx(0)
    assert -0.2 < rows["training_6n"]["error"] < 0 and abs(rows["training_6n"]["correct_error"]) < 0.05


# --- fusion and torch.compile -------------------------------------------------------------------------

def test_fusion_same_math_and_fewer_bytes():
    data = demo.measure_fusion(shape=(64, 256), time_budget_s=0.2)
    for case in data["cases"].values():
        assert case["max_abs_diff"] < 1e-5
        assert case["speedup"] == case["composed"]["median_s"] / case["fused"]["median_s"]
        assert case["composed"]["runs"] >= demo.MIN_RUNS
        # the fused kernel allocates its output (and LayerNorm a mean and rstd per row); the chain a
        # temporary per op on top
        assert 64 * 256 * 4 <= case["fused"]["peak_bytes"] <= 64 * 256 * 4 + 64 * 8 < case["composed"]["peak_bytes"]


def test_compile_is_bounded_and_says_why(monkeypatch):
    def too_slow(*args, timeout, **kwargs):
        raise subprocess.TimeoutExpired(args[0], timeout)
    monkeypatch.setattr(demo.subprocess, "run", too_slow)
    result = demo.measure_compile(time_budget_s=7)
    assert "7 s budget" in result["skipped"]

    def fails(*args, **kwargs):
        return subprocess.CompletedProcess(args[0], 1, "", "Traceback...\nRuntimeError: no C++ compiler\n")
    monkeypatch.setattr(demo.subprocess, "run", fails)
    assert "no C++ compiler" in demo.measure_compile()["skipped"]


# --- the optimisation table ----------------------------------------------------------------------------

def _run(samples_per_s, peak, activations, precision="fp32"):
    return {"samples_per_s": samples_per_s, "peak_memory_bytes": peak, "activation_bytes": activations,
            "precision": precision}


def test_claims_table_verdicts_and_slowdowns():
    training = {"model": "ResMLP", "batch": 64, "skipped": {},
                "runs": {"baseline": _run(1000, 100, 40),
                         "mixed_precision": _run(40, 90, 20, "amp_bf16"),   # 25x slower: no AMX
                         "gradient_accumulation": _run(950, 80, 10),
                         "gradient_checkpointing": _run(820, 70, 20)}}
    fusion = {"shape": [8, 8], "dtype": "fp32", "cases": {"GELU": {"speedup": 1.2, "memory_saving": 0.1}}}
    rows = {(r["technique"], r["aspect"]): r for r in demo.LectureClaims.rows(training, fusion)}
    assert rows["mixed_precision", "speed"]["measured"] == pytest.approx(0.04)
    assert rows["mixed_precision", "speed"]["verdict"] == "disagree"
    assert rows["gradient_checkpointing", "memory"]["measured"] == pytest.approx(0.5)
    assert rows["gradient_checkpointing", "memory"]["verdict"] == "agree"
    assert rows["gradient_checkpointing", "speed"]["verdict"] == "agree"      # 0.82x: ~20 % recompute
    assert rows["gradient_accumulation", "memory"]["verdict"] == "info"
    assert rows["fusion", "speed"]["verdict"] == "agree"
    # a slowdown is written as one
    assert "25" in demo._claim_text(rows["mixed_precision", "speed"])
    table = demo.format_lecture_table({"claims": list(rows.values()), "flops": [], "memory": [], "kv_cache": None})
    assert demo._t("slower", x=25.0) in table  # the figure's words, in its language
    _, cells, _ = demo._claim_cells(list(rows.values()))
    assert all(f"| {row[0]} | {row[1]} |" in table for row in cells)  # one line per case, as the figure has them


def test_a_spread_across_the_claims_edge_is_uncertain():
    assert demo.LectureClaims.verdict(1.2, (1.05, 1.45), (0.9, 1.3)) == "uncertain"   # the slow end leaves the range
    assert demo.LectureClaims.verdict(1.2, (1.05, 1.45), (1.1, 1.3)) == "agree"
    assert demo.LectureClaims.verdict(3.0, (1.05, 1.45), (2.5, 3.5)) == "disagree"
    spreads = {"a": (1.1, 1.3), "b": (2.9, 3.1)}
    assert demo.LectureClaims.verdict({"a": 1.2, "b": 3.0}, (1.05, 1.45), spreads) == "partly"


def test_claims_without_the_training_stage_are_not_measured_with_a_reason():
    rows = demo.LectureClaims.rows(None, None)
    assert all(r["verdict"] == "not_measured" and r["reason"] for r in rows)
    skipped = {"model": "m", "batch": 1, "runs": {"baseline": _run(1, 1, 1)},
               "skipped": {"mixed_precision": "does not fit the budget"}}
    row = demo.LectureClaims.rows(skipped, None)[0]
    assert row["verdict"] == "not_measured" and row["reason"] == "does not fit the budget"


def test_lecture_figure_panels(tmp_path):
    data = demo.run_lecture_comparison(profile=demo.QUICK)
    assert [r["verdict"] for r in data["claims"]][:6] == ["not_measured"] * 6  # no training stage given
    fig = demo.visualize_lecture_claims(tmp_path, data=data, dpi=50)
    assert_panels(fig, 5)
    assert (tmp_path / demo.FIGURE_FILES["lecture"]).exists()
    table = fig.axes[4].tables[0]
    cases = sum(len(r["cases"]) for r in data["claims"])  # one line per measured case (issue 20)
    assert cases >= len(demo.LectureClaims.TABLE) and len(table.get_celld()) == 6 * (cases + 1)
    text = demo.format_lecture_table(data)
    assert text.count("\n| ") >= len(demo.LectureClaims.TABLE) + 4


# --- TensorBoard -----------------------------------------------------------------------------------------

def test_tensorboard_missing_gives_a_clear_error(monkeypatch, capsys):
    monkeypatch.setattr(demo, "_has_tensorboard", lambda: False)
    with pytest.raises(demo.LabError, match="pip install tensorboard"):
        demo.write_tensorboard({"runs": {}}, "x")
    with pytest.raises(SystemExit) as info:
        demo.parse_args(["--tensorboard", "logs"])
    assert info.value.code == 2 and "pip install tensorboard" in capsys.readouterr().err


def test_tensorboard_logs_one_run_per_strategy(tmp_path):
    pytest.importorskip("tensorboard")
    data = demo.run_training_comparison(profile=demo.QUICK, strategies=["baseline", "gradient_checkpointing"],
                                        steps=30, time_budget_s=60)
    demo.write_tensorboard(data, tmp_path)
    for strategy in ("baseline", "gradient_checkpointing"):
        assert list((tmp_path / strategy).glob("events.out.tfevents.*"))
