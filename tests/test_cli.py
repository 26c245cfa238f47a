"""main(): the one-command run, its files, its faults and exit codes; figures on Agg."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import pytorch_practice_demo as demo

ROOT = Path(__file__).resolve().parents[1]


def test_quick_run_writes_figures_and_results(tmp_path):
    # a subprocess, as users run it: python pytorch_practice_demo.py --quick
    out = subprocess.run([sys.executable, str(ROOT / "pytorch_practice_demo.py"), "--quick", "--output-dir",
                          str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "Glyph" not in out.stderr and "Traceback" not in out.stderr
    for stage in demo.STAGES:
        assert (tmp_path / demo.FIGURE_FILES[stage]).stat().st_size > 10_000
    results = json.loads((tmp_path / "results.json").read_text())
    assert set(results["stages"]) == set(demo.STAGES)
    assert results["environment"]["torch"] and results["environment"]["seed"] == 0
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
    fig = demo.visualize_flop_analysis(None, quick=True)
    assert len(fig.axes) == 6


def test_english_labels():
    demo.set_language("en")
    try:
        assert demo._t("flop_title").startswith("FLOP analysis")
    finally:
        demo.set_language("auto")
    with pytest.raises(ValueError):
        demo.set_language("fr")
