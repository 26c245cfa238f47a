"""main(): the one-command run, its files, its faults and exit codes; figures on Agg."""

import json
import os
import subprocess
import sys
from pathlib import Path

import matplotlib.image
import pytest

import pytorch_practice_demo as demo
from conftest import assert_panels

ROOT = Path(__file__).resolve().parents[1]


def test_quick_run_writes_figures_and_results(tmp_path):
    # a subprocess, as users run it: python pytorch_practice_demo.py --quick
    out = subprocess.run([sys.executable, str(ROOT / "pytorch_practice_demo.py"), "--quick", "--output-dir",
                          str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "Glyph" not in out.stderr and "Traceback" not in out.stderr
    for stage in demo.STAGES:  # a whole picture, not a stub (the panels are checked in each figure's test)
        height, width, _ = matplotlib.image.imread(tmp_path / demo.FIGURE_FILES[stage]).shape
        assert height >= 600 and width >= 1000
    results = json.loads((tmp_path / "results.json").read_text())
    assert set(results["stages"]) == set(demo.STAGES)
    assert results["environment"]["torch"] and results["environment"]["seed"] == 0
    # measurements that hold on any machine: conditions recorded, nothing above 100 %, equal steps,
    # a reason for every skip (no wall time is asserted: the stages' budgets live in benchmarks/)
    for stage in demo.STAGES:
        timing = results["timing"][stage]
        assert {"load_start", "load_end", "busy", "budget_s", "wall_s", "threads", "within_budget"} <= timing.keys()
    runs = results["stages"]["training"]["runs"]
    assert len({r["steps_done"] for r in runs.values()}) == 1 and min(r["steps_done"] for r in runs.values()) >= 30
    assert all(r["mfu"] is None and r["mfu_invalid"] or 0 < r["mfu"] <= 1 for r in runs.values())
    for m in results["stages"]["dashboard"]["models"].values():
        assert m["utilisation"] is None or m["utilisation"] <= 1
        assert all(r["skipped"] is None or r["skipped"].strip() for r in m["latency"])
    for records in results["stages"]["amp"]["models"].values():
        assert all(r["median_s"] is not None or r["skipped"].strip() for r in records)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp-")]  # nothing half-written


def test_bad_option_exits_2(capsys):
    with pytest.raises(SystemExit) as info:
        demo.main(["--only", "flop,nonsense"])
    assert info.value.code == 2
    assert "--only" in capsys.readouterr().err


@pytest.mark.skipif(os.geteuid() == 0, reason="root can write anywhere")
def test_unwritable_output_dir_exits_2(tmp_path, capsys):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    assert demo.main(["--only", "flop", "--output-dir", str(locked / "sub")]) == 2
    assert "not writable" in capsys.readouterr().err


def test_output_path_that_is_a_file_exits_2(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert demo.main(["--only", "flop", "--output-dir", str(blocker / "sub")]) == 2
    assert "not writable" in capsys.readouterr().err


def test_missing_device_exits_2(capsys):
    if demo.torch.cuda.is_available():
        pytest.skip("CUDA present")
    assert demo.main(["--device", "cuda", "--only", "flop"]) == 2
    assert "cuda" in capsys.readouterr().err


def test_failing_demo_does_not_stop_the_others(tmp_path, monkeypatch):
    def boom(**kwargs):
        raise RuntimeError("simulated failure")
    monkeypatch.setattr(demo, "run_memory_analysis", boom)
    code = demo.main(["--only", "flop,memory", "--quick", "--output-dir", str(tmp_path)])
    assert code == 1
    assert (tmp_path / demo.FIGURE_FILES["flop"]).exists()
    assert not (tmp_path / demo.FIGURE_FILES["memory"]).exists()
    results = json.loads((tmp_path / "results.json").read_text())
    assert "simulated failure" in results["stages"]["memory"]["error"]


def test_save_is_atomic_when_drawing_fails(tmp_path):
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots()
    ax.text(0.5, 0.5, "$\\undefinedcommand$")  # mathtext error while saving
    with pytest.raises(ValueError):
        demo.save_figure(fig, tmp_path / "x.png")
    assert list(tmp_path.iterdir()) == []


def test_flop_figure_alone_returns_a_figure():
    fig = demo.visualize_flop_analysis(None, profile=demo.QUICK)
    assert_panels(fig, 6)


def test_english_labels():
    demo.set_language("en")
    try:
        assert demo._t("flop_title").startswith("FLOP analysis")
    finally:
        demo.set_language("auto")
    with pytest.raises(ValueError):
        demo.set_language("fr")


def test_mnist_without_data_dir_or_files_exits_2(tmp_path, capsys):
    with pytest.raises(SystemExit) as info:
        demo.main(["--only", "training", "--dataset", "mnist", "--output-dir", str(tmp_path)])
    assert info.value.code == 2 and "--data-dir" in capsys.readouterr().err
    code = demo.main(["--only", "training", "--dataset", "mnist", "--data-dir", str(tmp_path / "none"),
                      "--output-dir", str(tmp_path / "out")])
    assert code == 2 and "train-images-idx3-ubyte" in capsys.readouterr().err
    assert not (tmp_path / "out" / "results.json").exists()


def test_ctrl_c_leaves_no_partial_png(tmp_path, monkeypatch):
    def interrupted(fig, path, dpi=120):  # Ctrl-C arrives while the PNG is being written
        def write(f):
            f.write(b"\x89PNG half")
            raise KeyboardInterrupt
        return demo._atomic_write(path, write)
    monkeypatch.setattr(demo, "save_figure", interrupted)
    assert demo.main(["--only", "flop", "--quick", "--output-dir", str(tmp_path)]) == 130
    # no PNG, no temp file; the figures are drawn once every stage has measured, so its numbers are kept
    assert [f.name for f in tmp_path.iterdir()] == ["results.json"]
    assert json.loads((tmp_path / "results.json").read_text())["interrupted"] == "drawing"


def test_dashboard_reuses_flop_counts_and_the_training_peak(monkeypatch):
    records = demo.run_flop_analysis(models=["MLP-512", "MNIST-CNN"])["records"]
    # a peak no CPU reaches: an achieved rate above the given peak would (rightly) re-measure it
    peak = {"flops_per_s": 1e15, "precision": "fp32", "matmul_size": 512, "method": "given"}
    monkeypatch.setattr(demo, "run_flop_analysis", lambda **kw: pytest.fail("FLOPs counted again"))
    monkeypatch.setattr(demo, "measure_peak_flops", lambda *a, **kw: pytest.fail("peak measured again"))
    memory = demo.zoo_training_memory(["MLP-512", "MNIST-CNN"])
    monkeypatch.setattr(demo, "zoo_training_memory", lambda *a, **kw: pytest.fail("memory estimated again"))
    data = demo.run_dashboard_analysis(flop_records=records, peak_flops=peak, time_budget_s=1, training_memory=memory)
    assert list(data["models"]) == ["MLP-512", "MNIST-CNN"] and data["peak_flops"] is peak
    for name, m in data["models"].items():
        assert m["training_memory_bytes"] == memory[name] > 0
        assert [r["batch"] for r in m["latency"]] == list(demo.LATENCY_BATCHES)
        assert m["latency"][0]["median_s"] > 0
    fig = demo.create_comprehensive_dashboard(None, data=data)
    assert_panels(fig, 6)


def test_work_beside_the_counting_stages_gives_the_same_numbers_and_leaves_nothing():
    import multiprocessing
    work = demo._Beside(demo.count_zoo, ["MLP-512", "MNIST-CNN"])
    try:
        beside = work.result()
    finally:
        demo.stop_rank_server()
    assert beside == json.loads(json.dumps(demo.count_zoo(["MLP-512", "MNIST-CNN"])))  # through its JSON
    assert multiprocessing.active_children() == []


def test_recommendation_rule():
    def model(params, flops, lat1, lat8, mem):
        return {"parameters": params, "flops": flops, "training_memory_bytes": mem,
                "latency": [{"batch": 1, "median_s": lat1}, {"batch": 8, "median_s": lat8}]}
    gib = 2 ** 30
    scores = demo.Scenarios.recommend({
        "small": model(1e6, 1e8, 0.001, 0.004, 0.1 * gib),
        "mid": model(5e6, 1e9, 0.010, 0.040, 1 * gib),
        "big": model(50e6, 1e10, 0.100, 0.400, 9 * gib),   # too many params, too slow, too big for 8 GiB
    })
    assert scores["edge"] == {"small": 0.0, "mid": 1.0, "big": None}
    assert scores["serving"] == {"small": 0.0, "mid": 1.0, "big": None}  # big: 8 / 0.4 s = 20 samples/s < 100
    assert scores["training"]["big"] is None and scores["training"]["mid"] == 1.0


def test_measure_latency_leaves_the_model_as_it_was():
    from test_flops import assert_unchanged, snapshot
    model = demo.mlp(64)
    model[0].train(False)  # a mixed-mode model: each module's mode must come back
    before = snapshot(model)
    result = demo.measure_latency(model, (4, 1024), time_budget_s=0.2)
    assert result["runs"] >= 1 and result["samples_per_s"] > 0
    assert_unchanged(before, model)
    assert model.training and not model[0].training
    with pytest.raises(ValueError, match="time_budget_s"):
        demo.measure_latency(model, (4, 1024), time_budget_s=0)
    with pytest.raises(ValueError, match="Sequential"):
        demo.measure_latency(model, (4, 7))



def test_only_updates_its_stage_inside_the_existing_results(tmp_path, monkeypatch):
    fast = {"flop": lambda **kw: [{"name": "stub"}], "memory": lambda **kw: {"stub": True}}
    monkeypatch.setattr(demo, "run_flop_analysis", fast["flop"])
    monkeypatch.setattr(demo, "run_memory_analysis", fast["memory"])
    monkeypatch.setattr(demo, "visualize_flop_analysis", lambda *a, **kw: None)
    monkeypatch.setattr(demo, "visualize_memory_analysis", lambda *a, **kw: None)
    assert demo.main(["--only", "flop,memory", "--quick", "--output-dir", str(tmp_path)]) == 0
    first = json.loads((tmp_path / "results.json").read_text())
    assert demo.main(["--only", "flop", "--quick", "--output-dir", str(tmp_path), "--seed", "3"]) == 0
    second = json.loads((tmp_path / "results.json").read_text())
    assert set(second["stages"]) == {"flop", "memory"}  # memory's numbers stay beside its PNG
    assert second["stages"]["memory"] == first["stages"]["memory"]
    assert second["runs"]["flop"]["options"]["seed"] == 3 and second["runs"]["memory"]["options"]["seed"] == 0
    assert second["runs"]["flop"]["finished_at"] >= first["runs"]["flop"]["finished_at"]


def test_ctrl_c_keeps_the_numbers_of_the_stages_that_finished(tmp_path, monkeypatch):
    monkeypatch.setattr(demo, "run_flop_analysis", lambda **kw: [{"name": "stub"}])
    monkeypatch.setattr(demo, "visualize_flop_analysis", lambda *a, **kw: None)

    def interrupted(**kw):
        raise KeyboardInterrupt
    monkeypatch.setattr(demo, "run_memory_analysis", interrupted)
    # --quick: nothing beside the stages (the default profile counts the zoo beside memory, run first)
    assert demo.main(["--only", "flop,memory", "--quick", "--output-dir", str(tmp_path)]) == 130
    results = json.loads((tmp_path / "results.json").read_text())
    assert set(results["stages"]) == {"flop"} and results["interrupted"] == "memory"


def test_an_option_without_effect_is_warned_about(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(demo, "run_flop_analysis", lambda **kw: [{"name": "stub"}])
    monkeypatch.setattr(demo, "visualize_flop_analysis", lambda *a, **kw: None)
    assert demo.main(["--only", "flop", "--data-dir", str(tmp_path), "--output-dir", str(tmp_path)]) == 0
    assert "--data-dir has no effect" in capsys.readouterr().err
