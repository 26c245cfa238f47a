"""estimate_memory / measure_memory: known byte counts, estimate vs measurement, errors."""

import pytest
import torch
import torch.nn as nn

from pytorch_practice_demo import MnistNet, TinyGPT, estimate_memory, measure_memory, mlp
from conftest import assert_unchanged, bn_model, snapshot


def small_gpt():
    return TinyGPT(vocab_size=512, n_layer=2, n_embd=128, n_head=4, block_size=64)


MODELS = {
    "mlp": (lambda: mlp(512), lambda b: (b, 1024)),
    "cnn": (MnistNet, lambda b: (b, 1, 28, 28)),
    "transformer": (small_gpt, lambda b: torch.zeros(b, 64, dtype=torch.long)),
}


@pytest.mark.parametrize("checkpointing", [False, True])
@pytest.mark.parametrize("optimizer", ["adam", "sgd"])
@pytest.mark.parametrize("batch", [8, 64])
@pytest.mark.parametrize("name", MODELS)
def test_estimate_within_10_percent_of_measurement(name, batch, optimizer, checkpointing):
    # NB: on CPU both sides follow tensor storages, so they agree closely; the 10% tolerance is
    # the goal and covers kernels whose fake implementation allocates differently.
    torch.manual_seed(0)
    make, inputs = MODELS[name]
    model = make()
    est = estimate_memory(model, inputs(batch), optimizer=optimizer, checkpointing=checkpointing)
    meas = measure_memory(model, inputs(batch), optimizer=optimizer, checkpointing=checkpointing)
    assert abs(est["total"] - meas["total"]) / meas["total"] <= 0.10
    assert est.keys() == meas.keys()


def test_known_byte_counts_for_adam():
    model = mlp(512)
    n = sum(p.numel() for p in model.parameters())  # 658_698
    r = measure_memory(model, (8, 1024), optimizer="adam")
    assert r["parameter_bytes"] == 4 * n and r["gradient_bytes"] == 4 * n
    assert r["optimizer_bytes"] >= 8 * n  # exp_avg + exp_avg_sq (+ a 4-byte step counter per tensor)
    assert r["input_bytes"] == 8 * 1024 * 4
    # activations saved for backward: the two ReLU outputs and the logits, 8 * (512+256+10) * 4 bytes
    assert r["activation_bytes"] == 8 * (512 + 256 + 10) * 4
    # the peak is during Adam's step and holds temporaries on top of params + grads + state
    assert r["peak_phase"] == "optimizer" and r["temporary_bytes"] > 0
    formula = r["formula"]
    assert r["total"] > formula["parameter_bytes"] + formula["gradient_bytes"] + formula["optimizer_bytes"]
    assert r["formula"]["optimizer_bytes"] == 2 * 4 * n


def test_sgd_has_no_state_and_momentum_has_one():
    model = mlp(256)
    n = sum(p.numel() for p in model.parameters())
    assert estimate_memory(model, (4, 1024), optimizer="sgd")["optimizer_bytes"] == 0
    assert estimate_memory(model, (4, 1024), optimizer="sgd_momentum")["optimizer_bytes"] == 4 * n


def test_checkpointing_cuts_transformer_activations():
    model = small_gpt()
    x = torch.zeros(16, 64, dtype=torch.long)
    plain = estimate_memory(model, x)
    ckpt = estimate_memory(model, x, checkpointing=True)
    assert ckpt["checkpointed_blocks"] == 2
    assert ckpt["activation_bytes"] < plain["activation_bytes"]
    assert ckpt["total"] < plain["total"]


def test_inference_is_smaller_than_training():
    model = small_gpt()
    x = torch.zeros(8, 64, dtype=torch.long)
    inference = estimate_memory(model, x, training=False)
    assert inference["gradient_bytes"] == inference["optimizer_bytes"] == 0
    assert inference["total"] < estimate_memory(model, x)["total"]
    assert inference["total"] == measure_memory(model, x, training=False)["total"]


def test_precisions():
    model = mlp(512)
    n = sum(p.numel() for p in model.parameters())
    fp32 = estimate_memory(model, (16, 1024))
    amp = estimate_memory(model, (16, 1024), precision="amp_bf16")
    pure = estimate_memory(model, (16, 1024), precision="bf16")
    assert amp["parameter_bytes"] == fp32["parameter_bytes"] == 4 * n  # autocast keeps fp32 weights
    assert pure["parameter_bytes"] == 2 * n and pure["total"] < fp32["total"]


def test_meta_model_estimate_but_no_measure():
    with torch.device("meta"):
        model = TinyGPT(vocab_size=1000, n_layer=2, n_embd=256, n_head=4, block_size=128)
    x = torch.zeros(2, 128, dtype=torch.long)
    assert estimate_memory(model, x)["total"] > 0
    with pytest.raises(ValueError, match="meta"):
        measure_memory(model, x)


@pytest.mark.parametrize("fn", [estimate_memory, measure_memory])
def test_model_untouched(fn):
    model = bn_model()
    before = snapshot(model)
    fn(model, (2, 3, 8, 8), checkpointing=True)
    assert_unchanged(before, model)
    with pytest.raises(ValueError):
        fn(model, (2, 3, 9, 9))
    assert_unchanged(before, model)


def test_bad_options(capfd):
    with pytest.raises(ValueError, match="adamw"):
        estimate_memory(mlp(64), (2, 1024), optimizer="lion")
    with pytest.raises(ValueError, match="amp_bf16"):
        measure_memory(mlp(64), (2, 1024), precision="fp8")
    with pytest.raises(TypeError):
        estimate_memory("model", (2, 1024))
    with pytest.raises(ValueError, match="Sequential"):
        estimate_memory(mlp(64), (2, 100))
    assert "Traceback" not in "".join(capfd.readouterr())


def test_no_trainable_output_is_a_clear_error():
    model = nn.Linear(4, 4).requires_grad_(False)
    with pytest.raises(ValueError, match="nothing to train"):
        estimate_memory(model, (2, 4))
