"""Figures a learner can trust at a glance (issue 20): on the Agg backend, every figure's panels,
no text under 8 pt at the saved size, legend colours that match the artists they name, slowdowns
drawn below 1×, "not measured" cells with their reason, and memory over one training step."""
import matplotlib.pyplot as plt
import pytest
from matplotlib.colors import to_rgba
from matplotlib.patches import Rectangle
from matplotlib.text import Text

import pytorch_practice_demo as demo
from conftest import same_title

MIN_POINTS = 8


def small_texts(fig):
    """Every visible, non-empty text of `fig` drawn smaller than MIN_POINTS (size at the saved dpi
    is the same in points: points scale with the dpi)."""
    fig.canvas.draw()
    return [(t.get_text(), t.get_fontsize()) for t in fig.findobj(Text)
            if t.get_visible() and t.get_text().strip() and t.get_fontsize() < MIN_POINTS]


def axes_titled(fig, title):
    return next(ax for ax in fig.axes if same_title(ax, title))


def legend_colour(ax, label):
    legend = ax.get_legend()
    handle = dict(zip([t.get_text() for t in legend.get_texts()], legend.legend_handles))[label]
    return to_rgba(handle.get_facecolor())


# --- the shared pieces ---------------------------------------------------------------------------

def test_reasons_are_said_in_the_figures_language():
    reason = ("a matmul probe predicts 50.5x slower than fp32; predicted 318 ms per step: a warm-up and 3 timed "
              "runs need ~2.5 s, more than its 2.2 s; this CPU has no native fp16 matmul (AMX-FP16): fp16 math "
              "is converted in software")
    demo.set_language("zh")
    said = demo._localized_reason(reason)
    assert "慢 50.5×" in said and "每步 318 ms" in said and "AMX-FP16" in said
    assert not any(word in said for word in ("probe", "slower", "budget", "software"))
    planned = ("planned skip: batch 8 predicted 266 ms per run; with a warm-up and 3 runs it did not fit the "
               "3.4 s left of the latency budget")
    assert demo._localized_reason(planned).startswith("计划跳过：batch 8 预测每次 266 ms")
    assert demo._localized_reason("something new; failed: boom") == "something new；出错：boom"  # unknown: as is
    demo.set_language("en")
    try:
        assert demo._localized_reason(reason) == reason  # English keeps the data's words
    finally:
        demo.set_language("auto")


def test_ratio_bars_grow_from_one_and_a_slowdown_goes_down():
    fig, ax = plt.subplots()
    bars = demo._ratio_bars(ax, [0, 1], [2.0, 0.25], ["red", "blue"])
    demo._ratio_axis(ax, [2.0, 0.25])
    up, down = bars.patches
    assert up.get_y() == 1 and up.get_y() + up.get_height() == 2.0
    assert down.get_y() + down.get_height() == 0.25  # from 1× down to 0.25×
    lo, hi = ax.get_ylim()
    assert lo == pytest.approx(1 / hi)  # centred on 1× on the log axis


# --- memory over one training step ----------------------------------------------------------------

@pytest.fixture(scope="module")
def timelines():
    model = demo.mlp(256)  # Linear(1024, 256) ... small: each step ~10 ms
    return {s: demo.memory_timeline(model, (8, 1024), strategy=s, micro_batches=4) for s in demo._PhaseLog.STRATEGIES}


def test_the_timeline_replays_the_step_and_keeps_its_peak(timelines):
    base = timelines["baseline"]
    assert len(base["index"]) <= 300 and base["peak_index"] in base["index"]  # thinning never drops the peak
    assert sum(base["at_peak"].values()) == base["peak_bytes"]
    assert [p for p, _ in base["phases"]][-3:] == ["forward", "backward", "optimizer"]
    # steady state: Adam's m and v (2 x the parameters) are alive from the step's start to its end
    params = base["parts"]["parameter_bytes"][-1]
    first = next(i for i, event in enumerate(base["index"]) if event >= base["phases"][0][1])
    adam = base["parts"]["optimizer_bytes"][first]
    assert adam == base["parts"]["optimizer_bytes"][-1]
    assert 2 * params <= adam < 2 * params + 1024  # m, v and one 4-byte step counter per parameter tensor
    # the same step's peak as measure_memory's tracker reads it (same events, same categories)
    measured = demo.measure_memory(demo.mlp(256), (8, 1024))
    assert base["peak_bytes"] == measured["tracked_total"]


def test_accumulation_repeats_forward_and_backward_and_holds_fewer_activations(timelines):
    base, acc = timelines["baseline"], timelines["gradient_accumulation"]
    phases = [p for p, _ in acc["phases"]]
    assert phases.count("forward") == 4 and phases.count("backward") == 4 and phases[-1] == "optimizer"
    most = max(acc["parts"]["activation_bytes"])
    assert 0 < most < max(base["parts"]["activation_bytes"])  # a micro-batch's activations, counted as such
    with pytest.raises(demo.LabError, match="divisible"):
        demo.memory_timeline(demo.mlp(256), (6, 1024), strategy="gradient_accumulation", micro_batches=4)


def test_timeline_figure(timelines):
    data = {"device": "cpu", "timeline": {"model": "MLP-256", "batch": 8, "micro_batches": 4, "runs": timelines}}
    fig = demo.plot_memory_timeline(data)
    assert len(fig.axes) == 3 and all(ax.get_title() for ax in fig.axes)
    assert all(ax.collections for ax in fig.axes)  # the stacked areas
    peaks = [t.get_text() for ax in fig.axes for t in ax.texts if "MiB" in t.get_text()]
    assert len(peaks) == 3  # each panel names its peak
    assert not small_texts(fig)
    legend = fig.axes[0].get_legend()
    named = dict(zip([t.get_text() for t in legend.get_texts()], legend.legend_handles))
    optimizer = named[demo._t("optimizer_bytes_part")].get_facecolor()
    assert to_rgba(optimizer) == to_rgba(demo.MEMORY_COLORS["optimizer_bytes"])


# --- the stage figures, from data shaped as the stages return it -----------------------------------

def amp_data():
    record = {"median_s": 0.01, "spread_lo_s": 0.009, "spread_hi_s": 0.011, "times_s": [0.009, 0.01, 0.011],
              "runs": 3, "peak_memory_bytes": 32 * 2 ** 20, "activation_bytes": 8 * 2 ** 20, "skipped": None,
              "skip_kind": None, "max_rel_error_vs_fp32": 0.0, "speedup_vs_fp32": 1.0, "predicted_speedup": None}
    bf16 = dict(record, precision="amp_bf16", median_s=0.02, times_s=[0.019, 0.02, 0.021], speedup_vs_fp32=0.5,
                max_rel_error_vs_fp32=4e-3, predicted_speedup=1.4)  # measured slower, the probe said faster
    fp16 = dict(record, precision="amp_fp16", median_s=None, times_s=[], speedup_vs_fp32=None, skip_kind="budget",
                skipped="a matmul probe predicts 50.0x slower than fp32; this CPU has no native fp16 matmul "
                        "(AMX-FP16): fp16 math is converted in software", predicted_speedup=0.02)
    hardware = {"torch": "2.x", "threads": 2, "tf32_matmul": False, "avx512_bf16": True, "amx_bf16": False}
    return {"device": "cpu (test)", "batch": 8, "hardware": hardware, "ranges": demo.dtype_ranges(),
            "models": {"MLP": [dict(record, precision="fp32"), bf16, fp16]}}


def test_amp_figure_draws_slowdowns_down_and_predictions_as_such():
    demo.set_language("zh")
    fig = demo.plot_amp_analysis(amp_data())
    assert len(fig.axes) == 6 and not small_texts(fig)
    ax = axes_titled(fig, demo._t("amp_speedup"))
    bars = [p for p in ax.patches if isinstance(p, Rectangle) and p.get_height() != 0]
    ends = sorted(p.get_y() + p.get_height() for p in bars)
    assert ends == pytest.approx([0.02, 0.5])  # both slowdowns end below 1×, from 1×
    assert all(p.get_y() == 1 for p in bars)
    texts = " ".join(t.get_text() for t in ax.texts)
    assert "预测" in texts and "未实测" in texts and "慢 50.0×" in texts  # the fp16 skip is said to be a prediction
    assert not any(p.get_label() == demo._t("lit_mark") for p in ax.patches)  # no GPU band on a CPU
    measured = next(p for p in bars if p.get_facecolor()[3] > 0)
    assert legend_colour(ax, "amp_bf16（实测）") == measured.get_facecolor()
    error = axes_titled(fig, demo._t("amp_error_linear"))
    assert error.get_yscale() == "linear"
    assert "amx_bf16 无" in fig._suptitle.get_text() and "慢 50.0×" in fig._supxlabel.get_text()


def dashboard_data():
    models = {}
    for i, (name, kind) in enumerate([("Small", "mlp"), ("Conv", "cnn"), ("GPT", "transformer")]):
        latency = [{"batch": 1, "median_s": 1e-3 * 10 ** i, "spread_lo_s": 0.9e-3 * 10 ** i,
                    "spread_hi_s": 1.1e-3 * 10 ** i, "skipped": None}]
        latency.append({"batch": 8, "skipped": "planned skip: batch 8 predicted 300 ms per run; with a warm-up "
                                               "and 3 runs it did not fit the 3.4 s left of the latency budget"}
                       if name == "GPT" else {"batch": 8, "median_s": 4e-3 * 10 ** i, "spread_lo_s": 3.9e-3 * 10 ** i,
                                              "spread_hi_s": 4.1e-3 * 10 ** i, "skipped": None})
        models[name] = {"kind": kind, "flops": 10 ** (6 + 2 * i), "parameters": 10 ** (5 + i), "latency": latency,
                        "training_memory_bytes": 2 ** (24 + 3 * i), "utilisation": 0.1 * (i + 1), "util_batch": 1}
    peak = {"flops_per_s": 1e11}
    data = {"device": "cpu", "latency_batches": [1, 8], "train_memory_batch": 32, "peak_flops": peak,
            "models": models}
    demo._add_utilisation(data, "cpu", 1.0)
    data["scores"], data["verdicts"] = demo.Scenarios.recommend(models), demo.Scenarios.verdicts(models)
    return data


def test_dashboard_shows_margins_reasons_and_one_batch_per_ranking():
    demo.set_language("zh")
    fig = demo.plot_dashboard(dashboard_data())
    assert len([ax for ax in fig.axes if ax.get_label() != "<colorbar>"]) == 6 and not small_texts(fig)
    ax = axes_titled(fig, demo._t("recommend"))
    cells = [t.get_text() for t in ax.texts]
    assert not any("★" in c for c in cells) and not any(c.strip() == "0.00" for c in cells)
    assert any(c.startswith("✓") and "余量" in c for c in cells)
    unmeasured = [c for c in cells if c.startswith(demo._t("not_measured"))]
    assert unmeasured, "GPT's batch-8 serving cell was not measured"
    for cell in unmeasured:  # each says which footnote gives its reason, and the footnote is there
        number = cell.split("(")[-1].rstrip(")")
        assert f"({number}) 计划跳过" in ax.get_xlabel()
    relation = axes_titled(fig, demo._t("relation"))
    assert any(t.get_text() == demo._t("not_measured_at", n=8) for t in relation.get_legend().get_texts())
    ranking = axes_titled(fig, demo._t("ranking"))
    assert all("batch" not in label.get_text() for label in ranking.get_yticklabels())  # one batch: batch 1


def test_every_figure_has_no_text_under_8_points_in_english_too(tmp_path):
    demo.set_language("en")
    try:
        assert not small_texts(demo.plot_amp_analysis(amp_data()))
        assert not small_texts(demo.plot_dashboard(dashboard_data()))
        fig = demo.plot_amp_analysis(amp_data())
        assert "no native fp16 matmul" in fig._supxlabel.get_text()  # English: the data's words
    finally:
        demo.set_language("auto")
