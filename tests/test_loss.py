"""The loss of the memory step: the user's loss_fn, the model's own output.loss, or the sum of the outputs."""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from conftest import assert_unchanged, snapshot
from pytorch_practice_demo import MnistNet, analyze, estimate_memory, measure_memory


class TwoHeads(nn.Module):
    """Returns a dict: logits, an auxiliary output, and the cross-entropy "loss" when given labels."""

    def __init__(self, classes=2000):
        super().__init__()
        self.head = nn.Linear(16, classes)
        self.aux = nn.Linear(16, 8)

    def forward(self, x, y=None):
        out = {"logits": self.head(x), "aux": self.aux(x)}
        if y is not None:
            out["loss"] = F.cross_entropy(out["logits"], y)
        return out


def two_heads_batch(batch=256, classes=2000):
    torch.manual_seed(0)
    return TwoHeads(classes), torch.randn(batch, 16), torch.randint(0, classes, (batch,))


def test_the_models_own_loss_is_used_alone():
    model, x, y = two_heads_batch()
    own = estimate_memory(model, {"x": x, "y": y})
    assert own["loss"] == measure_memory(model, {"x": x, "y": y})["loss"] == "output.loss"
    # the aux head does not reach the loss: no gradient for it, only the head's (16*2000 + 2000) * 4 bytes
    assert own["gradient_bytes"] == (16 * 2000 + 2000) * 4
    summed = estimate_memory(model, {"x": x, "y": y},
                             loss_fn=lambda out: out["loss"] + out["logits"].sum() + out["aux"].sum())
    assert summed["loss"] == "loss_fn" and summed["gradient_bytes"] == own["gradient_bytes"] + (16 * 8 + 8) * 4
    plain = estimate_memory(model, {"x": x})  # no labels, no loss: the old rule
    assert plain["loss"] == "sum of outputs"
    # the cross-entropy keeps its log-softmax for backward: 256 * 2000 * 4 = 2_048_000 bytes more
    assert own["total"] - plain["total"] >= 256 * 2000 * 4


def test_a_user_loss_on_a_cnn_estimates_what_is_measured():
    torch.manual_seed(0)
    model, x, y = MnistNet(), torch.randn(16, 1, 28, 28), torch.randint(0, 10, (16,))
    est = estimate_memory(model, x, loss_fn=nn.CrossEntropyLoss(), targets=y)
    meas = measure_memory(model, x, loss_fn=nn.CrossEntropyLoss(), targets=y)
    assert est["loss"] == meas["loss"] == "loss_fn"
    assert abs(est["total"] - meas["total"]) / meas["total"] <= 0.03
    assert est.keys() == meas.keys()
    assert est["input_bytes"] == 16 * 28 * 28 * 4 + 16 * 8  # the targets are inputs of the step too


def test_a_loss_of_the_output_alone_and_the_inputs_as_batch():
    seen = []

    def loss_of_batch(output, batch):
        seen.append(batch.shape)
        return output.logsumexp(1).mean()
    estimate_memory(nn.Linear(8, 4), torch.randn(2, 8), loss_fn=loss_of_batch)
    assert seen == [torch.Size([2, 8])]  # no targets: the inputs
    assert estimate_memory(nn.Linear(8, 4), (2, 8), loss_fn=lambda out: out.square().mean())["loss"] == "loss_fn"
    assert estimate_memory(nn.Linear(8, 4), (2, 8), training=False, loss_fn=lambda out: out.sum())["loss"] is None


@pytest.mark.parametrize("fn", [estimate_memory, measure_memory])
@pytest.mark.parametrize("loss_fn, error, match", [
    (lambda out, batch: out.sum(1), ValueError, "scalar tensor, got shape \\(2,\\)"),
    (lambda out: 1.0, ValueError, "requires grad.*got float"),
    (lambda out: out.detach().sum(), ValueError, "does not require grad"),
    (3, TypeError, "callable"),
    (lambda out, batch, extra: out.sum(), TypeError, "signature"),
])
def test_a_bad_loss_fn_is_refused_and_the_model_untouched(fn, loss_fn, error, match):
    model = nn.Sequential(nn.Linear(8, 4), nn.ReLU(), nn.Linear(4, 3))
    before = snapshot(model)
    with pytest.raises(error, match=match):
        fn(model, torch.randn(2, 8), loss_fn=loss_fn)
    assert_unchanged(before, model)


def test_analyze_refuses_a_loss_fn_it_cannot_call_before_any_work():
    with pytest.raises(TypeError, match="callable"):
        analyze(nn.Linear(8, 4), (2, 8), loss_fn="cross_entropy")


def test_hugging_face_gpt2_trains_on_its_own_loss():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_embd=64, n_layer=2, n_head=2, vocab_size=512, n_positions=64,
                                     bos_token_id=0, eos_token_id=0)
    model = transformers.GPT2LMHeadModel(config)
    before = snapshot(model)
    ids = torch.randint(0, 512, (4, 64))
    est = estimate_memory(model, {"input_ids": ids, "labels": ids})
    meas = measure_memory(model, {"input_ids": ids, "labels": ids})
    assert est["loss"] == meas["loss"] == "output.loss"
    assert abs(est["total"] - meas["total"]) / meas["total"] <= 0.05
    assert_unchanged(before, model)
