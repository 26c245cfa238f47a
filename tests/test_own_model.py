"""A learner's own model: never changed, inputs that follow it, devices and errors that say the real cause."""

import json
import re
import threading
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn

import pytorch_practice_demo as demo
from conftest import assert_panels

ROOT = Path(__file__).resolve().parents[1]


class Stateful(nn.Module):
    """A counter buffer bumped on every forward and an attention-style mask cached lazily as a plain
    attribute: the two things a copy-free measurement would change."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(16, 16)
        self.register_buffer("calls", torch.zeros((), dtype=torch.long))
        self.mask = None

    def forward(self, x):
        self.calls += 1
        if self.mask is None:
            self.mask = torch.ones(x.shape[-1], x.shape[-1]).tril()
        return self.fc(x) @ self.mask


def state(model):
    """What the tests compare: parameters, buffers, tensor attributes (and whether they are inference
    tensors), modes, requires_grad, grads, hooks."""
    tensors = {f"{n}.{k}": (v.clone(), v.is_inference()) for n, m in model.named_modules()
               for k, v in vars(m).items() if isinstance(v, torch.Tensor)}
    return {"state": {k: v.clone() for k, v in model.state_dict().items()}, "tensors": tensors,
            "attrs": [sorted(vars(m)) for m in model.modules()], "modes": [m.training for m in model.modules()],
            "requires_grad": [p.requires_grad for p in model.parameters()],
            "grads": [p.grad for p in model.parameters()],
            "hooks": [(len(m._forward_hooks), len(m._forward_pre_hooks)) for m in model.modules()]}


def assert_same(before, after):
    assert before["state"].keys() == after["state"].keys()
    for k in before["state"]:
        assert torch.equal(before["state"][k], after["state"][k]), k
    assert before["tensors"].keys() == after["tensors"].keys()
    for k, (value, inference) in before["tensors"].items():
        assert torch.equal(value, after["tensors"][k][0]) and inference == after["tensors"][k][1], k
    for key in ("attrs", "modes", "requires_grad", "hooks"):
        assert before[key] == after[key], key
    assert all(g is None for g in after["grads"])


PUBLIC_CALLS = {
    "analyze_model": lambda m, x: demo.FLOPCalculator().analyze_model(m, x),
    "estimate_memory": lambda m, x: demo.estimate_memory(m, x),
    "measure_memory": lambda m, x: demo.measure_memory(m, x),
    "benchmark_mixed_precision": lambda m, x: demo.benchmark_mixed_precision(m, x, precisions=["fp32"],
                                                                             time_budget_s=5),
    "measure_latency": lambda m, x: demo.measure_latency(m, x, time_budget_s=1),
}


@pytest.mark.parametrize("name", list(PUBLIC_CALLS))
def test_no_public_function_changes_the_model_even_when_it_fails(name):
    model = Stateful()
    model(torch.randn(2, 16))  # the mask now exists, made outside any inference mode
    before = state(model)
    PUBLIC_CALLS[name](model, (4, 16))
    assert_same(before, state(model))
    with pytest.raises(ValueError):
        PUBLIC_CALLS[name](model, (4, 7))  # the wrong width: fails inside the model
    assert_same(before, state(model))
    loss = model(torch.randn(3, 16)).sum()  # an ordinary training step still works afterwards
    loss.backward()


def test_a_lazily_cached_mask_is_created_on_the_copy_not_on_the_model():
    model = Stateful()
    demo.measure_latency(model, (4, 16), time_budget_s=1)
    assert model.mask is None and int(model.calls) == 0
    model(torch.randn(2, 16)).sum().backward()  # no "Inference tensors cannot be saved for backward"


# --- devices -------------------------------------------------------------------------------------

@pytest.mark.parametrize("device", ["mps", "cuda", "cuda:7", "tpu"])
def test_an_absent_device_is_a_value_error_naming_what_exists(device):
    if device == "mps" and torch.backends.mps.is_available():
        pytest.skip("MPS present")
    if device == "cuda" and torch.cuda.is_available():
        pytest.skip("CUDA present")
    for call in (lambda: demo.estimate_memory(nn.Linear(4, 4), (2, 4), device=device),
                 lambda: demo.measure_memory(nn.Linear(4, 4), (2, 4), device=device),
                 lambda: demo.measure_latency(nn.Linear(4, 4), (2, 4), device=device),
                 lambda: demo.benchmark_mixed_precision(nn.Linear(4, 4), (2, 4), device=device),
                 lambda: demo.run_training_comparison(device=device, steps=3, batch=4)):
        with pytest.raises(ValueError, match=r"available here: cpu"):
            call()


# --- inputs --------------------------------------------------------------------------------------

@pytest.mark.parametrize("dims, shown", [((32.0, 16), "32.0"), ((True, 16), "True"), ((0, 16), "0"),
                                         ((-2, 16), "-2")])
def test_dims_must_be_positive_integers(dims, shown):
    with pytest.raises(ValueError, match=re.escape(f"dims must be positive integers (got {shown})")):
        demo.FLOPCalculator().analyze_model(nn.Linear(16, 4), dims)


def test_numpy_integer_dims_are_dims():
    result = demo.FLOPCalculator().analyze_model(nn.Linear(16, 4), (np.int64(8), 16))
    assert result["macs"] == 8 * 16 * 4


def test_a_shape_gives_data_in_the_models_dtype():
    model = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4)).double()
    est = demo.estimate_memory(model, (8, 16))
    meas = demo.measure_memory(model, (8, 16))
    assert est["input_bytes"] == meas["input_bytes"] == 8 * 16 * 8  # float64 data, 8 bytes each
    assert demo.measure_latency(model, (8, 16), time_budget_s=1)["median_s"] > 0


def test_a_shape_gives_token_ids_to_a_model_that_starts_with_an_embedding():
    model = demo.TinyGPT(vocab_size=100, n_layer=1, n_embd=32, n_head=2, block_size=16)
    assert demo.measure_memory(model, (2, 16))["total"] > 0
    assert demo.measure_latency(model, (2, 16), time_budget_s=1)["median_s"] > 0
    assert demo.estimate_memory(model, (2, 16))["total"] > 0


# --- errors that name the real cause -------------------------------------------------------------

class Locked(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.lock = threading.Lock()

    def forward(self, x):
        return self.fc(x)


def test_a_model_that_cannot_be_copied_says_so():
    for call in PUBLIC_CALLS.values():
        with pytest.raises(ValueError, match="model cannot be copied") as info:
            call(Locked(), (2, 4))
        assert "inputs of shape" not in str(info.value)


def test_no_trainable_parameters_says_so():
    model = nn.Linear(4, 4).requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        demo.estimate_memory(model, (2, 4))
    assert demo.estimate_memory(model, (2, 4), training=False)["total"] > 0


class DataDependent(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 8)

    def forward(self, x):
        y = self.fc(x)
        return y * 2 if y.sum() > 0 else y  # branches on a value: fake tensors cannot tell


def test_data_dependent_control_flow_falls_back_to_a_measurement_and_says_so():
    result = demo.estimate_memory(DataDependent(), (4, 8))
    assert result["total"] > 0 and result["data_dependent"] and "measured" in result["method"]


def test_one_vocabulary_of_precision_names():
    with pytest.raises(ValueError, match="autocast is amp_bf16"):  # bf16 means pure bf16 weights
        demo.benchmark_mixed_precision(nn.Linear(4, 4), (2, 4), precisions=["bf16"])
    with pytest.raises(ValueError, match="amp_fp16"):
        demo.estimate_memory(nn.Linear(4, 4), (2, 4), precision="fp8")
    pure = demo.estimate_memory(nn.Linear(64, 64), (2, 64), precision="fp16")
    amp = demo.estimate_memory(nn.Linear(64, 64), (2, 64), precision="amp_fp16")
    assert pure["parameter_bytes"] == 64 * 64 * 2 + 64 * 2 and amp["parameter_bytes"] == 64 * 64 * 4 + 64 * 4


def test_autocast_on_a_float64_model_is_skipped_not_reported_as_a_speed_up():
    model = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4)).double()
    records = demo.benchmark_mixed_precision(model, (8, 16), time_budget_s=5)
    assert records[0]["model_dtype"] == "float64" and records[0]["median_s"] > 0
    assert all(r["skipped"] and "float32 ops only" in r["skipped"] for r in records[1:])


def test_a_string_where_a_list_is_wanted():
    with pytest.raises(ValueError, match="list"):
        demo.benchmark_mixed_precision(nn.Linear(4, 4), (2, 4), precisions="bf16")


# --- the README's Python blocks run as written ---------------------------------------------------

def readme_blocks():
    text = (ROOT / "README_实践代码.md").read_text(encoding="utf-8")
    return re.findall(r"```python\n(.*?)```", text, flags=re.S)


def test_every_python_block_of_the_readme_runs(tmp_path, monkeypatch):
    blocks = readme_blocks()
    assert len(blocks) >= 3
    monkeypatch.chdir(tmp_path)
    namespace = {}
    for block in blocks:  # in order, in one namespace, as a reader pastes them
        exec(compile(block, "README_实践代码.md", "exec"), namespace)


# --- --model and analyze() ------------------------------------------------------------------------

def test_analyze_gives_the_zoo_treatment_and_leaves_the_model_alone(tmp_path):
    model = Stateful()
    before = state(model)
    data = demo.analyze(model, (4, 16), profile=demo.QUICK)
    assert_same(before, state(model))
    assert [r["module"] for r in data["modules"]] == ["fc"] and data["modules"][0]["macs"] == 4 * 16 * 16
    assert data["memory_estimate"]["total"] > 0 and data["memory_measured"]["total"] > 0
    assert data["latency"]["median_s"] > 0 and data["amp"][0]["precision"] == "fp32"
    table = demo.format_model_table(data)
    assert "FLOPs" in table and "MACs" in table and "fc" in table
    fig = demo.visualize_own_model(None, None, tmp_path, data=data, dpi=40)
    assert_panels(fig, 6)
    assert (tmp_path / demo.FIGURE_FILES["model"]).exists()


def test_analyze_world_size_shards_your_model_per_rank_batch(tmp_path):
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))
    before = state(model)
    data = demo.analyze(model, (4, 16), profile=demo.QUICK, world_size=8)
    assert_same(before, state(model))
    two, eight = data["distributed"]
    assert (two["world_size"], eight["world_size"]) == (2, 8)
    assert "--quick" in two["measured_skipped"] and "not 8" in eight["measured_skipped"]  # quick: nothing spawned
    # each rank trains on (4, 16): its fsdp shard is 1/8 of every parameter (padded per parameter)
    fsdp = eight["estimated"]["fsdp"]
    assert fsdp["parameter_bytes"] == demo.fsdp_shard_bytes(model, 8)["parameter_bytes"]
    assert eight["estimated"]["ddp"]["parameter_bytes"] == 4 * (16 * 32 + 32 + 32 * 4 + 4)  # whole model, fp32
    assert_panels(demo.plot_own_model(data), 8)


def test_cli_model_from_a_file_writes_its_figure_and_table(tmp_path, capsys):
    source = tmp_path / "mine.py"
    source.write_text("import torch.nn as nn\n\ndef build():\n"
                      "    return nn.Sequential(nn.Embedding(50, 8), nn.Flatten(), nn.Linear(8 * 6, 3))\n")
    code = demo.main(["--model", f"{source}:build", "--input-shape", "2,6", "--quick", "--output-dir",
                      str(tmp_path / "out")])
    assert code == 0
    printed = capsys.readouterr().out
    assert "Embedding" in printed and "MACs" in printed  # token ids were made for the embedding
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert results["stages"]["model"]["modules"][2]["macs"] == 2 * 48 * 3
    assert (tmp_path / "out" / demo.FIGURE_FILES["model"]).exists()


@pytest.mark.parametrize("argv, message", [
    (["--model", "nowhere.py:build", "--input-shape", "2,4"], "no Python file"),
    (["--model", "torchvision:resnet9000", "--input-shape", "2,4"], "no model"),
    (["--model", "torchvision:resnet18"], "--input-shape"),
    (["--model", "torchvision:resnet18", "--input-shape", "2,3,32,32", "--world-size", "0"], "--world-size"),
    (["--world-size", "4"], "go with --model"),
])
def test_cli_model_errors_are_short(tmp_path, capsys, argv, message):
    try:
        code = demo.main(argv + ["--output-dir", str(tmp_path)])
    except SystemExit as exit_:
        code = exit_.code
    assert code == 2 and message in capsys.readouterr().err


def _scaled(x: torch.Tensor) -> torch.Tensor:
    return x * 2.0


with warnings.catch_warnings():  # torch.jit.script is deprecated; models in the wild still hold it
    warnings.simplefilter("ignore")
    _scaled = torch.jit.script(_scaled)


class HoldsScript(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.fn = _scaled

    def forward(self, x):
        return self.fn(self.fc(x))


def test_a_module_holding_a_scripted_function_can_be_analysed():
    result = demo.FLOPCalculator().analyze_model(HoldsScript(), (2, 4))
    assert result["macs"] == 2 * 4 * 4
    assert demo.estimate_memory(HoldsScript(), (2, 4))["total"] > 0
