"""benchmark_mixed_precision: quick mode, budget, honest records, errors."""

import pytest
import torch

from pytorch_practice_demo import benchmark_mixed_precision, dtype_ranges, mlp
from conftest import assert_unchanged, snapshot


def test_quick_mode_records_fp32_and_a_low_precision():
    model = mlp(256)
    before = snapshot(model)
    records = benchmark_mixed_precision(model, (16, 1024), time_budget_s=30)  # a bound, not a target
    by_precision = {r["precision"]: r for r in records}
    assert records[0]["precision"] == "fp32" and by_precision["fp32"]["speedup_vs_fp32"] == 1.0
    measured = [r for r in records if not r["skipped"]]
    assert len(measured) >= 2  # fp32 and at least one low precision
    for r in measured:
        assert r["median_s"] > 0 and r["iqr_s"] >= 0 and r["runs"] >= 1
        assert r["max_rel_error_vs_fp32"] >= 0
    low = [r for r in measured if r["precision"] != "fp32"][0]
    assert 0 < low["max_rel_error_vs_fp32"] < 0.1  # low precision differs, but not wildly
    hw = records[0]["hardware"]
    assert {"torch", "threads", "tf32_matmul", "avx512_bf16", "amx_bf16"} <= hw.keys()
    assert_unchanged(before, model)


def test_a_precision_predicted_too_slow_is_skipped_with_a_readable_reason(monkeypatch):
    import pytorch_practice_demo as demo
    monkeypatch.setattr(demo, "_matmul_slowdown", lambda device, precision: 1e6)  # a million times slower
    records = benchmark_mixed_precision(mlp(64), (8, 1024), time_budget_s=2)
    assert records[0]["precision"] == "fp32" and records[0]["median_s"] > 0 and records[0]["runs"] >= 3
    skipped = [r for r in records if r["skipped"]]
    assert skipped and all(r["skip_kind"] in ("budget", "unsupported") for r in skipped)
    assert any("1000000.0x slower than fp32" in r["skipped"] for r in skipped)


def test_every_measured_precision_has_memory_and_a_spread():
    records = benchmark_mixed_precision(mlp(64), (8, 1024), precisions=["amp_bf16"], time_budget_s=2)
    measured = [r for r in records if not r["skipped"]]
    assert measured and measured[0]["precision"] == "fp32"  # not vacuous: fp32 (a 64-wide MLP) always fits
    for r in measured:
        assert r["peak_memory_bytes"] > 0  # fp32 memory too, whenever fp32 timing ran
        assert r["spread_lo_s"] <= r["median_s"] <= r["spread_hi_s"] and r["runs"] >= 3


def test_fp32_that_cannot_fit_skips_the_model_with_its_reason(monkeypatch):
    import pytorch_practice_demo as demo

    class SlowClock:  # every read of the clock is a second later
        now = 0.0

        def __call__(self):
            self.now += 1.0
            return self.now
    monkeypatch.setattr(demo, "CLOCK", SlowClock())
    records = benchmark_mixed_precision(mlp(64), (8, 1024), time_budget_s=2)
    assert records[0]["skipped"] and "warm-up step took" in records[0]["skipped"]
    assert all(r["skipped"] for r in records[1:])
    assert all("no fp32 reference" in r["skipped"] or r["skip_kind"] == "unsupported" for r in records[1:])


def test_inference_mode_and_explicit_precisions():
    records = benchmark_mixed_precision(mlp(128), (4, 1024), precisions=["amp_bf16"], training=False,
                                        time_budget_s=2)
    assert [r["precision"] for r in records] == ["fp32", "amp_bf16"]


def test_bad_arguments():
    with pytest.raises(ValueError, match="fp16"):
        benchmark_mixed_precision(mlp(64), (2, 1024), precisions=["fp8"])
    with pytest.raises(ValueError, match="time_budget_s"):
        benchmark_mixed_precision(mlp(64), (2, 1024), time_budget_s=0)
    with pytest.raises(TypeError):
        benchmark_mixed_precision(object(), (2, 1024))
    with pytest.raises(ValueError, match="Sequential"):
        benchmark_mixed_precision(mlp(64), (2, 7), time_budget_s=1)


def test_fp16_underflow_that_loss_scaling_fixes():
    r = dtype_ranges()
    assert r["dtypes"]["fp16"]["value_after_cast"] == 0.0  # 1e-8 underflows in fp16
    assert r["dtypes"]["bf16"]["value_after_cast"] == pytest.approx(1e-8, rel=0.01)
    assert r["fp16_scaled"] == pytest.approx(1e-8 * 65536, rel=0.01)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_fp16_uses_grad_scaler():
    records = {r["precision"]: r for r in benchmark_mixed_precision(mlp(256).cuda(), (16, 1024), time_budget_s=5)}
    assert {"fp32", "amp_fp16"} <= set(records)
    assert all(r["peak_memory_bytes"] for r in records.values() if not r["skipped"])
    # fp16 trains through a GradScaler (its loss scale is recorded); fp32 and bf16 need none
    assert not records["amp_fp16"]["skipped"] and records["amp_fp16"]["loss_scale"] > 1
    assert records["fp32"]["loss_scale"] is None
