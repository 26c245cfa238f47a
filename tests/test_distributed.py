"""Data-parallel training: measured on 2 gloo processes, simulated with the fake process group."""
import socket

import matplotlib.pyplot as plt
import pytest
import torch
import torch.distributed as dist
import torch.nn as nn
from conftest import assert_unchanged, snapshot

import pytorch_practice_demo as demo


def tiny_mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10))


@pytest.fixture(scope="module")
def measured():
    """One spawn of 2 ranks running ddp and fsdp on the tiny MLP (the expensive part, shared)."""
    model = tiny_mlp()
    before = snapshot(model)
    result = demo.measure_distributed(model, (16, 64), world_size=2, strategy=("ddp", "fsdp"))
    return model, before, result


def test_fsdp_shards_to_the_byte():
    # Linear(64, 128): weight 128 x 64, bias 128; Linear(128, 10): weight 10 x 128, bias 10.
    # 2 ranks, rank 0: ceil(128/2) = 64 rows of 64 -> 64*64*4 = 16_384; bias 64*4 = 256;
    # ceil(10/2) = 5 rows of 128 -> 5*128*4 = 2_560; bias 5*4 = 20.  Sum 19_220.
    expected_params = 16_384 + 256 + 2_560 + 20
    est = demo.estimate_distributed(tiny_mlp(), (16, 64), world_size=2, strategy="fsdp")
    arithmetic = demo.fsdp_shard_bytes(tiny_mlp(), 2)
    assert arithmetic["parameter_bytes"] == expected_params
    assert arithmetic["optimizer_bytes"] == 2 * expected_params + 4 * 4  # Adam m, v + 4 step counters
    for key in ("parameter_bytes", "gradient_bytes", "optimizer_bytes"):
        assert est[key] == arithmetic[key], key
    assert not dist.is_initialized()  # the fake group is gone


def test_fsdp_shards_padded_at_8_ranks():
    # bias of 10 on 8 ranks: ceil(10/8) = 2 rows on every rank (padded), rank 7 holds none of the data
    model = nn.Sequential(nn.Linear(4, 10))
    arithmetic = demo.fsdp_shard_bytes(model, 8, rank=7)
    assert arithmetic["parameter_bytes"] == 2 * 4 * 4 + 2 * 4  # weight 2 rows of 4 + bias 2, padded
    assert arithmetic["optimizer_bytes"] == 2 * 4  # no rows of its own: Adam state is 2 step counters only
    est = demo.estimate_distributed(model, (8, 4), world_size=8, strategy="fsdp")
    assert est["parameter_bytes"] == demo.fsdp_shard_bytes(model, 8)["parameter_bytes"]


def test_ddp_estimate_within_5_percent_and_comm_formula(measured):
    model, _, result = measured
    ddp = result["ddp"]
    est = demo.estimate_distributed(model, (16, 64), world_size=2, strategy="ddp")
    # gradients: (64*128 + 128 + 128*10 + 10) * 4 = 38_344 bytes; ring all-reduce on 2 ranks sends
    # 2 * (2 - 1) / 2 * 38_344 = 38_344 bytes per rank and step
    grad_bytes = (64 * 128 + 128 + 128 * 10 + 10) * 4
    for rank in ddp["ranks"]:  # the lowest of a rank's readings is the program's own peak
        assert len(rank["step_peaks"]) == 2 and max(rank["step_peaks"]) == rank["total"]
        assert abs(est["total"] - min(rank["step_peaks"])) <= 0.05 * min(rank["step_peaks"])
    assert ddp["formula_sent_bytes"] == pytest.approx(grad_bytes)
    counted = ddp["ranks"][0]["collectives"]["all_reduce"]
    assert counted["payload_bytes"] == grad_bytes
    assert counted["sent_bytes"] == pytest.approx(ddp["formula_sent_bytes"])


def test_parity_and_fsdp_comm(measured):
    _, _, result = measured
    for strategy in ("ddp", "fsdp"):
        parity = result[strategy]["parity"]
        assert parity["grad_max_abs_diff"] < 1e-5 and parity["param_max_abs_diff"] < 1e-5, (strategy, parity)
        assert parity["grad_ratio"] == pytest.approx(1.0, rel=1e-4)  # averaged, not summed (pytorch#162338)
    fsdp = result["fsdp"]["ranks"][0]["collectives"]
    # the tiny MLP's Linears are sharded one by one: all-gathered in forward and in backward (2 x 2),
    # reduce-scattered once each
    assert fsdp["all_gather"]["calls"] == 4 and fsdp["reduce_scatter"]["calls"] == 2


def test_processes_cleaned_up_and_model_unchanged(measured):
    import multiprocessing
    model, before, result = measured
    assert_unchanged(before, model)
    assert multiprocessing.active_children() == []
    with socket.socket() as s:  # nothing is left listening on the port the ranks used (closed
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # connections may linger in TIME_WAIT)
        s.bind(("127.0.0.1", result["ddp"]["port"]))
        s.listen()
    assert not dist.is_initialized()


@pytest.mark.parametrize("bad", [0, -1, 10_000, 2.0, True])
def test_bad_world_size(bad):
    with pytest.raises(ValueError, match="world_size"):
        demo.measure_distributed(tiny_mlp(), (16, 64), world_size=bad)


def test_bad_strategy_and_batch():
    with pytest.raises(ValueError, match="strategy"):
        demo.estimate_distributed(tiny_mlp(), (16, 64), world_size=2, strategy="zero5")
    with pytest.raises(ValueError, match="strategy"):
        demo.measure_distributed(tiny_mlp(), (16, 64), strategy="pipeline")
    with pytest.raises(ValueError, match="split evenly"):
        demo.estimate_distributed(tiny_mlp(), (15, 64), world_size=2, strategy="fsdp")


def test_fake_group_cleaned_up_after_an_error():
    class Broken(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 4)

        def forward(self, x):
            return self.fc(x[:, :3])  # shape error
    with pytest.raises(ValueError):
        demo.estimate_distributed(Broken(), (4, 4), world_size=2, strategy="fsdp")
    assert not dist.is_initialized()
    x = torch.ones(2, 2)  # later code in this process runs as before
    assert float((x @ x).sum()) == 8.0


def test_shared_buffer_counted_once():
    # fully_shard runs on meta and to_empty gives the storages: one buffer in two modules stays one
    table = torch.zeros(4, 8)
    blocks = [nn.Linear(8, 8) for _ in range(2)]
    for block in blocks:
        block.register_buffer("table", table)
    est = demo.estimate_distributed(nn.Sequential(*blocks), (4, 8), world_size=2, strategy="fsdp")
    assert est["buffer_bytes"] == table.nbytes

def test_meta_llama_at_many_ranks():
    model = demo.build_llama("Llama-7B", layers=1)  # on meta: 1 layer of the 7B config
    e8 = demo.estimate_distributed(model, torch.zeros(8, 16, dtype=torch.long, device="meta"), world_size=8,
                                   strategy="fsdp")
    e64 = demo.estimate_distributed(model, torch.zeros(64, 16, dtype=torch.long, device="meta"), world_size=64,
                                    strategy="fsdp")
    assert e8["parameter_bytes"] == demo.fsdp_shard_bytes(model, 8)["parameter_bytes"]
    assert e64["parameter_bytes"] < e8["parameter_bytes"]
    assert "fake process group" in e8["method"]


def test_communication_formula():
    # fsdp on 4 ranks, 100 bytes of params and grads: (3/4) * (2*100 + 100) = 225
    assert demo.communication_formula("fsdp", 4, 100) == pytest.approx(225)
    assert demo.communication_formula("zero2", 4, 100) == pytest.approx(150)
    assert demo.communication_formula("ddp", 4, 100) == pytest.approx(150)  # 2 * 3/4 * 100
    assert demo.communication_formula("ddp", 1, 100) == 0


def _fake_data(measured_part):
    rank = {"total": 100 * 2 ** 10, "at_peak": {"parameter_bytes": 40 * 2 ** 10, "optimizer_bytes": 50 * 2 ** 10},
            "sent_bytes": 1000.0}
    est = {**rank, "formula_sent_bytes": 1000.0, "total": 98 * 2 ** 10}
    parity = {"grad_max_abs_diff": 1e-9, "param_max_abs_diff": 1e-7, "passes": True, "tolerance": 1e-5, "note": None}
    measured_result = {s: {"ranks": [rank, rank], "sent_bytes": 1000.0, "parity": parity}
                       for s in demo.DISTRIBUTED_STRATEGIES} if measured_part else None
    worlds = list(demo.ZERO_WORLDS)
    return {"model": "MLP", "parameters": 1000, "batch": 8, "world_size": 2,
            "single": {"measured": rank, "estimate": est},
            "estimated": {s: est for s in demo.DISTRIBUTED_STRATEGIES}, "measured": measured_result,
            "measured_skipped": None if measured_part else "quick run",
            "large": {"name": "Llama-70B", "parameters": 7e10, "worlds": worlds, "tokens": 256,
                      "zero": {k: [1e12 / n for n in worlds] for k in ("DDP", "ZeRO-1", "ZeRO-2", "ZeRO-3")},
                      "zero_7b": [1e11 / n for n in worlds], "simulated_worlds": [8],
                      "simulated": [{"total": 1.5e11}], "device_memory_bytes": 80e9}}


@pytest.mark.parametrize("measured_part", [True, False])
def test_figure_panels(measured_part):
    fig = demo.plot_distributed(_fake_data(measured_part))
    axes = fig.axes
    assert len(axes) == 4
    assert all(ax.get_title() for ax in axes)
    sizes = [t.get_fontsize() for ax in axes for t in ax.texts + ax.get_xticklabels() + ax.get_yticklabels()]
    assert min(sizes) >= 8
    legend = axes[0].get_legend()
    colours = [h.get_facecolor()[:3] for h in legend.legend_handles]
    import matplotlib.colors as mc
    assert colours[0] == pytest.approx(mc.to_rgb(demo.PALETTE.blue))
    plt.close(fig)
