"""FLOPCalculator: known arithmetic, cross-checks against FlopCounterMode and torchvision docs."""


import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision
from torch.utils.flop_counter import FlopCounterMode

from conftest import assert_unchanged, bn_model, snapshot
from pytorch_practice_demo import FLOPCalculator, MnistNet, TinyGPT, LSTMClassifier

calc = FLOPCalculator()


def seed_mlp():
    return nn.Sequential(nn.Linear(1024, 512), nn.ReLU(), nn.Linear(512, 256), nn.ReLU(),
                         nn.Linear(256, 10))


def fcm_flops(model, *args):
    with FlopCounterMode(display=False) as counter:
        model(*args)
    return counter.get_total_flops()


def test_seed_example():
    r = calc.analyze_model(seed_mlp(), (32, 1024))
    assert r["flops"] == 42_106_880  # 2 * 32 * (1024*512 + 512*256 + 256*10)
    assert r["macs"] == 21_053_440
    assert r["parameters"] == 658_698  # 1024*512+512 + 512*256+256 + 256*10+10
    assert r["flops_readable"] == "42.11 MFLOPs"
    assert r["parameters_readable"] == "658.70 K"
    assert r["unsupported_ops"] == {}
    assert r["mode"] == "meta"
    assert r["by_module"] == {"0": 2 * 32 * 1024 * 512, "2": 2 * 32 * 512 * 256, "4": 2 * 32 * 256 * 10}


def test_training_flops_follow_the_backward_that_runs():
    r = calc.analyze_model(seed_mlp(), (32, 1024))
    # backward: grad_weight for all 3 layers, grad_input for layers 2 and 3 only
    # (the model's input needs no gradient): 2 * 21_053_440 - 32*1024*512
    backward_macs = 2 * 21_053_440 - 32 * 1024 * 512
    assert r["training_flops"] == 2 * (21_053_440 + backward_macs)
    assert r["training_flops"] < 3 * r["flops"]


def test_shared_weight_counts_once():
    model = nn.Sequential(nn.Linear(64, 64, bias=False), nn.Linear(64, 64, bias=False))
    model[1].weight = model[0].weight
    r = calc.analyze_model(model, (2, 64))
    assert r["parameters"] == 64 * 64
    assert r["flops"] == 2 * 2 * 2 * 64 * 64  # the weight is still used twice


@pytest.mark.parametrize("make, shape", [
    (seed_mlp, (8, 1024)),
    (MnistNet, (4, 1, 28, 28)),
    (lambda: torchvision.models.resnet18(weights=None), (2, 3, 64, 64)),
    (lambda: nn.ConvTranspose2d(8, 4, 3, stride=2, groups=2), (2, 8, 9, 9)),
    (lambda: nn.Sequential(nn.Conv1d(6, 12, 5, groups=3, dilation=2), nn.Flatten(), nn.Linear(12 * 22, 3)),
     (3, 6, 30)),
])
def test_matches_flop_counter_mode(make, shape):
    torch.manual_seed(0)
    model = make()
    assert calc.analyze_model(model, shape)["flops"] == fcm_flops(model, torch.randn(shape))


def test_einsum_and_matmul_counted():
    class TwoMatmuls(nn.Module):
        def __init__(self):
            super().__init__()
            self.w1 = nn.Parameter(torch.randn(16, 32))
            self.w2 = nn.Parameter(torch.randn(32, 16))

        def forward(self, x):
            return torch.einsum("bij,jk->bik", x @ self.w1, self.w2)

    model = TwoMatmuls()
    x = torch.randn(4, 8, 16)
    r = calc.analyze_model(model, x)
    # (4,8,16)@(16,32): 4*8*16*32 MACs; einsum (4,8,32)x(32,16): 4*8*32*16 MACs
    assert r["flops"] == fcm_flops(model, x) == 2 * 2 * (4 * 8 * 16 * 32)


@pytest.mark.parametrize("name, gmacs", [
    ("resnet18", 1.81), ("resnet50", 4.09), ("mobilenet_v2", 0.30), ("vit_b_16", 17.56),
])
def test_torchvision_published_gflops(name, gmacs):
    # torchvision's model docs list multiply-adds (per image at 224x224) under "GFLOPS".
    with torch.device("meta"):
        model = getattr(torchvision.models, name)(weights=None)
    r = calc.analyze_model(model, (1, 3, 224, 224))
    assert r["macs"] / 1e9 == pytest.approx(gmacs, abs=0.006)
    assert r["flops"] == 2 * r["macs"]


# --- what FlopCounterMode misses on CPU: checked against hand arithmetic --------------------

class SDPA(nn.Module):
    def forward(self, q, k, v):
        return F.scaled_dot_product_attention(q, k, v)


@pytest.mark.parametrize("mode", ["meta", "real"])
def test_cpu_sdpa_counted(mode):
    q = torch.randn(2, 4, 16, 8)  # (B, H, L, E)
    r = calc.analyze_model(SDPA(), (q, q.clone(), q.clone()), mode=mode)
    # scores (B*H*L*S*E) + weighted values (B*H*L*S*E), 2 FLOPs per multiply-add
    assert r["flops"] == 2 * 2 * (2 * 4 * 16 * 16 * 8)
    if mode == "real":
        # torch <= 2.14's FlopCounterMode counts CPU flash attention as 0 (the gap this counter
        # fills); torch 2.15 added a formula for it, and then the two must agree.
        assert fcm_flops(SDPA(), q, q, q) in (0, r["flops"])


@pytest.mark.parametrize("mode", ["meta", "real"])
def test_lstm_counted(mode):
    lstm = nn.LSTM(32, 64, batch_first=True)
    r = calc.analyze_model(lstm, (4, 10, 32), mode=mode)
    # T*B*(4H*I + 4H*H) multiply-adds = 10*4*(256*32 + 256*64)
    assert r["macs"] == 10 * 4 * (256 * 32 + 256 * 64)
    if mode == "real":
        assert fcm_flops(lstm, torch.randn(4, 10, 32)) in (0, r["flops"])  # 0: the CPU oneDNN LSTM
        assert r["training_flops"] > r["flops"]


@pytest.mark.parametrize("mode", ["meta", "real"])
def test_multihead_attention_eval_fast_path(mode):
    mha = nn.MultiheadAttention(32, 4, batch_first=True).eval()
    x = torch.randn(2, 10, 32)
    r = calc.analyze_model(mha, (x, x, x), mode=mode)
    # q, k, v and out projections 4*B*L*E*E, attention 2*B*L*S*E
    assert r["macs"] == 4 * 2 * 10 * 32 * 32 + 2 * 2 * 10 * 10 * 32
    if mode == "real":
        assert "_native_multi_head_attention" in r["by_operator"]


def test_gru_and_transformer_encoder_fast_path_real_equals_meta():
    gru = nn.GRU(16, 32, num_layers=2)
    assert (calc.analyze_model(gru, (7, 3, 16), mode="real")["macs"]
            == calc.analyze_model(gru, (7, 3, 16))["macs"]
            == 7 * 3 * (96 * 16 + 96 * 32 + 96 * 32 + 96 * 32))
    enc = nn.TransformerEncoderLayer(32, 4, 64, batch_first=True).eval()
    real = calc.analyze_model(enc, (2, 10, 32), mode="real")
    assert "_transformer_encoder_layer_fwd" in real["by_operator"]
    assert real["macs"] == calc.analyze_model(enc, (2, 10, 32))["macs"]


def test_zoo_models_have_no_unsupported_ops():
    for model, inputs in [(TinyGPT(), torch.zeros(2, 64, dtype=torch.long)),
                          (LSTMClassifier(), torch.zeros(2, 32, dtype=torch.long)),
                          (MnistNet(), (2, 1, 28, 28))]:
        r = calc.analyze_model(model, inputs)
        assert r["unsupported_ops"] == {}, type(model).__name__
        assert r["flops"] > 0 and r["other_flops"] > 0


def test_gpt_attention_counted_by_hand():
    gpt = TinyGPT(vocab_size=100, n_layer=1, n_embd=32, n_head=4, block_size=16)
    r = calc.analyze_model(gpt, torch.zeros(2, 16, dtype=torch.long))
    b, t, c, v = 2, 16, 32, 100
    # per layer: qkv 3C^2, proj C^2, MLP 8C^2 per token; attention 2*T*C per token; lm head C*V
    macs = b * t * (12 * c * c + 2 * t * c) + b * t * c * v
    assert r["macs"] == macs


# --- unsupported ops are reported, never a silent zero --------------------------------------

def test_unsupported_op_is_reported():
    class Odd(nn.Module):
        def forward(self, x):
            return torch.cumsum(x, 0)

    r = calc.analyze_model(Odd(), (4, 4))
    assert r["unsupported_ops"].get("cumsum", 0) >= 1


# --- the user's model is never changed -------------------------------------------------------

@pytest.mark.parametrize("mode", ["meta", "real"])
def test_model_untouched(mode):
    model = bn_model()
    before = snapshot(model)
    calc.analyze_model(model, (2, 3, 8, 8), mode=mode)
    assert_unchanged(before, model)
    assert model[1].num_batches_tracked.item() == 0


def test_model_untouched_when_forward_raises():
    model = bn_model()
    before = snapshot(model)
    with pytest.raises(ValueError):
        calc.analyze_model(model, (2, 3, 9, 9))
    assert_unchanged(before, model)


# --- bad input: clear, short errors ------------------------------------------------------

def test_not_a_module():
    with pytest.raises(TypeError, match="nn.Module"):
        calc.analyze_model(lambda x: x, (2, 3))


def test_shape_mismatch_is_a_clear_value_error(capfd):
    with pytest.raises(ValueError) as info:
        calc.analyze_model(seed_mlp(), (32, 100))
    message = str(info.value)
    assert "Sequential" in message and "(32, 100)" in message and "1024" in message
    assert info.value.__cause__ is None and info.value.__suppress_context__
    out, err = capfd.readouterr()
    assert "Traceback" not in out + err


@pytest.mark.parametrize("shape", [(0, 1024), (32, -1)])
def test_non_positive_dimensions(shape):
    with pytest.raises(ValueError, match="positive"):
        calc.analyze_model(seed_mlp(), shape)


def test_bad_inputs_type():
    with pytest.raises(TypeError, match="shape tuple"):
        calc.analyze_model(seed_mlp(), "32x1024")
    with pytest.raises(ValueError, match="mode"):
        calc.analyze_model(seed_mlp(), (2, 1024), mode="fast")


# --- other input forms, fallbacks, meta models ------------------------------------------

def test_dict_inputs_and_list_inputs():
    class Two(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(8, 4), nn.Linear(6, 4)

        def forward(self, x, y):
            return self.a(x) + self.b(y)

    model = Two()
    by_kw = calc.analyze_model(model, {"x": torch.randn(3, 8), "y": torch.randn(3, 6)})
    by_pos = calc.analyze_model(model, [torch.randn(3, 8), torch.randn(3, 6)])
    assert by_kw["flops"] == by_pos["flops"] == 2 * 3 * (8 * 4 + 6 * 4)


def test_data_dependent_model_falls_back_to_real():
    class Branchy(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(8, 8)

        def forward(self, x):
            return self.fc(x) if x.sum() > -1e9 else x

    r = calc.analyze_model(Branchy(), (2, 8))
    assert r["mode"].startswith("real") and r["flops"] == 2 * 2 * 8 * 8


def test_meta_device_model():
    with torch.device("meta"):
        model = TinyGPT(vocab_size=1000, n_layer=4, n_embd=256, n_head=4, block_size=128)
    r = calc.analyze_model(model, torch.zeros(1, 128, dtype=torch.long, device="meta"))
    assert r["mode"] == "meta" and r["flops"] > 0


def test_readable_units():
    from pytorch_practice_demo import readable
    assert readable(42_106_880, "FLOPs") == "42.11 MFLOPs"
    assert readable(8.18e9, "FLOPs") == "8.18 GFLOPs"
    assert readable(999) == "999"


# --- counting gaps closed (issue 12) --------------------------------------------------------------

class _MmOut(nn.Module):
    def forward(self, x):
        y = torch.empty(x.shape[0], x.shape[0], device=x.device)
        return torch.mm(x, x.t(), out=y)


def test_an_op_called_with_out_is_counted_not_a_crash():
    result = FLOPCalculator().analyze_model(_MmOut(), torch.randn(8, 16), mode="real")
    assert result["macs"] == 8 * 16 * 8  # (8 x 16) @ (16 x 8)


def test_in_place_ops_cost_what_their_twins_do():
    model = nn.Sequential(nn.Linear(16, 16), nn.Hardswish(inplace=True), nn.ReLU(inplace=True))
    result = FLOPCalculator().analyze_model(model, (4, 16))
    assert not result["unsupported_ops"]
    assert result["other_flops"] >= 2 * 4 * 16  # one per element for each activation


def test_embedding_bag_with_weights_is_multiply_adds_and_without_is_a_reduction():
    class Bag(nn.Module):
        def __init__(self, mode):
            super().__init__()
            self.bag = nn.EmbeddingBag(100, 64, mode=mode)

        def forward(self, ids, w=None):
            return self.bag(ids, per_sample_weights=w)
    ids = torch.randint(0, 100, (4, 40))
    weighted = FLOPCalculator().analyze_model(Bag("sum"), (ids, torch.rand(4, 40)))
    assert weighted["macs"] == 4 * 40 * 64  # 10,240: one multiply-add per looked-up element
    for mode in ("mean", "max"):
        plain = FLOPCalculator().analyze_model(Bag(mode), ids)
        assert plain["macs"] == 0 and plain["other_flops"] == 4 * 40 * 64 and not plain["unsupported_ops"]


@pytest.mark.parametrize("mode, per_element", [("nearest", 1), ("bilinear", 4), ("bicubic", 16)])
def test_upsampling_is_counted_per_output_element(mode, per_element):
    model = nn.Upsample(scale_factor=2, mode=mode)
    result = FLOPCalculator().analyze_model(model, (1, 3, 8, 8))
    assert result["other_flops"] == 1 * 3 * 16 * 16 * per_element and not result["unsupported_ops"]


def test_grid_sample_is_counted():
    class Warp(nn.Module):
        def forward(self, x, grid):
            return nn.functional.grid_sample(x, grid, align_corners=False)
    result = FLOPCalculator().analyze_model(Warp(), (torch.randn(1, 2, 8, 8), torch.rand(1, 4, 4, 2)))
    assert result["other_flops"] == 1 * 2 * 4 * 4 * 4 and "grid_sampler_2d" not in result["unsupported_ops"]


def test_an_input_that_requires_grad_has_its_gradient_counted():
    conv = nn.Conv2d(3, 8, 3)
    x = torch.randn(2, 3, 10, 10)
    plain = FLOPCalculator().analyze_model(conv, x)
    with_grad = FLOPCalculator().analyze_model(conv, x.requires_grad_())
    # the grad of the input: one more transposed convolution, 2 x 2*8*8*8*3*3*3 FLOPs
    assert with_grad["training_flops"] - plain["training_flops"] == 2 * (2 * 8 * 8 * 8 * 3 * 3 * 3)


def test_a_count_that_needed_real_data_says_so():
    class Nonzero(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 4)

        def forward(self, x):
            return self.fc(x[x.sum(dim=1) > 0])  # how many rows survive depends on the data
    result = FLOPCalculator().analyze_model(Nonzero(), (8, 4))
    assert result["data_dependent"] and "another input" in result["note"] and result["mode"].startswith("real")


def test_attention_and_lstm_count_the_same_without_and_with_real_data():
    """Counting runs on fake tensors of the target device, so it sees the kernels a real run would
    (CPU flash attention, the fused oneDNN LSTM): the default and mode="real" agree."""
    for model, inputs in [(TinyGPT(), torch.zeros(2, 64, dtype=torch.long)),
                          (LSTMClassifier(), torch.zeros(2, 32, dtype=torch.long))]:
        default = calc.analyze_model(model, inputs)
        real = calc.analyze_model(model, inputs, mode="real")
        for key in ("flops", "other_flops", "training_flops"):
            assert default[key] == real[key], (type(model).__name__, key)
