"""Budgets, plans and peaks without the clock: a fake clock, fake calibrations, fake matmul times.

No test here asserts a wall time; every budget decision is driven by numbers the test chooses.
"""

import numpy as np
import pytest
import torch

import pytorch_practice_demo as demo
from conftest import same_title


class FakeClock:
    """A clock that moves only when told to (or by `tick` on every read)."""

    def __init__(self, tick=0.0):
        self.now, self.tick = 100.0, tick

    def __call__(self):
        self.now += self.tick
        return self.now


@pytest.fixture
def clock(monkeypatch):
    fake = FakeClock()
    monkeypatch.setattr(demo, "CLOCK", fake)
    return fake


def test_budget_counts_time_on_the_injected_clock(clock):
    budget = demo.Budget(10)
    clock.now += 4
    assert budget.elapsed() == 4 and budget.left() == 6
    assert budget.share(3) == 2 and budget.fits(6) and not budget.fits(6.01)
    clock.now += 20
    assert budget.left() == 0  # never negative
    for bad in (0, -1, True, "5"):
        with pytest.raises(ValueError, match="time_budget_s"):
            demo.Budget(bad)


def test_time_stats_iqr_from_four_runs_min_max_below():
    few = demo.time_stats([0.3, 0.1, 0.2])
    assert few["spread"] == "min-max" and (few["spread_lo_s"], few["spread_hi_s"]) == (0.1, 0.3)
    assert few["median_s"] == 0.2 and few["runs"] == 3
    many = demo.time_stats([1.0, 2.0, 3.0, 4.0, 100.0])  # one outlier: the IQR ignores it
    assert many["spread"] == "iqr" and (many["spread_lo_s"], many["spread_hi_s"]) == (2.0, 4.0)
    assert many["iqr_s"] == 2.0 and many["median_s"] == 3.0


# --- planning the training comparison from a calibration -------------------------------------

STRATEGIES = ("baseline", "mixed_precision", "gradient_accumulation", "gradient_checkpointing")


def fake_calibration(step_ms, slow_precision=1.0):
    """calibrate(batch, width, limit) whose step time is linear in batch and width (ms at 256 x 128)."""
    calls = []

    def calibrate(batch, width, limit_s=None):
        calls.append((batch, width))
        base = step_ms / 1e3 * (batch / 256) * (width / 128)
        factor = {"baseline": 1.0, "mixed_precision": slow_precision, "gradient_accumulation": 1.5,
                  "gradient_checkpointing": 1.3}
        return {"step_s": {s: base * factor[s] for s in STRATEGIES},
                "precision": {s: "amp_bf16" if s == "mixed_precision" else "fp32" for s in STRATEGIES},
                "eval_s": {"fp32": base, "amp_bf16": base * slow_precision}, "setup_s": 0.01, "wall_s": 0.1}
    return calibrate, calls


def plan(calibrate, budget_s, **kw):
    options = {"steps": 40, "batch": 256, "width": 128, "min_steps": 30, "accumulation": 4,
               "eval_every": lambda n: max(1, n // 10), **kw}
    return demo.TrainingPlan.plan(calibrate, budget_s, **options)


def test_plan_keeps_the_default_size_when_it_fits():
    calibrate, calls = fake_calibration(step_ms=10)
    p = plan(calibrate, 10)
    assert (p["steps"], p["batch"], p["width"]) == (40, 256, 128) and p["fits"] and not p["shrunk"]
    assert calls == [(256, 128)]
    # 4 strategies x (40 + 2 steps, 11 evals: step 0 and every 4th, set-up):
    # 42 * 0.01 * (1 + 1 + 1.5 + 1.3) + 4 * (11 * 0.01 + 0.01)
    assert p["predicted_s"] == pytest.approx(42 * 0.01 * 4.8 + 4 * 0.12)


def test_slow_machine_shrinks_steps_then_batch_then_width_and_says_so():
    calibrate, calls = fake_calibration(step_ms=100)  # 10x slower than above
    p = plan(calibrate, 10)
    assert p["steps"] == 30  # never below the profile's minimum
    assert p["batch"] < 256 and p["fits"] and not p["skipped"]
    assert p["shrunk"][0] == {"size": "steps", "from": 40, "to": 30}
    assert p["shrunk"][1]["size"] == "batch" and p["shrunk"][1]["from"] == 256
    assert p["predicted_s"] * demo.Budget.MARGIN <= 10 - p["calibration_s"]
    assert calls[0] == (256, 128) and len(calls) >= 2  # calibrated again at the new size

    calibrate, _ = fake_calibration(step_ms=3000)  # far too slow: batch at its floor, then width
    p = plan(calibrate, 10)
    assert p["batch"] == demo.TrainingPlan.MIN_BATCH and p["width"] < 128
    assert any(s["size"] == "width" and s["from"] == 128 for s in p["shrunk"])


def test_a_precision_too_slow_for_any_size_is_skipped_with_its_reason():
    # bf16 autocast 2000x slower than fp32 (a CPU without AVX512-BF16 would be 25-50x; exaggerated)
    calibrate, _ = fake_calibration(step_ms=20, slow_precision=2000)
    p = plan(calibrate, 10)
    assert list(p["skipped"]) == ["mixed_precision"] and "ms per step" in p["skipped"]["mixed_precision"]
    assert p["fits"] and p["steps"] == 30  # the others still run the same 30 steps


def test_the_baseline_is_never_the_strategy_dropped():
    calibrate, _ = fake_calibration(step_ms=20)

    def baseline_slowest(batch, width, limit_s=None):
        cal = calibrate(batch, width, limit_s)
        cal["step_s"]["baseline"] = 100.0  # noise at a tiny size can make it look the slowest
        return cal
    p = plan(baseline_slowest, 10)
    assert "baseline" not in p["skipped"] and p["skipped"]


def test_sizes_given_by_the_caller_are_kept_even_when_they_do_not_fit():
    calibrate, _ = fake_calibration(step_ms=100)
    p = plan(calibrate, 1, steps=200, batch=256, fixed={"steps", "batch", "width"})
    assert (p["steps"], p["batch"], p["width"]) == (200, 256, 128) and not p["shrunk"]
    assert p["fits"] is False and not p["skipped"]  # run as asked, and said not to fit


def test_training_runs_the_plan_to_the_end_with_equal_steps(monkeypatch):
    """Whatever the clock says, every strategy runs the planned steps: nothing is cut halfway."""
    monkeypatch.setattr(demo, "CLOCK", FakeClock(tick=0.5))  # half a second per clock read
    data = demo.run_training_comparison(steps=5, batch=32, width=32, time_budget_s=1)
    steps = {run["steps_done"] for run in data["runs"].values()}
    assert steps == {5} and not data["skipped"]
    assert data["plan"]["fits"] is False  # the fake clock made it look slow; the plan says so


# --- the latency plan ---------------------------------------------------------------------------

def test_latency_plan_measures_the_cheapest_large_batches_and_says_why_not_the_rest():
    calibration = {"tiny": {"build_s": 0.0, "batch1_s": 0.001}, "mid": {"build_s": 0.0, "batch1_s": 0.01},
                   "huge": {"build_s": 0.1, "batch1_s": 0.2}}
    plan = demo.plan_latency(calibration, budget_s=1.0)
    assert isinstance(plan["huge"], str) and "planned skip" in plan["huge"] and "1600 ms" in plan["huge"]
    assert plan["tiny"] == plan["mid"] >= demo.MIN_RUNS
    roomy = demo.plan_latency(calibration, budget_s=100.0)
    assert roomy == {"tiny": demo.MAX_RUNS, "mid": demo.MAX_RUNS, "huge": demo.MAX_RUNS}
    assert all(isinstance(v, str) for v in demo.plan_latency(calibration, budget_s=0.0).values())


def test_latency_stage_skips_a_model_predicted_not_to_fit(monkeypatch, clock):
    """With a clock that makes every forward look slow, the later, costlier models are not measured
    (said in each record), and nothing is drawn as a failure."""
    clock.tick = 0.05
    records = demo.run_flop_analysis(models=["MLP-512", "MLP-2048", "MNIST-CNN"])["records"]
    latency = demo._measure_latencies(records, torch.device("cpu"), budget_s=2.0)
    assert list(latency) == ["MLP-512", "MLP-2048", "MNIST-CNN"]
    first = latency["MLP-512"][0]
    assert first["skipped"] is None and first["runs"] == demo.MIN_RUNS
    skipped = [r for runs in latency.values() for r in runs if r["skipped"]]
    assert skipped and all("planned skip" in r["skipped"] for r in skipped)


def test_dashboard_draws_unmeasured_models_as_not_measured(monkeypatch, clock):
    clock.tick = 0.2  # every forward looks slow: only the first models fit the latency budget
    records = demo.run_flop_analysis(models=["MLP-512", "MNIST-CNN", "TinyGPT"])["records"]
    peak = {"flops_per_s": 1e15, "precision": "fp32", "matmul_size": 512, "method": "given"}
    data = demo.run_dashboard_analysis(flop_records=records, peak_flops=peak, time_budget_s=3)
    unmeasured = [n for n, m in data["models"].items() if m["utilisation"] is None]
    assert unmeasured, "the fake clock should leave a model unmeasured"
    for name in unmeasured:
        assert "planned skip" in data["models"][name]["utilisation_not_measured"]
        assert data["verdicts"]["edge"][name]["verdict"] in ("not_measured", "fail")
        assert data["verdicts"]["serving"][name]["verdict"] == "not_measured"  # not drawn as a failure
    fig = demo.plot_dashboard(data)
    texts = [t.get_text() for ax in fig.axes for t in ax.texts]
    assert any(t.startswith(demo._t("not_measured")) for t in texts)  # "not measured (n)", its reason below


# --- the peak and what may be compared with it ---------------------------------------------------

def fake_matmul(rates, clock=None):
    """_timed replacement: a square matmul of size n takes 2 n^3 / rates[n] seconds (on `clock`)."""
    def timed(device, fn, *args):
        n = args[0].shape[0]
        seconds = 2 * n ** 3 / rates[n]
        if clock is not None:
            clock.now += seconds
        return None, seconds
    return timed


def test_peak_sweep_keeps_the_best_rate_and_stops_when_it_stops_rising(monkeypatch):
    rates = {512: 10e9, 1024: 40e9, 2048: 41e9, 4096: 80e9, 8192: 90e9}
    monkeypatch.setattr(demo, "_timed", fake_matmul(rates))
    monkeypatch.setattr(demo.torch, "randn", lambda n, m, device=None: torch.empty(n, m, device="meta"))
    peak = demo.measure_peak_flops("cpu", time_budget_s=1e6)
    assert peak["flops_per_s"] == 41e9 and peak["matmul_size"] == 2048
    assert [s["size"] for s in peak["sweep"]] == [512, 1024, 2048]  # +2.5 % at 2048: stop
    assert "stopped rising" in peak["stopped"] and "2048" in peak["method"]


def test_peak_sweep_stops_before_a_size_that_would_not_fit(monkeypatch, clock):
    rates = {512: 1e9, 1024: 2e9, 2048: 4e9, 4096: 8e9, 8192: 16e9}
    monkeypatch.setattr(demo, "_timed", fake_matmul(rates, clock))
    monkeypatch.setattr(demo.torch, "randn", lambda n, m, device=None: torch.empty(n, m, device="meta"))
    # 512 and 1024 are always measured (0.27 s and 1.07 s a run): each size gets a 20 / 8 = 2.5 s share,
    # of which a warm-up and the first timed run leave 2.5 - 2 x 0.27 = 1.96 s for 512: 1.96 // (0.27 x 1.25
    # margin) = 5 more runs, 6 in all; 1024 has 0.36 s left: the 3 runs it gets at the least.  That is
    # 0.27 x 7 + 1.07 x 4 = 6.2 s of the 20; 2048 predicted 8 x 1.07 x 4 = 34 s does not fit the 13.8 s left
    peak = demo.measure_peak_flops("cpu", time_budget_s=20)
    assert [s["size"] for s in peak["sweep"]] == [512, 1024] and "does not fit" in peak["stopped"]
    assert [s["repeats"] for s in peak["sweep"]] == [6, 3]  # as many as the share buys, at least 3


def test_one_slow_small_matmul_does_not_end_the_sweep(monkeypatch, clock):
    # a busy machine with two threads: 512 stalls at 11 GFLOP/s, 1024 reaches 58
    rates = {512: 11e9, 1024: 58e9, 2048: 60e9, 4096: 60e9, 8192: 60e9}
    monkeypatch.setattr(demo, "_timed", fake_matmul(rates, clock))
    monkeypatch.setattr(demo.torch, "randn", lambda n, m, device=None: torch.empty(n, m, device="meta"))
    peak = demo.measure_peak_flops("cpu", time_budget_s=0.1)  # 1024 predicted from 512 would not fit
    assert peak["flops_per_s"] == pytest.approx(58e9) and peak["matmul_size"] == 1024


def test_utilisation_never_above_one():
    peak = {"flops_per_s": 100.0}
    assert demo.checked_utilisation(50.0, peak, lambda: pytest.fail("no re-measure needed"))[0] == 0.5
    remeasured = []

    def better():
        remeasured.append(1)
        return {"flops_per_s": 200.0}
    value, used, invalid = demo.checked_utilisation(150.0, peak, better)
    assert value == 0.75 and used["flops_per_s"] == 200.0 and used["remeasured"] and invalid is None
    value, used, invalid = demo.checked_utilisation(150.0, peak, lambda: {"flops_per_s": 90.0})
    assert value is None and "above the measured peak" in invalid and used["flops_per_s"] == 100.0
    assert remeasured == [1]


def test_ratio_words_are_not_garbled():
    assert demo._AmpTrainer.ratio_words(0.37) == "2.7x faster than fp32"
    assert demo._AmpTrainer.ratio_words(3.21) == "3.2x slower than fp32"
    assert demo._AmpTrainer.ratio_words(0.96).startswith("as fast as fp32")  # not "1.0x slower"


# --- conditions ----------------------------------------------------------------------------------

def test_conditions_record_the_load_at_start_and_end():
    start = demo.Load.now()
    cond = demo.Load.conditions(start)
    assert {"load_start", "load_end", "busy", "cores", "threads", "others_busy_cores"} <= cond.keys()
    assert cond["cores"] >= 1 and isinstance(cond["busy"], bool)
    assert "ticks" not in cond["load_start"]  # raw counters stay out of results.json


def test_busy_comes_from_what_other_processes_used(monkeypatch):
    ticks = iter([(0, 1000, 0), (900, 1000 + 1000, 100)])  # others: 800 busy ticks of 1000
    monkeypatch.setattr(demo.Load, "ticks", lambda: next(ticks))
    start = demo.Load.now()
    cond = demo.Load.conditions(start)
    cores = cond["cores"]
    assert cond["others_busy_cores"] == pytest.approx(0.8 * cores) and cond["busy"]
    ticks = iter([(0, 1000, 0), (1000, 2000, 0)])  # others used every core
    monkeypatch.setattr(demo.Load, "ticks", lambda: next(ticks))
    monkeypatch.setattr(demo.time, "sleep", lambda s: None)
    threads, sample = demo.Load.threads()
    assert threads == 1 and sample["free_cores"] == pytest.approx(0.0)


def test_optimizer_state_made_without_a_step_matches_a_real_first_step():
    for name in ("adam", "adamw", "sgd_momentum", "sgd"):
        model = demo.mlp(16, in_features=8)
        made = demo._make_optimizer(name, model.parameters())
        demo._create_optimizer_state(model, made)
        real = demo._make_optimizer(name, model.parameters())
        for p in model.parameters():
            p.grad = torch.zeros_like(p)
        real.step()
        for p in model.parameters():
            assert made.state[p].keys() == real.state[p].keys(), name
            for key, value in real.state[p].items():
                ours = made.state[p][key]
                assert (ours.shape, ours.dtype, ours.device) == (value.shape, value.dtype, value.device), key
                assert np.all(ours.numpy() == 0)


# --- what the figures draw for invalid, skipped and busy ------------------------------------------

def test_training_figure_draws_an_impossible_mfu_as_invalid_and_the_plan(monkeypatch):
    data = demo.run_training_comparison(strategies=["baseline", "gradient_accumulation"], steps=4, batch=32,
                                        width=32)
    data["runs"]["baseline"].update(mfu=None, mfu_invalid="achieved above the re-measured peak")
    data["conditions"] = {**data["conditions"], "busy": True, "others_busy_cores": 1.6}
    fig = demo.plot_training_performance(data)
    texts = [t.get_text() for ax in fig.axes for t in ax.texts]
    assert demo._t("mfu_invalid") in texts
    mfu_ax = next(ax for ax in fig.axes if same_title(ax, demo._t("mfu")))
    assert max(b.get_width() for b in mfu_ax.patches) <= 1.0  # no bar beyond 100 %
    title = fig._suptitle.get_text()
    assert "⚠" in title and str(data["plan"]["steps"]) in title


def test_amp_figure_says_why_each_bar_is_missing(monkeypatch):
    monkeypatch.setattr(demo, "_matmul_slowdown", lambda device, precision: 1e6)
    records = demo.benchmark_mixed_precision(demo.mlp(64), (8, 1024), time_budget_s=2)
    data = {"device": "cpu", "batch": 8, "hardware": records[0]["hardware"], "ranges": demo.dtype_ranges(),
            "models": {"MLP-64": [{k: v for k, v in r.items() if k not in ("outputs", "hardware")} for r in records]}}
    fig = demo.plot_amp_analysis(data)
    texts = [t.get_text() for ax in fig.axes for t in ax.texts]
    predicted = demo._t("skip_predicted", speed=demo._speed_words(1e-6))
    assert predicted in texts  # the probe's prediction at the bar's place ...
    assert demo._localized_reason(records[1]["skipped"]) in fig._supxlabel.get_text()  # ... the reason below


def test_a_first_use_warm_up_is_repeated_before_it_can_skip_a_precision(monkeypatch, clock):
    # CUDA pays kernel selection on a precision's first step (~1 s on an H200 for TinyGPT's AMP):
    # a warm-up far slower than the probe predicts is repeated, and the second one is judged
    steps = iter([0.010, 0.010, 0.010, 0.010, 0.010, 0.010, 0.010])  # fp32: warm-up, calibration, runs

    def fake_timed(device, fn, *args):
        seconds = next(steps, 0.010)
        clock.now += seconds
        return None, seconds
    monkeypatch.setattr(demo, "_timed", fake_timed)
    monkeypatch.setattr(demo, "_matmul_slowdown", lambda device, precision: 1.0)
    model, cpu = demo.mlp(64), torch.device("cpu")
    args, kwargs = (torch.randn(4, 1024),), {}
    fp32 = demo._AmpTrainer.benchmark_one(model, args, kwargs, "fp32", cpu, True, 5.0, None, 4)
    assert fp32["skipped"] is None
    steps = iter([1.0, 0.010])  # the first warm-up pays one-time costs, the second does not
    amp = demo._AmpTrainer.benchmark_one(model, args, kwargs, "amp_bf16", cpu, True, 2.0, fp32, 4)
    assert amp["skipped"] is None and amp["runs"] >= demo.MIN_RUNS
    steps = iter([1.0, 1.0])  # slow both times: really too slow for its share, said so
    slow = demo._AmpTrainer.benchmark_one(model, args, kwargs, "amp_bf16", cpu, True, 2.5, fp32, 4)
    assert slow["skipped"] and "warm-up step took 1000 ms" in slow["skipped"]
