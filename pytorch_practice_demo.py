"""PyTorch resource-accounting lab: FLOPs, memory, training strategies, mixed precision.

One command runs eight stages (flop, memory, training, amp, dashboard, roofline, distributed,
lecture) and draws nine figures (the memory stage draws two: the analysis and the memory timeline
of one training step); every number on them is counted or measured on the machine that runs it:

    python pytorch_practice_demo.py                 # nine PNGs + results.json in 生成的图片/
    python pytorch_practice_demo.py --quick         # the QUICK profile: smaller sizes, a fast check
    python pytorch_practice_demo.py --only flop,roofline --lang en

The helpers behind the figures work on your own models:

    from pytorch_practice_demo import FLOPCalculator
    result = FLOPCalculator().analyze_model(model, (32, 1024))
    print(result["flops_readable"], result["parameters_readable"], result["intensity"])

Conventions (stated once, used everywhere):
- FLOPs = 2 x multiply-adds (MACs). Bias adds are not counted. ``flops`` holds the matmul-class
  work (linear, matmul, conv, attention, RNN); elementwise/normalisation/softmax/pooling work is
  kept apart in ``other_flops`` so ``flops`` stays comparable with published numbers.
- Memory is the peak of bytes allocated during one steady-state step.  Measured: the allocator's
  own count (CPU: torch.profiler's allocation events; CUDA: max_memory_allocated); estimated:
  the same step on fake tensors, plus the CPU kernels' scratch rules (CpuScratch).
- Bytes are counted beside FLOPs: each op reads its inputs and writes its outputs (a model of
  memory traffic, no caches); intensity = FLOPs / byte places an op under the roofline's roofs.

Contents (each section opens with a `# %%` cell, so VS Code, PyCharm or Jupytext run it one
section at a time; the sections follow the data: units -> a model's replica -> measuring ->
the models -> counting and measuring them -> the figures -> the command line):
  1. Units, precision names and the hardware .... readable, PRECISIONS, hardware_info, resolve_device
  2. Running a model on a replica ............... LabError, Replica, StepLoss (the step's loss rules),
                                                  training_step (the lab's one training step)
  3. Timing and measuring primitives ............ Budget, time_stats, measure, Load (the machine's load),
                                                  measure_peak_flops, checked_utilisation
  4. The model zoo .............................. mlp, MnistNet, TinyGPT (with KVCache), LSTMClassifier,
                                                  ResMLPClassifier, MODEL_ZOO, build_model
  5. FLOP counting .............................. FLOPCalculator, run_flop_analysis (one formula registry)
  6. Memory ..................................... estimate_memory, measure_memory, measure_kv_cache,
                                                  zero_memory_per_device, memory_timeline, run_memory_analysis
  7. Mixed precision ............................ benchmark_mixed_precision, run_amp_analysis, dtype_ranges
  8. Training ................................... run_training_comparison, TrainingData, TrainingPlan,
                                                  load_mnist, measure_input_pipeline (SyntheticImages),
                                                  write_tensorboard
  9. Model selection ............................ measure_latency, Scenarios.recommend, run_dashboard_analysis
 9b. The roofline ............................. measure_bandwidth (section 3), roofline, measure_dispatch,
                                                  run_roofline_analysis
 9c. Beyond one device ......................... measure_distributed (N gloo/NCCL processes),
                                                  estimate_distributed (fake process group, any N),
                                                  communication_formula, fsdp_shard_bytes,
                                                  LlamaLike/build_llama, simulate_per_layer,
                                                  run_distributed_analysis
 10. The lecture, claim by claim ................ measure_fusion, measure_compile, LectureClaims.rows,
                                                  run_lecture_comparison, format_lecture_table
 11. Your own model ............................. load_model, analyze, format_model_table
 12. Figures .................................... set_language, save_figure, then per figure (stage order):
                                                  visualize_flop_analysis, visualize_memory_analysis,
                                                  visualize_memory_timeline, visualize_training_performance,
                                                  demonstrate_mixed_precision_benefits,
                                                  create_comprehensive_dashboard, visualize_roofline,
                                                  visualize_distributed,
                                                  visualize_lecture_claims,
                                                  visualize_own_model (each with its plot_* function)
 13. The CLI .................................... STAGES, parse_args, main (profiles: Profile, section 1)

References behind the formulas:
- torch/utils/flop_counter.py (per-op formulas, conv and SDPA backward conventions).
- Kaplan et al. 2020, "Scaling Laws for Neural Language Models", Table 1 (transformer FLOPs).
- Chowdhery et al. 2022, "PaLM", Appendix B (model FLOPs utilisation, MFU).
- Rajbhandari et al. 2020, "ZeRO", Section 3 and Figure 1 (16 bytes/parameter for mixed-precision
  Adam; ZeRO-1/2/3 partitioning).
- Micikevicius et al. 2018, "Mixed Precision Training" (loss scaling).
- Williams, Waterman & Patterson 2009, "Roofline", CACM 52(4); McCalpin's STREAM (bandwidth).
- Patarasuk & Yuan 2009, "Bandwidth optimal all-reduce algorithms" (ring all-reduce: 2(N-1)/N);
  Li et al. 2020, "PyTorch Distributed" (DDP); Zhao et al. 2023, "PyTorch FSDP".
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import functools
import inspect
import json
import math
import os
import platform
import random
import re
import subprocess
import sys
import tempfile
import time
import warnings
import weakref
from collections import Counter
from pathlib import Path
from dataclasses import dataclass
from types import SimpleNamespace
from typing import NamedTuple

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten, tree_map, tree_unflatten


# %% =============================================================================================
# 1. Units, precision names and the hardware: one vocabulary
# ================================================================================================
# FLOPs = 2 x multiply-adds (MACs), bias adds not counted; bytes are *_bytes everywhere and
# `parameters` is a count.  Precisions: fp32; amp_bf16 / amp_fp16 = fp32 weights, matmuls under
# torch.autocast in that dtype; bf16 / fp16 = the weights themselves in that dtype ("pure").
# Devices follow one policy (resolve_device): public functions take the keyword `device`.


# Bytes per element of each dtype the lab talks about.
BYTES_PER_ELEMENT = {torch.float32: 4, torch.bfloat16: 2, torch.float16: 2}


MIB, GIB = 2 ** 20, 2 ** 30


FLOPS_PER_MAC = 2  # one multiply-add (MAC) is two floating-point operations: the lab's FLOP convention


# One vocabulary for the whole API: amp_* = fp32 weights, matmuls under torch.autocast in that dtype;
# bf16 / fp16 = the weights themselves in that dtype ("pure").  estimate_memory and measure_memory
# take all five; benchmark_mixed_precision and the training comparison take fp32 and the amp_* ones.
PRECISIONS = {"fp32": None, "amp_bf16": torch.bfloat16, "amp_fp16": torch.float16, "bf16": torch.bfloat16,
              "fp16": torch.float16}
PURE_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


AMP_DTYPES = {p: PRECISIONS[p] for p in ("fp32", "amp_bf16", "amp_fp16")}  # what autocast can time


OPTIMIZER_STATES = {"sgd": 0, "sgd_momentum": 1, "adam": 2, "adamw": 2}  # state tensors per parameter


@dataclass(frozen=True)
class Profile:
    """Sizes and time budgets of one run, each with its reason (nanoGPT's config style).

    Budgets are wall seconds on a 2-core laptop CPU, quiet or busy.  A stage's `*_budget_s` covers
    the whole stage (counting, measuring, drawing, saving) and is what the stage runner checks it
    against; `*_measure_s` is the part a measuring stage plans its timed work into.  The rest of a
    stage is fixed work (counting on fake tensors, drawing) that a busy machine slows ~2.5x, so a
    budget is what that work takes busy plus its `measure_s`.  Goals (benchmarks/bench.py):
    default <= 40 s quiet and <= 80 s busy, quick <= 15 s and <= 30 s.  Nothing else holds a default.
    """
    name: str = "default"
    peak_s: float = 0.6               # one matmul sweep per precision: 512-2048 quiet, 512-1024 busy
    bandwidth_s: float = 0.4          # STREAM's 4 kernels on 128 MiB arrays (4x a 32 MiB L3): ~10 ms a run
    # FLOPs: 11 zoo models on fake tensors + a figure: ~6 s quiet, ~18 s busy
    flop_budget_s: float = 14.0
    flop_models: tuple | None = None  # None: all of MODEL_ZOO
    # memory: ~22 tracked steps, half on fake tensors: ~4.5 s quiet, ~14 s busy
    memory_budget_s: float = 13.0
    memory_batch: int = 16
    memory_models: tuple | None = None          # None: all of MEMORY_MODELS
    growth_estimated: tuple = (1, 16, 64)       # memory is linear in batch: with the measured 4, four points
    growth_measured: tuple = (4, 16)            # real steps, up to the figure's batch (reused)
    # AMP fp16 holds the same bytes as AMP bf16 (fp32 weights, 2-byte copies): not estimated twice
    memory_variants: tuple = ("fp32", "AMP bf16", "pure bf16", "fp32 + checkpoint", "AMP bf16 + checkpoint")
    kv: tuple = (8, 16, 48)                     # KV cache: batch, prompt, new tokens: ~0.3 s with the profiler
    # training: 4 strategies x 40 steps of ~25 ms quiet, peaks, calibration
    training_budget_s: float = 9.0
    training_measure_s: float = 7.0  # 4 strategies x 30-40 steps of 20-45 ms at batch 256, width 128: a plan that fits
                                      # uses only what its steps take; a tighter budget shrank the model on a slow day
    steps: int = 40                   # equal steps for all strategies ...
    min_steps: int = 30               # ... and a plan never goes below this
    training_batch: int = 256         # shrunk (batch, then width) on a slow machine
    width: int = 128
    depth: int = 8                    # narrow and deep: activations matter next to Adam state
    pipeline_s: float = 0.5           # DataLoader with 0, 1, 2 workers: each worker start ~0.05 s quiet
    # mixed precision: 3 models x 3 precisions; TinyGPT's fp32 step ~0.3 s quiet
    amp_budget_s: float = 8.0
    amp_measure_s: float = 4.5
    amp_batch: int = 32
    amp_max_runs: int = 6             # timed runs per precision at most: with 10, MLP-4096 left TinyGPT no time
    amp_models: tuple | None = None   # None: all of AMP_MODELS
    # dashboard: 11 fake-tensor memory estimates (~5 s quiet, ~13 s busy) and the latencies
    dashboard_budget_s: float = 16.0
    latency_s: float = 3.0            # batch 1 of every model; batch 8 of those that fit (ViT-B/16's ~7 s)
    # roofline: roofs (bandwidth ~0.4 s, the peak reused), 4 small models x (count, time, profile a step)
    roofline_budget_s: float = 4.0
    roofline_step_s: float = 0.15     # one model's steps timed (3-10 runs of a few ms)
    roofline_models: tuple | None = None  # None: all of ROOFLINE_MODELS
    # --model: a model of unknown size, generous
    model_budget_s: float = 45.0
    model_amp_s: float = 8.0
    model_latency_s: float = 3.0
    # the lecture: <= 4 s added to the default run (two small TinyGPT steps, fusion, figure; ~2 s quiet)
    lecture_budget_s: float = 4.0
    lecture_batch: int = 16
    # (layers, hidden): (4, 256) is the memory stage's, reused; (6, 384) took 0.6 s quiet, 5 s busy
    gpt_sizes: tuple = ((2, 128), (4, 256), (2, 384))
    fusion_shape: tuple = (2048, 1024)  # 8 MiB of fp32: a composed GELU ~5 ms quiet
    fusion_s: float = 0.4
    compile_s: float = 120.0          # --compile: a child process killed after this
    alone_s: float = 8.0              # lecture without the FLOP/memory stages' data: count, KV cache (busy ~10 s)
    # distributed: 2 ranks forked from a server that imports torch once (~4 s quiet, ~10 s busy), 9
    # fake-tensor steps (~0.5 s), a Llama-70B simulated with 3 and 4 layers at 2 world sizes (~2.5 s quiet)
    distributed_budget_s: float = 14.0
    distributed_measure_s: float | None = 8.0  # what the ranks need of the budget; None: not measured
    distributed_width: int = 512      # MLP 256 -> 512 -> 512 -> 10 with Adam: ~10 MB a rank, steps of ~10 ms
    distributed_batch: int = 64       # the global batch, 32 per rank
    distributed_large: str = "Llama-70B"
    distributed_worlds: tuple = (64,)  # each: a 3- and a 4-layer simulation, ~1 s (8: ~1 s, 512: ~5 s)
    # the CLI: the zoo's count, the dashboard's memory estimates and the simulations in processes beside
    # the memory stage (untimed work all): ~100 -> ~85 s busy, about even quiet (2 cores, 4 processes)
    beside: bool = True

    def budget_s(self, stage):
        return getattr(self, f"{stage}_budget_s")

    def kv_sizes(self):
        return dict(zip(("batch", "prompt", "new_tokens"), self.kv))


DEFAULT = Profile()
QUICK = Profile(  # what differs from DEFAULT, and why
    name="quick",
    peak_s=0.25,                                  # 512-1024: a lower peak, still a real one
    flop_budget_s=7.0, flop_models=("MLP-512", "MLP-2048", "MNIST-CNN", "TinyGPT"),  # no torchvision import
    memory_budget_s=6.0, memory_batch=8,
    memory_models=("MLP-2048", "TinyGPT (T=64)"),  # an MLP and a transformer: each real+fake step ~1 s busy
    growth_estimated=(1, 8), growth_measured=(8,),  # batch 8 is reused: one new estimate
    memory_variants=("fp32", "AMP bf16"),          # each variant is a fake-tensor step: ~0.3 s, ~1.2 s busy
    kv=(4, 8, 16),                                 # ~0.1 s quiet: a busy laptop's quick run is tight
    training_budget_s=4.5, steps=30, training_batch=64,
    depth=4,                                       # half the per-step overhead: fits a busy laptop
    pipeline_s=0.25,                               # 3 worker settings, 3 runs each of a few ms
    amp_budget_s=2.5, amp_measure_s=0.6, amp_batch=16,
    amp_models=("MLP-1024",),                      # MLP-4096 (21 M parameters) does not fit 1 s
    dashboard_budget_s=5.0, latency_s=0.6,         # the FLOP stage's quick zoo
    model_budget_s=20.0, model_amp_s=3.0, model_latency_s=1.0,
    roofline_budget_s=2.0, roofline_step_s=0.08, bandwidth_s=0.2,
    roofline_models=("MLP-2048", "TinyGPT (2x128, T=64)"),  # a matmul-bound and an overhead-bound model
    lecture_budget_s=2.5, lecture_batch=8, gpt_sizes=((2, 128), (4, 256)),
    fusion_shape=(512, 1024), fusion_s=0.2, compile_s=60.0, alone_s=5.0,
    distributed_budget_s=4.0, distributed_measure_s=None,  # no spawn: start-up alone is ~5 s
    distributed_worlds=(),                         # the large model's formula only: a simulation is ~1 s
    beside=False,                                  # starting the processes (~3 s) costs more than it saves
    training_measure_s=1.5,
)
PROFILES = {"default": DEFAULT, "quick": QUICK}


def readable(n, unit=""):
    """42_106_880 -> '42.11 M' + unit (decimal SI prefixes, two decimals)."""
    for factor, prefix in ((1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "K")):
        if abs(n) >= factor:
            return f"{n / factor:.2f} {prefix}{unit}"
    return f"{n:.0f} {unit}".rstrip()


def seed_everything(seed):
    """Seed torch, numpy and random from one number."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def cpu_flags():
    """Whether this CPU has AVX512-BF16 and AMX-BF16 (fast bf16 matmuls); None when unknown."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return {"avx512_bf16": None, "amx_bf16": None}
    flags = set(next((line for line in text.splitlines() if line.startswith("flags")), "").split())
    return {"avx512_bf16": "avx512_bf16" in flags, "amx_bf16": "amx_bf16" in flags}


def hardware_info(device):
    device = torch.device(device)
    info = {"device": _device_name(device), "torch": torch.__version__, "threads": torch.get_num_threads(),
            "tf32_matmul": torch.backends.cuda.matmul.allow_tf32,
            "cpu_capability": torch.backends.cpu.get_cpu_capability(), **cpu_flags()}
    if device.type == "cuda":
        info["bf16_supported"] = torch.cuda.is_bf16_supported()
        info["compute_capability"] = ".".join(map(str, torch.cuda.get_device_capability(device)))
    return info


def supported_precisions(device):
    """Low precisions autocast supports on `device` (as torch documents them)."""
    device = torch.device(device)
    if device.type == "cuda":
        return ["fp32", "amp_fp16"] + (["amp_bf16"] if torch.cuda.is_bf16_supported() else [])
    if device.type == "mps":
        return ["fp32", "amp_fp16"]
    return ["fp32", "amp_bf16", "amp_fp16"]


def _device_name(device):
    device = torch.device(device)
    if device.type == "cuda":
        return f"cuda ({torch.cuda.get_device_name(device)})"
    if device.type == "cpu":
        return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
    return device.type


def resolve_device(device=None, model=None):
    """The one device policy, for the CLI and the library alike: a device you pass is checked and
    used ("auto" and None: see below); otherwise the model's own (meta stays meta: estimates then
    run on CPU fake tensors, measurements refuse it); with no model, the best one here: cuda, then
    mps, then cpu.  Public functions take it as the keyword `device`."""
    if device is None and model is not None:
        return Replica.device(model)
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available()
                            else "cpu")
    return check_device(device)


def check_device(device):
    """torch.device(device), or a ValueError naming what is available, before torch touches a
    device that is not here (a missing MPS device aborts the process; a missing CUDA one fails deep
    inside torch).  "meta" is allowed: it holds shapes, no data."""
    here = ["cpu", *(f"cuda:{i}" for i in range(torch.cuda.device_count()) if torch.cuda.is_available()),
            *(["mps"] if torch.backends.mps.is_available() else [])]
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError):
        raise LabError(f"device must be cpu, cuda, cuda:N, mps or meta, got {device!r}; available here: "
                       f"{', '.join(here)}") from None
    absent = (device.type == "cuda" and (not torch.cuda.is_available()
                                         or (device.index or 0) >= torch.cuda.device_count())
              or device.type == "mps" and not torch.backends.mps.is_available()
              or device.type not in ("cpu", "cuda", "mps", "meta"))
    if absent:
        raise LabError(f"device {str(device)!r} is not available here: {', '.join(here)}")
    return device


def _autocast(precision, device):
    """torch.autocast on `device`'s type for an amp_* precision; a no-op for fp32 and for pure
    bf16/fp16 (their weights are already in that dtype)."""
    if not precision.startswith("amp_"):
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=PRECISIONS[precision])


# %% =============================================================================================
# 2. Running a model on a replica: the user's module is never touched
# ================================================================================================
# Every analysis runs on a copy of the model (Replica.of), with inputs that follow the model
# (Replica.inputs), and errors that name the real cause (LabError, ModelRunError).  The one
# training step of the whole lab (training_step) is here: memory, mixed precision and the training
# comparison all run it.


class LabError(ValueError):
    """A refusal whose message already names its cause (a model that cannot be copied, nothing to
    train, an absent device): passed on as it is, never re-worded as a problem with the inputs."""


class ModelRunError(ValueError):
    """The model could not run on the inputs given (shape mismatch and the like)."""


def _first_line(err):
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


# --- running a model on a replica: the user's module is never touched -------------------

class Replica:
    """Running a model of yours on a copy: your module is never touched.

    The model is checked (check), its inputs turned into (args, kwargs) that follow it (inputs),
    copies of both made by a `make` function (of, map: meta, fake or real tensors), and a failure
    reported by an error that names the real cause (error).
    """

    @staticmethod
    def blocks(model):
        """A model's blocks: the elements that hold parameters of its outermost nn.Sequential /
        nn.ModuleList containers (the model itself if it is one): transformer blocks, ResNet stages,
        an MLP's linears.  What checkpointing recomputes, and what FSDP shards one by one."""
        containers = [model] if isinstance(model, (nn.Sequential, nn.ModuleList)) else []

        def visit(module):
            for child in module.children():
                if isinstance(child, (nn.Sequential, nn.ModuleList)) and len(child) > 1:
                    containers.append(child)
                else:
                    visit(child)

        if not containers:
            visit(model)
        return [b for c in containers for b in c if any(True for _ in b.parameters())]

    @staticmethod
    @contextlib.contextmanager
    def eval_mode(model):
        """model.eval() inside the block; every submodule's own mode is put back afterwards."""
        modes = [(m, m.training) for m in model.modules()]
        model.eval()
        try:
            yield model
        finally:
            for m, mode in modes:
                m.training = mode

    @staticmethod
    def of(model, make):
        """A deep copy of `model` whose parameters and buffers are `make(tensor)`.

        `make` gives empty meta tensors (counting), fake tensors (estimating) or real clones
        (measuring); the user's module is never touched.  Tied weights stay tied (deepcopy's memo).
        """
        memo = {}
        for p in model.parameters():
            memo[id(p)] = nn.Parameter(make(p.detach()), requires_grad=p.requires_grad)
        for b in model.buffers():
            memo[id(b)] = make(b.detach())
        for m in model.modules():  # compiled functions hold no state and cannot be deep-copied: shared
            for value in vars(m).values():
                if isinstance(value, (torch.jit.ScriptFunction, torch._C.ScriptFunction)):
                    memo[id(value)] = value
        try:
            return copy.deepcopy(model, memo)
        except Exception as err:  # a lock, a file handle, a compiled function: copy.deepcopy refuses it
            raise LabError(f"model cannot be copied ({type(err).__name__}: {_first_line(err)}); the lab runs every "
                           "step on a copy so that your model is never changed. Keep such objects outside the "
                           "module (or give it a __deepcopy__)") from None

    @staticmethod
    def meta_like(x, dtype=None, device="meta"):
        """An empty copy (a shape, no data) on meta (or on `device`, inside a fake mode), a floating
        tensor cast to `dtype`."""
        cast = dtype if (dtype is not None and x.is_floating_point()) else x.dtype
        return torch.empty_like(x, device=device, dtype=cast)

    @staticmethod
    def fake_like(mode, device, dtype=None):
        """Fake copies (no data) made in `mode` on `device`, floating tensors cast to `dtype`."""
        def make(x):
            with mode:
                return Replica.meta_like(x, dtype, device)
        return make

    @staticmethod
    def materialize(replica, mode, device):
        """`replica` (on meta) given empty storages on `device` in `mode` (replica.to_empty), a buffer
        that several modules share shared again (to_empty gives each of them its own)."""
        owners = [(m, name, b) for m in replica.modules()
                  for name, b in m.named_buffers(recurse=False, remove_duplicate=False)]
        with mode:
            replica.to_empty(device=device)
        made = {}
        for m, name, b in owners:
            setattr(m, name, made.setdefault(id(b), getattr(m, name)))
        return replica

    @staticmethod
    def real_like(device, dtype=None, seed=0, ids_below=None):
        """Real copies on `device` (floating tensors cast to `dtype`); a meta input (a shape the user
        gave) becomes random data: normal floats, or integer ids below `ids_below` (zeros without)."""
        generator = torch.Generator().manual_seed(seed)

        def make(x):
            cast = dtype if (dtype is not None and x.is_floating_point()) else x.dtype
            if x.is_meta:  # a shape given by the user
                if x.is_floating_point():
                    return torch.randn(x.shape, generator=generator).to(device, cast)
                if ids_below:
                    return torch.randint(0, ids_below, x.shape, generator=generator).to(device, x.dtype)
                return torch.zeros(x.shape, dtype=x.dtype, device=device)
            return x.detach().to(device, cast, copy=True)
        return make

    @staticmethod
    def device(model):
        for t in (*model.parameters(), *model.buffers()):
            return t.device
        return torch.device("cpu")

    @staticmethod
    def embedding_first(model):
        """The first module that holds parameters, when it is an embedding (its inputs are ids)."""
        first = next((m for m in model.modules() if next(m.parameters(recurse=False), None) is not None), None)
        return first if isinstance(first, (nn.Embedding, nn.EmbeddingBag)) else None

    @staticmethod
    def ids_below(model):
        first = Replica.embedding_first(model) if model is not None else None
        return first.num_embeddings if first is not None else None

    @staticmethod
    def dtype(model):
        """The floating dtype of the model's first floating parameter or buffer (float32 without)."""
        return next((t.dtype for t in (*model.parameters(), *model.buffers()) if t.is_floating_point()),
                    torch.float32)

    @staticmethod
    def is_dim(d):
        return isinstance(d, (int, float, np.integer, np.floating)) and not isinstance(d, torch.Tensor)

    @staticmethod
    def inputs(inputs, model=None):
        """Turn `inputs` into (args, kwargs) of tensors; validate shapes given as tuples.

        A shape becomes a meta tensor that follows the model: integer ids for a model whose first
        layer is an embedding (random ids below num_embeddings when made real), else data in the
        dtype of the model's parameters.
        """
        if isinstance(inputs, torch.Size) or (isinstance(inputs, (tuple, list)) and inputs
                                              and all(Replica.is_dim(d) for d in inputs)):
            bad = next((d for d in inputs if isinstance(d, (bool, np.bool_, float, np.floating)) or int(d) <= 0), None)
            if bad is not None:
                raise ValueError(f"dims must be positive integers (got {bad!r}); to pass data "
                                 "instead of a shape, give a tensor, e.g. torch.randn(32, 1024) or token ids "
                                 "torch.randint(0, vocab, (8, 128))")
            shape = tuple(int(d) for d in inputs)
            if model is not None and Replica.embedding_first(model) is not None:
                return (torch.empty(shape, device="meta", dtype=torch.long),), {}
            dtype = Replica.dtype(model) if model is not None else torch.float32
            return (torch.empty(shape, device="meta", dtype=dtype),), {}
        if isinstance(inputs, torch.Tensor):
            return (inputs,), {}
        if isinstance(inputs, dict):
            return (), dict(inputs)
        if isinstance(inputs, (tuple, list)) and inputs:
            return tuple(inputs), {}
        raise TypeError("inputs must be a shape tuple such as (32, 1024), a tensor, a tuple/list "
                        f"of tensors (positional arguments) or a dict (keyword arguments); "
                        f"got {type(inputs).__name__}")

    @staticmethod
    def map(tree, make):
        """Apply `make` to every tensor in `tree`.

        The same tensor passed twice stays one tensor (nn.MultiheadAttention's fast path checks
        `query is key`).
        """
        made = {}

        def one(x):
            if not isinstance(x, torch.Tensor):
                return x
            if id(x) not in made:
                made[id(x)] = make(x)
            return made[id(x)]
        return tree_map(one, tree)

    @staticmethod
    def shapes(args, kwargs):
        leaves = [x for x in tree_flatten((args, kwargs))[0] if isinstance(x, torch.Tensor)]
        shapes = [tuple(x.shape) for x in leaves]
        return shapes[0] if len(shapes) == 1 else shapes

    @staticmethod
    def check(model):
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")

    @staticmethod
    def error(model, args, kwargs, err):
        if isinstance(err, LabError):
            return err
        hint = ""
        if any(isinstance(x, torch.Tensor) and x.is_meta for x in tree_flatten((args, kwargs))[0]):
            hint = (" (a shape gives data in the model's dtype, or ids for a model that starts with an embedding; "
                    "pass tensors for anything else)")
        return ModelRunError(f"{type(model).__name__} could not run on inputs of shape "
                             f"{Replica.shapes(args, kwargs)}: {_first_line(err)}{hint}")


# --- the loss of a step: the user's, the model's own, or the sum of the outputs ---------------

class StepLoss:
    """The loss function memory steps run: the user's `loss_fn` (its result checked), or else the
    model's own `output.loss`; None otherwise, and training_step then sums the outputs.

    `used` says which rule gave the loss: "loss_fn", "output.loss" or "sum of outputs".
    """

    def __init__(self, loss_fn=None):
        self.takes_batch = StepLoss.takes_batch_of(loss_fn)  # TypeError up front, before any work
        self.loss_fn, self.used = loss_fn, "loss_fn" if loss_fn is not None else None

    def __call__(self, output, batch):
        if self.loss_fn is None:
            loss = StepLoss.own(output)
            self.used = "output.loss" if loss is not None else "sum of outputs"
            return loss
        try:
            loss = self.loss_fn(output, batch) if self.takes_batch else self.loss_fn(output)
        except Exception as err:  # the loss's own failure, not the model's: say how it was called
            raise LabError(f"loss_fn failed: {type(err).__name__}: {_first_line(err)}; it was called as "
                           "loss_fn(output, batch) with batch = targets when given, else the inputs: pass "
                           "targets= (e.g. integer labels for nn.CrossEntropyLoss)") from None
        if not isinstance(loss, torch.Tensor) or not loss.requires_grad:
            got = "a tensor that does not require grad" if isinstance(loss, torch.Tensor) else type(loss).__name__
            raise LabError(f"loss_fn must return a scalar tensor that requires grad (computed from the output, "
                           f"e.g. F.cross_entropy(output, batch)); got {got}")
        if loss.numel() != 1:
            raise LabError(f"loss_fn must return a scalar tensor, got shape {tuple(loss.shape)}; reduce it, "
                           "e.g. with .mean() or .sum()")
        return loss

    @staticmethod
    def leaves(output):
        """Every floating-point output tensor that requires grad."""
        return [x for x in tree_flatten(output)[0]
                if isinstance(x, torch.Tensor) and x.is_floating_point() and x.requires_grad]

    @staticmethod
    def summed(output):
        """Sum of every floating-point output tensor that requires grad (None if there is none)."""
        leaves = StepLoss.leaves(output)
        return sum(x.float().sum() for x in leaves) if leaves else None

    @staticmethod
    def own(output):
        """The loss the model computed itself: `output.loss` (a Hugging Face ModelOutput, given
        `labels=`) or `output["loss"]` (a dict), when it is a tensor; else None."""
        loss = output.get("loss") if isinstance(output, dict) else getattr(output, "loss", None)
        return loss if isinstance(loss, torch.Tensor) else None

    @staticmethod
    def default(output):
        """The loss of a step given no loss function: the model's own (`StepLoss.own`) alone, else
        `StepLoss.summed` (summing a model's loss with its logits would train on both)."""
        own = StepLoss.own(output)
        return own if own is not None else StepLoss.summed(output)

    @staticmethod
    def takes_batch_of(loss_fn):
        """Whether `loss_fn` is called as loss_fn(output, batch) (True) or loss_fn(output) (False),
        read once from its signature (an nn.Module's from its forward); None takes nothing."""
        if loss_fn is None:
            return False
        if not callable(loss_fn):
            raise TypeError(f"loss_fn must be callable as loss_fn(output, batch) or loss_fn(output), "
                            f"got {type(loss_fn).__name__}")
        try:
            signature = inspect.signature(loss_fn.forward if isinstance(loss_fn, nn.Module) else loss_fn)
        except (TypeError, ValueError):  # some builtins publish no signature: call them as (output, batch)
            return True
        for arguments, takes_batch in (((None, None), True), ((None,), False)):
            with contextlib.suppress(TypeError):
                signature.bind(*arguments)
                return takes_batch
        raise TypeError(f"loss_fn must take (output, batch) or (output); its signature is {signature}")

    @staticmethod
    def batch(run_args, run_kwargs, targets):
        """The `batch` a loss_fn(output, batch) gets: the targets when given, else the inputs as they
        were passed (a tensor, a tuple of them, or a dict of keyword arguments)."""
        if targets is not None:
            return targets
        if run_kwargs:
            return run_kwargs if not run_args else (run_args, run_kwargs)
        return run_args[0] if len(run_args) == 1 else run_args


def _checkpoint_blocks(model):
    """Recompute each block (Replica.blocks) in backward: torch.utils.checkpoint around it.  Only for
    replicas: it sets `forward` on the blocks.  Returns the number of blocks wrapped."""
    from torch.utils.checkpoint import checkpoint
    blocks = Replica.blocks(model)
    for block in blocks:
        block.forward = functools.partial(checkpoint, block.forward, use_reentrant=False)
    return len(blocks)


def _make_optimizer(name, params, foreach=None):
    if name == "sgd":
        return torch.optim.SGD(params, lr=1e-3, foreach=foreach)
    if name == "sgd_momentum":
        return torch.optim.SGD(params, lr=1e-3, momentum=0.9, foreach=foreach)
    if name == "adam":
        return torch.optim.Adam(params, lr=1e-3, foreach=foreach)
    return torch.optim.AdamW(params, lr=1e-3, foreach=foreach)


def _grad_scaler(precision, device):
    """torch.amp.GradScaler for fp16 on CUDA, where small gradients underflow; None otherwise."""
    return torch.amp.GradScaler("cuda") if precision == "amp_fp16" and device.type == "cuda" else None


def training_step(replica, optimizer, micro_batches, *, precision="fp32", device, loss_fn=None, scaler=None,
                  tracker=None, compute=None, item=False, on_gradients=None):
    """The one training step every stage runs: for each micro-batch (args, kwargs, target, weight),
    forward under autocast in `precision`, loss times `weight` when given, backward (through the
    GradScaler when given); then optimizer.step() and zero_grad(set_to_none=True).

    The loss is `loss_fn(output, target)` (under autocast, as users write it); where there is no
    loss_fn, or it returns None, `StepLoss.default`: the model's own `output.loss`, else the sum of
    every floating output.  `on_gradients(replica)` is called once the gradients are complete
    (unscaled first when a GradScaler is used), before the optimizer step.

    `tracker` (a _StorageTracker) is entered around the step and told its phases; `compute` is the
    context forward and backward run in (FakeTensorMode when estimating): the optimizer runs outside
    it, so its CPU step counters stay real numbers.  Returns the summed (weighted) loss as a float
    when `item` (one host sync per micro-batch), else None.
    """
    track = tracker if tracker is not None else contextlib.nullcontext()
    phase = tracker.set_phase if tracker is not None else (lambda name: None)
    total = 0.0 if item else None
    with compute or contextlib.nullcontext(), track, torch.enable_grad():  # even inside a no_grad block
        for run_args, run_kwargs, target, weight in micro_batches:
            phase("forward")
            with _autocast(precision, device):
                output = replica(*run_args, **run_kwargs)
                loss = loss_fn(output, target) if loss_fn is not None else None
            phase("backward")
            if loss is None:
                loss = StepLoss.default(output)
            del output
            if loss is None:
                raise ValueError(f"{type(replica).__name__} has no output that requires grad: nothing to train")
            loss = loss * weight if weight is not None else loss
            (scaler.scale(loss) if scaler is not None else loss).backward()
            if item:
                total += loss.item()
            del loss
        if tracker is not None:
            tracker.mark_gradients(replica.parameters())
    if on_gradients is not None:
        if scaler is not None:  # true gradients, as clipping sees them; scaler.step() will not unscale again
            scaler.unscale_(optimizer)
        on_gradients(replica)
    with track:
        phase("optimizer")
        if scaler is not None:  # the scaler skips a step whose gradients hold inf/NaN
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return total


class FakeTensors:
    """Fake tensors (torch._subclasses.fake_tensor): shapes, dtypes and devices without data, for
    counting and estimating."""

    @staticmethod
    def mode():
        """A FakeTensorMode for counting and estimating (real tensors, the user's, may flow in).  NB: its
        dispatch cache is shared by every mode of the process and pays off across models: counting the
        zoo took 3.6 s with it and 6.2 s without, though one model counted alone is ~12 % faster without."""
        from torch._subclasses.fake_tensor import FakeTensorMode
        return FakeTensorMode(allow_non_fake_inputs=True)

    @staticmethod
    @contextlib.contextmanager
    def quiet():
        """FakeTensorMode logs a traceback for a shape error even when it is caught: silence it."""
        import logging
        logger = logging.getLogger("torch._subclasses.fake_tensor")
        was_disabled, logger.disabled = logger.disabled, True
        try:
            yield
        finally:
            logger.disabled = was_disabled


# %% =============================================================================================
# 3. Timing and measuring primitives: one clock, one budget, one spread, the machine's load, the allocator
# ================================================================================================
# A learner's machine is rarely quiet.  Every measuring stage first calibrates (times a step or
# two), then plans its work to fit its budget (Budget.fits_in), then runs the plan whole: nothing is cut
# halfway.  All timing reads `CLOCK`, so tests drive budgets and plans with a fake clock instead of
# waiting.  Memory is read from the allocator itself (_PeakMemory): CUDA's caching allocator, or the
# CPU allocator's events through torch.profiler.


CLOCK = time.perf_counter


def _now():
    return CLOCK()


class Budget:
    """Seconds of wall time for one piece of work: what is left, a fair share of it, what fits."""
    MARGIN = 1.25  # planned work x this must fit its budget: a busy machine's steps vary by ~20 %

    def __init__(self, seconds):
        if isinstance(seconds, bool) or not (isinstance(seconds, (int, float)) and seconds > 0):
            raise ValueError(f"time_budget_s must be a positive number of seconds, got {seconds!r}")
        self.seconds, self.start = float(seconds), _now()

    def elapsed(self):
        return _now() - self.start

    def left(self):
        return max(self.seconds - self.elapsed(), 0.0)

    def share(self, parts):
        """An equal share of what is left among `parts` remaining pieces of work."""
        return self.left() / max(parts, 1)

    def fits(self, predicted_s, margin=1.0):
        """Whether predicted work fits what is left (planning passes margin=Budget.MARGIN)."""
        return self.fits_in(predicted_s, self.left(), margin)

    @staticmethod
    def fits_in(predicted_s, left_s, margin=None):
        """The one budget check: predicted work, times the margin a busy machine's variation
        needs (MARGIN by default), within the seconds left."""
        return predicted_s * (Budget.MARGIN if margin is None else margin) <= left_s


def _timed(device, fn, *args):
    """(fn(*args), seconds), with the device synchronised before and after: GPU work is
    asynchronous, so an unsynchronised clock measures only the launch."""
    sync = {"cuda": torch.cuda.synchronize, "mps": torch.mps.synchronize}.get(device.type, lambda: None)
    sync()
    start = _now()
    value = fn(*args)
    sync()
    return value, _now() - start


def time_stats(times):
    """Median and spread of measured seconds.

    The spread is the interquartile range from 4 runs on, and min-max below that (too few runs
    for quartiles); `spread_lo_s` / `spread_hi_s` bound it, `spread` says which it is.
    """
    median, lo, hi, kind, iqr = spread(times)
    return {"median_s": median, "iqr_s": iqr, "spread_lo_s": lo, "spread_hi_s": hi, "spread": kind,
            "runs": len(times), "times_s": [float(x) for x in times]}


def spread(values):
    """(median, low, high, kind, iqr) of measured values: the interquartile range from 4 values on,
    min-max below that (too few for quartiles).  The one median/spread calculation."""
    t = np.asarray(values, dtype=float)
    q25, q75 = np.percentile(t, [25, 75])
    lo, hi, kind = (q25, q75, "iqr") if len(t) >= 4 else (t.min(), t.max(), "min-max")
    return float(np.median(t)), float(lo), float(hi), kind, float(q75 - q25)


class Load:
    """How busy the machine is, and torch's threads fitted to it.

    On a busy machine every op waits at a barrier for a sibling thread that the scheduler has put
    aside: here a 2-thread training step went from 24 ms quiet to 3.8 s with four busy programs on
    two cores, and 70 ms with one thread.  So every stage samples what other processes use
    (/proc/stat), runs with the cores they leave free (fitted_threads), and records the
    conditions it ran under.
    """
    OTHERS_BUSY = 0.5  # other processes using half a core or more during a stage: a busy machine
    DEFAULT_THREADS = torch.get_num_threads()  # torch's own choice at import: one per physical core
    fitted = []  # thread counts to put back, one per open fitted_threads block (outermost first)

    @staticmethod
    def ticks():
        """(busy ticks of the whole machine, all ticks, the lab's own ticks) from /proc; None off Linux."""
        try:
            fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
        except (OSError, ValueError, IndexError):
            return None
        idle = fields[3] + fields[4]  # idle + iowait
        return sum(fields) - idle, sum(fields), Load.own_ticks()

    @staticmethod
    def own_ticks():
        """CPU ticks of this process and of every process it started, running or ended (the lab's
        ranks, its work beside a stage, its drawing process): they are not other programs' load."""
        import psutil
        try:
            pids = [os.getpid()] + [c.pid for c in psutil.Process().children(recursive=True)]
        except psutil.Error:
            pids = [os.getpid()]
        total = 0
        for pid in pids:
            with contextlib.suppress(OSError, ValueError, IndexError):
                stat = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
                total += sum(int(v) for v in stat[11:15])  # utime, stime, and the ended children's cutime, cstime
        return total

    @staticmethod
    def others_busy_cores(start, end):
        """Cores that processes other than the lab's kept busy between two ticks() (None if unknown)."""
        if not (start and end):
            return None
        busy, total, own = (e - s for e, s in zip(end, start))
        return max(busy - own, 0) / max(total, 1) * (os.cpu_count() or 1)

    @classmethod
    def now(cls):
        """The 1-minute load average, the cores, and a tick snapshot for conditions()."""
        try:
            load = round(os.getloadavg()[0], 2)
        except (OSError, AttributeError):  # Windows has no load average
            load = None
        cores = os.cpu_count() or 1
        return {"load_avg_1m": load, "cores": cores, "busy": load is not None and load > cores, "ticks": cls.ticks()}

    @classmethod
    def threads(cls, sample_s=0.05):
        """How many threads torch should use now: the cores other processes leave free, sampled over
        `sample_s`, at least 1 and at most torch's default.  Returns (threads, {"others_busy_cores",
        "free_cores"}); off Linux, torch's default."""
        start = cls.ticks()
        time.sleep(sample_s)
        others = cls.others_busy_cores(start, cls.ticks())
        if others is None:
            return cls.DEFAULT_THREADS, {"others_busy_cores": None, "free_cores": None}
        free = (os.cpu_count() or 1) - others
        return max(1, min(cls.DEFAULT_THREADS, int(free + 0.5))), {"others_busy_cores": round(others, 2),
                                                                   "free_cores": round(free, 2)}

    @classmethod
    @contextlib.contextmanager
    def fitted_threads(cls, count=None):
        """Torch's threads fitted to the load (threads()) inside the block, the caller's count put
        back after it.  Nested blocks keep what the outermost chose (a stage fits once for all it
        measures); `count` sets the number instead (--threads N)."""
        before = torch.get_num_threads()
        if not cls.fitted:
            torch.set_num_threads(count or cls.threads()[0])
        cls.fitted.append(before)
        try:
            yield
        finally:
            cls.fitted.pop()
            torch.set_num_threads(before)

    @classmethod
    def conditions(cls, start, budget=None):
        """What a stage ran under: the load average at its start and end, and the cores other
        processes kept busy meanwhile.  Busy: others used OTHERS_BUSY or more; where /proc is
        missing, a load average above the cores (it lags by a minute)."""
        end = cls.now()
        others = cls.others_busy_cores(start["ticks"], end["ticks"])
        others = None if others is None else round(others, 2)
        busy = others >= cls.OTHERS_BUSY if others is not None else bool(start["busy"] or end["busy"])
        out = {"load_start": {k: v for k, v in start.items() if k != "ticks"},
               "load_end": {k: v for k, v in end.items() if k != "ticks"},
               "others_busy_cores": others, "cores": end["cores"], "threads": torch.get_num_threads(), "busy": busy}
        if budget is not None:
            out.update(budget_s=budget.seconds, wall_s=budget.elapsed())
        return out


threads_for_load = Load.threads  # public: torch.set_num_threads(threads_for_load()[0]) in your own code


@functools.lru_cache(maxsize=None)
def _warm_up_torch(device=None):
    """Pay torch's one-time costs before a measuring budget starts: the first optimizer imports
    torch._dynamo (~1.8 s on a quiet 2-core CPU, ~7 s on a busy one), and autocast and
    checkpointing set themselves up on first use; on CUDA the first matmul in each dtype creates
    the cuBLAS handles and picks kernels (~0.2 s on an H200).  They are the process's, not the
    measurement's."""
    import torch.utils.checkpoint  # noqa: F401
    p = nn.Parameter(torch.zeros(2, 2))
    optimizer = torch.optim.Adam([p])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        (p @ p).float().sum().backward()
    optimizer.step()
    if device is not None and torch.device(device).type == "cuda":
        x = torch.randn(64, 64, device=device, requires_grad=True)
        for dtype in (None, torch.bfloat16, torch.float16):
            with contextlib.suppress(RuntimeError), torch.autocast("cuda", dtype=dtype, enabled=dtype is not None):
                (x @ x).float().sum().backward()
        torch.cuda.synchronize(device)


# --- the one measuring harness ---------------------------------------------------------------
# Every timed number of the lab comes from measure(): the matmul peak, the mixed-precision steps,
# latency, fusion (and _timed, its one-run primitive, for the training steps, whose count the
# training plan fixes).  NB: torch.utils.benchmark.Timer's blocked_autorange is the textbook way
# to time a kernel, and measure() follows it (warm up, synchronise, median and IQR of many runs);
# it is not used as such because its block-size search and its own warm-ups spend time no budget
# can plan (a 0.3 s step would be run ~5 times before the first measured block), it cannot skip a
# run that will not fit, and it loops forever on the injected test clock.  torch.utils.benchmark's
# synchronised clock is what _timed does: synchronise the device, read the clock, run,
# synchronise, read again.

MIN_RUNS, MAX_RUNS = 3, 10  # the fewest timed runs with a spread worth drawing; the median is stable by 10


def measure(fn, *args, device, budget_s, runs=(MIN_RUNS, MAX_RUNS), predicted_s=None, reserve_runs=0,
            what="run", always=False):
    """Time `fn(*args)` within `budget_s` seconds: the lab's one measuring harness.

    1. predicted_s (a cheap probe's guess per run), when given, must leave room for a warm-up,
       runs[0] timed runs and `reserve_runs` more (work the caller adds, e.g. a memory step);
       otherwise nothing runs and `skipped` says why.
    2. One warm-up run (allocator, kernel choice, caches); one far slower than predicted is
       paying one-time costs (3x or more): a second warm-up is judged instead.
    3. The warm-up must leave room for runs[0] timed runs (and the reserve), else skipped.
    4. The first timed run calibrates: as many runs as fit what is left (x Budget.MARGIN), from
       runs[0] to runs[1], all of them run.
    `always`: never skip (runs[0] timed runs whatever the budget says).  Returns time_stats
    (median_s, spread, runs, times_s) with warmup_s and skipped=None, or a skip:
    {"skipped": reason, "median_s": None, "runs": 0, ...}.
    """
    budget, fewest, most = Budget(max(budget_s, 1e-9)), runs[0], runs[1]  # a spent share is a zero share, no error

    def not_timed(reason, warm_s=None):
        return {"median_s": None, "iqr_s": None, "spread_lo_s": None, "spread_hi_s": None, "spread": None,
                "runs": 0, "times_s": [], "warmup_s": warm_s, "skipped": reason}
    if predicted_s is not None and not always and not budget.fits(predicted_s * (1 + fewest + reserve_runs),
                                                                   Budget.MARGIN):
        return not_timed(f"predicted {predicted_s * 1e3:.0f} ms per {what}: a warm-up and {fewest} timed runs "
                          f"need ~{predicted_s * (1 + fewest + reserve_runs):.1f} s, more than its {budget_s:.1f} s")
    warm_s = _timed(device, fn, *args)[1]
    if predicted_s is not None and warm_s > 3 * predicted_s and budget.fits(predicted_s * fewest):
        warm_s = _timed(device, fn, *args)[1]
    need = warm_s * (fewest + reserve_runs)  # an upper bound: a warm-up run is the slowest
    if not (always or budget.fits(need)):
        return not_timed(f"the warm-up {what} took {warm_s * 1e3:.0f} ms: {fewest} timed runs need ~{need:.1f} s, "
                          f"more than what is left of its {budget_s:.1f} s", warm_s)
    times = [_timed(device, fn, *args)[1]]
    planned = int(min(most, max(fewest, budget.left() // (times[0] * Budget.MARGIN) + 1)))
    times += [_timed(device, fn, *args)[1] for _ in range(planned - 1)]
    return {**time_stats(times), "warmup_s": warm_s, "skipped": None}


# --- the one stage runner --------------------------------------------------------------------

@dataclass
class StageRun:
    """What the stage runner hands a stage's lesson: where and how big to run, and a clock."""
    device: torch.device
    profile: Profile
    budget: Budget              # the whole stage's, started when the stage starts
    seed: int = 0
    progress: object = None     # progress(done, total, name), or None

    def report(self, done, total, name):
        if self.progress:
            self.progress(done, total, name)


def run_stage(lesson, *args, device=None, profile=DEFAULT, seed=0, progress=None, budget_s=None, threads=None,
              **reused):
    """Run one stage's `lesson(run, **reused)` the one way every stage runs: the device resolved,
    torch's one-time costs paid before the budget starts, the profile's budget started, threads
    fitted to the machine's load, the data seeded; the lesson's data gets `conditions` (load,
    threads, busy, budget and wall time).  `reused` is earlier stages' data, passed on by name;
    `budget_s` replaces the profile's budget for the stage, `threads` the fitted thread count."""
    profile = PROFILES.get(profile, profile) if isinstance(profile, str) else profile  # "quick" names QUICK
    if not isinstance(profile, Profile):
        raise (ValueError if isinstance(profile, str) else TypeError)(
            f"profile must be a Profile or one of {list(PROFILES)} (DEFAULT, QUICK), got {profile!r}")
    device = resolve_device(device, next((a for a in args if isinstance(a, nn.Module)), None))  # yours decides
    if lesson.measures:
        _warm_up_torch(device)
    seed_everything(seed)
    load_start, budget = Load.now(), Budget(budget_s or profile.budget_s(lesson.stage))
    with Load.fitted_threads(threads):
        data = lesson.body(StageRun(device, profile, budget, seed, progress), *args, **reused)
        data["conditions"] = Load.conditions(load_start, budget)
    return data


def stage(name, measures=True):
    """Make `body(run, **reused)` the stage `name`: called as fn(device=..., profile=..., seed=...,
    progress=..., **reused) it runs through run_stage (`measures`: it times something, so torch's
    one-time costs are paid first)."""
    def wrap(body):
        @functools.wraps(body)
        def staged(*args, **options):
            return run_stage(staged, *args, **options)
        staged.stage, staged.body, staged.measures = name, body, measures
        return staged
    return wrap


# --- the device's peak: square matmuls swept from small to large -----------------------------

def measure_peak_flops(device, precision="fp32", *, time_budget_s=DEFAULT.peak_s,
                       sizes=(512, 1024, 2048, 4096, 8192),  # the sweep stops early: the rate, or the budget
                       always_up_to=1024,  # measured whatever the budget: below it thread start-up and a busy
                                           # machine's stalls hide the peak (512: 11 GFLOP/s busy, 58 at 1024)
                       rise=1.05):  # a larger size must beat the best so far by 5 % to go on
    """The device's peak FLOP/s: the best rate over a sweep of square matmuls (2 n^3 FLOPs each).

    The denominator of MFU (PaLM, Appendix B), measured here rather than read from a data sheet.
    Each size is measured (measure) within an eighth of the budget, 3 to 10 runs; its rate is its
    fastest run (a peak is a best case).  The sweep goes up while the rate still rises by
    `rise`; past `always_up_to` it stops before a size whose predicted time ((n / previous n)^3 x
    the previous run, x 4) would not fit the budget.  One slow small run never ends it.  Low
    precisions run under autocast, as the training steps do.  Returns the rate, the size that
    reached it, every size's best/median/worst rate and repeats, and why the sweep stopped.
    """
    device = torch.device(device)
    budget = Budget(time_budget_s)
    sweep, stopped = [], "largest size reached"
    with _autocast(precision, device):
        for n in sizes:
            if sweep and n > always_up_to:
                predicted = sweep[-1]["best_s"] * (n / sweep[-1]["size"]) ** 3 * (MIN_RUNS + 1)
                if not budget.fits(predicted):
                    stopped = f"{n}x{n} (predicted {predicted:.2f} s) does not fit the budget"
                    break
            a = torch.randn(n, n, device=device)
            timed = measure(torch.matmul, a, a, device=device, budget_s=budget.seconds / 8, always=True)
            rates = sorted(FLOPS_PER_MAC * n ** 3 / max(t, 1e-9) for t in timed["times_s"])  # n^3 multiply-adds
            sweep.append({"size": n, "repeats": timed["runs"], "best_s": min(timed["times_s"]),
                          "best_flops_per_s": rates[-1], "median_flops_per_s": spread(rates)[0],
                          "worst_flops_per_s": rates[0]})
            best_before = max((s["best_flops_per_s"] for s in sweep[:-1]), default=0.0)
            if len(sweep) > 1 and rates[-1] < rise * best_before:
                stopped = f"the rate stopped rising at {n}x{n}"
                break
    best = max(sweep, key=lambda s: s["best_flops_per_s"])
    return {"flops_per_s": best["best_flops_per_s"], "precision": precision, "matmul_size": best["size"],
            "repeats": best["repeats"], "sweep": sweep, "stopped": stopped,
            "method": f"fastest of {best['repeats']} runs of {best['size']}x{best['size']} matmul, sizes "
                      f"{sweep[0]['size']}-{sweep[-1]['size']} swept, {precision}"}


def checked_utilisation(achieved_flops_per_s, peak, remeasure):
    """achieved / peak FLOP/s, never above 1.

    An achieved rate above the measured peak is impossible, so it means the peak was measured in a
    bad moment (a busy machine): `remeasure()` measures it once more and the better peak is kept.
    If the rate is still above it, the utilisation is None and `invalid` says why.  Returns
    (utilisation or None, the peak used, invalid reason or None).
    """
    if achieved_flops_per_s <= peak["flops_per_s"]:
        return achieved_flops_per_s / peak["flops_per_s"], peak, None
    again = remeasure()
    if again["flops_per_s"] > peak["flops_per_s"]:
        peak = {**again, "remeasured": True}
    if achieved_flops_per_s <= peak["flops_per_s"]:
        return achieved_flops_per_s / peak["flops_per_s"], peak, None
    return None, peak, (f"achieved {readable(achieved_flops_per_s, 'FLOP/s')} is above the measured peak "
                        f"{readable(peak['flops_per_s'], 'FLOP/s')} even after measuring the peak again")


def _matmul_slowdown(device, precision, size=256):
    """A size x size matmul under autocast vs fp32 (fastest of 3 runs each): a cheap predictor of
    a step's slowdown."""
    a = torch.randn(size, size, device=device)

    def fastest(ctx):
        with ctx:
            return min(measure(torch.matmul, a, a, device=device, budget_s=1e9, runs=(3, 3))["times_s"])
    return fastest(torch.autocast(device.type, dtype=AMP_DTYPES[precision])) / fastest(contextlib.nullcontext())


# --- the memory roof: STREAM's four kernels on arrays larger than the last-level cache ----------
# McCalpin's STREAM (1995): copy a = b, scale b = q*c, add c = a + b, triad a = b + q*c.  Bytes
# moved per element as STREAM counts them: 2, 2, 3 and 3 arrays (reads + writes; no write-allocate).
STREAM_KERNELS = {"copy": 2, "scale": 2, "add": 3, "triad": 3}  # name -> arrays moved per element
CACHE_MULTIPLE = 4          # each array >= 4x the last-level cache, so every pass goes to DRAM
UNKNOWN_CACHE_BYTES = 64 * MIB  # where the OS does not say: a size larger than any desktop CPU's L3 / 4


def last_level_cache_bytes(device=None):
    """(bytes, source) of the device's last-level cache: CUDA's L2 from its properties; on a CPU
    the highest cache level in /sys/devices/system/cpu/cpu0/cache (Linux); else (None, why)."""
    device = torch.device(device or "cpu")
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).L2_cache_size, "torch.cuda.get_device_properties (L2)"
    if device.type != "cpu":
        return None, f"the OS does not report {device.type}'s cache here"
    levels = []
    for index in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*"):
        with contextlib.suppress(OSError, ValueError):
            size = (index / "size").read_text().strip()
            scale = {"K": 1024, "M": MIB, "G": GIB}.get(size[-1], 1)
            levels.append((int((index / "level").read_text()), int(size.rstrip("KMG")) * scale))
    if not levels:
        return None, "no /sys/devices/system/cpu/cpu0/cache on this OS"
    level, size = max(levels)
    return size, f"L{level} from /sys/devices/system/cpu/cpu0/cache"


def measure_bandwidth(device=None, *, time_budget_s=DEFAULT.bandwidth_s, array_bytes=None):
    """The device's memory bandwidth in bytes/s: STREAM's copy, scale, add and triad on fp32 torch
    tensors of `array_bytes` each (default CACHE_MULTIPLE x the last-level cache), each kernel timed
    by measure() within a quarter of the budget (3 to 10 runs).

    A kernel's rate is its bytes moved (STREAM_KERNELS arrays x array_bytes) over a run's time; the
    roof is the best kernel's fastest run, as the compute roof is the fastest matmul run (a roof is
    a best case).  Returns bytes_per_s (the roof), its kernel, its median and spread, every
    kernel's rates, the array size and where the cache size came from."""
    device = resolve_device(device)
    if device.type == "meta":
        raise LabError("bandwidth is measured on a real device: cpu, cuda or mps, not meta")
    cache, source = last_level_cache_bytes(device)
    if array_bytes is None:
        array_bytes = CACHE_MULTIPLE * (cache or UNKNOWN_CACHE_BYTES)
        sizing = f"{CACHE_MULTIPLE} x {cache / MIB:g} MiB ({source})" if cache else \
            f"{UNKNOWN_CACHE_BYTES / MIB:g} MiB: {source}"
    else:
        sizing = "given (array_bytes)"
    n = max(int(array_bytes) // 4, 1)
    a, b, c = (torch.full((n,), v, device=device) for v in (1.0, 2.0, 0.5))
    q = 3.0
    kernels = {"copy": lambda: a.copy_(b), "scale": lambda: torch.mul(c, q, out=b),
               "add": lambda: torch.add(a, b, out=c), "triad": lambda: torch.add(b, c, alpha=q, out=a)}
    out = {}
    for name, fn in kernels.items():
        timed = measure(fn, device=device, budget_s=time_budget_s / len(kernels), always=True, what=name)
        moved = STREAM_KERNELS[name] * n * 4
        rates = sorted(moved / max(t, 1e-12) for t in timed["times_s"])
        median, lo, hi, kind, _ = spread(rates)
        out[name] = {"bytes_per_s": rates[-1], "median_bytes_per_s": median, "spread_lo": lo, "spread_hi": hi,
                     "spread": kind, "runs": timed["runs"], "bytes_moved": moved}
    roof = max(out, key=lambda k: out[k]["bytes_per_s"])
    return {"bytes_per_s": out[roof]["bytes_per_s"], "kernel": roof,
            "median_bytes_per_s": out[roof]["median_bytes_per_s"],
            "spread_lo": out[roof]["spread_lo"], "spread_hi": out[roof]["spread_hi"], "kernels": out,
            "array_bytes": n * 4, "cache_bytes": cache, "sizing": sizing, "dtype": "float32",
            "device": _device_name(device),
            "method": f"STREAM copy/scale/add/triad on fp32 arrays of {n * 4 / MIB:g} MiB; roof: fastest "
                      f"{roof} run of {out[roof]['runs']}"}


class _AllocatorPeak:
    """Reads the CPU allocator's own alloc/free events through torch.profiler (profile_memory=True)
    while the body runs, each with the allocator's running total after it: `peak_bytes` is the
    most allocated at once, counted from the start, and `end_bytes` what was still held at the
    end.  A source the storage tracker shares nothing with: it also sees memory no tensor reaches
    the dispatcher with (kernel scratch, oneDNN workspaces).

    Unavailable (`reason` says why, peaks stay None) when another profiler is running (torch
    cannot nest them) or kineto is missing from this torch build.
    """
    SOURCE = "CPU allocator events (torch.profiler, profile_memory=True)"  # a measurement's `method`
    MARK = "lab::mark"  # the name of mark()'s zero-length range

    @staticmethod
    @contextlib.contextmanager
    def quiet():
        """Kineto (torch.profiler's C++ side) writes "USDT ... profiler_start/stop" on every start and
        stop, and "ERROR ... gpuGetDeviceCount failed" on a CUDA build without a GPU, straight to the
        process's stderr: silenced (file descriptor 2) while the profiler starts and stops, only."""
        sys.stderr.flush()
        try:
            saved = os.dup(2)
        except OSError:  # no file descriptor 2 (some embedded interpreters): nothing to silence
            yield
            return
        try:
            with open(os.devnull, "w") as null:
                os.dup2(null.fileno(), 2)
                yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)

    def __init__(self):
        self.peak_bytes = self.end_bytes = self.reason = None
        self.marks = []  # (bytes held at each mark(), peak since the previous mark)
        self._prof = None

    @staticmethod
    def mark():
        """A point in time the totals are read at (a zero-length torch.profiler range)."""
        with torch.profiler.record_function(_AllocatorPeak.MARK):
            pass

    def __enter__(self):
        if torch._C._autograd._profiler_enabled():
            self.reason = "another torch.profiler session is running (profilers cannot nest)"
        elif not torch.autograd.kineto_available():
            self.reason = "this torch build has no kineto profiler"
        else:
            from torch.profiler import ProfilerActivity, profile
            self._prof = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
            with _AllocatorPeak.quiet():
                self._prof.__enter__()
        return self

    def __exit__(self, *exc):
        if self._prof is None:
            return False
        with _AllocatorPeak.quiet():
            self._prof.__exit__(*exc)
        if exc[0] is None:
            self.peak_bytes, self.end_bytes, self.marks = self.running_peak(self.events(self._prof))
        return False

    @staticmethod
    def count_every_thread():
        """Make the allocator's running total count frees on every thread; True when it could.

        The profiler records an allocation or a free only on a thread that carries its state.  gloo
        runs each collective on a worker thread that carries it only while the collective runs, then
        drops its reference to the collective's buffers; when that is the last one (a race with the
        main thread, a different one each run) the free goes unrecorded and the buffer looks held to
        the end: 0.5 to 18 MiB more on one rank here.  c10's CPU memory reporter keeps the total every
        event carries (`total_allocated`); with FLAGS_caffe2_report_cpu_memory_usage set it follows
        every block allocated from then on, whichever thread frees it.  NB: no Python API sets that
        flag: this writes libc10's exported global (c10/core/CPUAllocator.cpp, torch 2.14), for the
        rest of the process, so only the spawned ranks call it, first thing."""
        import ctypes
        lib = Path(torch.__file__).parent / "lib"
        for name in ("libc10.so", "libc10.dylib", "c10.dll"):
            with contextlib.suppress(OSError, ValueError):
                ctypes.c_bool.in_dll(ctypes.CDLL(str(lib / name)), "FLAGS_caffe2_report_cpu_memory_usage").value = True
                return True
        return False

    @staticmethod
    def events(prof):
        """(time, address, +bytes allocated / -bytes freed, the allocator's total after it), or
        (time, 0, None, None) at a mark, of the CPU allocator."""
        from torch._C._profiler import _EventType
        found, stack = [], list(prof.profiler.kineto_results.experimental_event_tree())
        while stack:
            node = stack.pop()
            stack.extend(node.children)
            if node.tag == _EventType.Allocation and node.extra_fields.device.type == "cpu":
                fields = node.extra_fields
                found.append((node.start_time_ns, fields.ptr, fields.alloc_size, fields.total_allocated))
            elif node.tag == _EventType.TorchOp and node.name == _AllocatorPeak.MARK:
                found.append((node.start_time_ns, 0, None, None))
        return sorted(found, key=lambda e: e[0])

    @staticmethod
    def running_peak(events):
        """(highest running total, final total, [(total, peak since the last) at each mark]) of
        (time, address, +/- bytes, allocator total) events, counted from the window's start.

        The running total is the allocator's own (see count_every_thread), so a free the events do
        not show still counts.  A free of a block allocated before the window (earlier garbage,
        collected now) is added back: it is not this window's memory."""
        live = peak = since = earlier = 0
        start, held, marks = None, set(), []
        for _, address, nbytes, total in events:
            if nbytes is None:
                marks.append((live, since))
                since = live
                continue
            start = total - nbytes if start is None else start
            if nbytes > 0:
                held.add(address)
            elif address in held:
                held.discard(address)
            else:
                earlier -= nbytes
            live = total - start + earlier
            peak, since = max(peak, live), max(since, live)
        return peak, live, marks


class _PeakMemory:
    """The allocator's peak while the block runs, counted from its start: CUDA's caching allocator
    (max_memory_allocated minus what was allocated before), or the CPU allocator's own events
    (_AllocatorPeak).  The one bracket every memory measurement uses.  `peak_bytes` stays None
    where neither can be read (MPS; a CPU whose profiler is busy), and `reason` says why."""
    CUDA_SOURCE = "CUDA caching allocator (max_memory_allocated)"

    def __init__(self, device):
        self.device, self.peak_bytes, self.reason, self.method = device, None, None, None
        self._cpu = _AllocatorPeak() if device.type == "cpu" else None

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self._before = torch.cuda.memory_allocated(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        elif self._cpu is not None:
            self._cpu.__enter__()
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak_bytes = torch.cuda.max_memory_allocated(self.device) - self._before
            self.method = self.CUDA_SOURCE
        elif self._cpu is not None:
            self._cpu.__exit__(*exc)
            self.peak_bytes, self.reason = self._cpu.peak_bytes, self._cpu.reason
            self.method = _AllocatorPeak.SOURCE if self.peak_bytes is not None else None
        else:
            self.reason = f"no allocator reading on {self.device.type}"
        return False


# %% =============================================================================================
# 4. The model zoo in one table
# ================================================================================================
# Small models written here, torchvision models built with weights=None (nothing downloaded).
# MODEL_ZOO is what the FLOP and dashboard figures compare; the memory and mixed-precision stages
# take the sizes of it that a laptop can run for real (MEMORY_MODELS, AMP_MODELS), the training
# comparison its own ResMLPClassifier.


def mlp(width=512, in_features=1024, classes=10):
    """The seed MLP, Linear(1024, w) -> Linear(w, w/2) -> Linear(w/2, 10), at any width."""
    return nn.Sequential(nn.Linear(in_features, width), nn.ReLU(), nn.Linear(width, width // 2),
                         nn.ReLU(), nn.Linear(width // 2, classes))


class MnistNet(nn.Module):
    """The CNN of PyTorch's MNIST example (pytorch/examples, mnist/main.py)."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 32, 3, 1)
        self.conv2 = nn.Conv2d(32, 64, 3, 1)
        self.dropout1 = nn.Dropout(0.25)
        self.dropout2 = nn.Dropout(0.5)
        self.fc1 = nn.Linear(9216, 128)  # 64 channels * 12 * 12 after one 2x2 max-pool
        self.fc2 = nn.Linear(128, 10)

    def forward(self, x):                                    # (B, 1, 28, 28)
        x = F.relu(self.conv2(F.relu(self.conv1(x))))        # (B, 64, 24, 24)
        x = self.dropout1(F.max_pool2d(x, 2)).flatten(1)     # (B, 9216)
        x = self.dropout2(F.relu(self.fc1(x)))
        return F.log_softmax(self.fc2(x), dim=1)


class KVCache:
    """The keys and values every layer has seen, kept so that generating one more token attends to
    them instead of recomputing them: per layer a (B, H, T, C/H) key and value, grown by
    concatenation as tokens arrive.  Holds B x T x layers x C x 2 numbers."""

    @staticmethod
    def formula_bytes(batch, tokens, layers, hidden, bytes_per_element):
        """The lecture's KV cache: a key and a value of `hidden` numbers per token, layer and sample."""
        return batch * tokens * layers * hidden * 2 * bytes_per_element

    def __init__(self, n_layer):
        self.layers = [None] * n_layer

    def __len__(self):  # tokens cached (in the first layer: the others catch up within a forward)
        return self.tokens(0)

    def tokens(self, layer):
        return 0 if self.layers[layer] is None else self.layers[layer][0].shape[2]

    def append(self, layer, k, v):
        """Add this step's keys and values to `layer`'s; return all of them."""
        if self.layers[layer] is not None:
            k = torch.cat((self.layers[layer][0], k), dim=2)
            v = torch.cat((self.layers[layer][1], v), dim=2)
        self.layers[layer] = (k, v)
        return k, v

    def nbytes(self):
        return sum(t.numel() * t.element_size() for kv in self.layers if kv for t in kv)


class CausalSelfAttention(nn.Module):
    def __init__(self, n_embd, n_head):
        super().__init__()
        self.n_head = n_head
        self.qkv = nn.Linear(n_embd, 3 * n_embd)
        self.proj = nn.Linear(n_embd, n_embd)

    def forward(self, x, cache=None, layer=0):              # (B, T, C); cache: KVCache of earlier tokens
        b, t, c = x.shape
        q, k, v = self.qkv(x).split(c, dim=2)
        q, k, v = (z.view(b, t, self.n_head, c // self.n_head).transpose(1, 2) for z in (q, k, v))
        past = cache.tokens(layer) if cache is not None else 0
        if cache is not None:
            k, v = cache.append(layer, k, v)                 # (B, H, past + T, C/H)
        if past == 0:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # (B, H, T, C/H)
        else:  # query i sees every cached token and the new ones up to itself
            mask = torch.ones(t, past + t, dtype=torch.bool, device=x.device).tril(diagonal=past)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.proj(y.transpose(1, 2).reshape(b, t, c))


class Block(nn.Module):
    """Pre-norm transformer block, as in nanoGPT."""

    def __init__(self, n_embd, n_head):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(n_embd), nn.LayerNorm(n_embd)
        self.attn = CausalSelfAttention(n_embd, n_head)
        self.mlp = nn.Sequential(nn.Linear(n_embd, 4 * n_embd), nn.GELU(), nn.Linear(4 * n_embd, n_embd))

    def forward(self, x, cache=None, layer=0):
        x = x + self.attn(self.ln1(x), cache, layer)
        return x + self.mlp(self.ln2(x))


class TinyGPT(nn.Module):
    """A small GPT: token + position embeddings, `n_layer` blocks, LM head tied to the embedding."""

    def __init__(self, vocab_size=1024, n_layer=4, n_embd=256, n_head=4, block_size=256):
        super().__init__()
        self.tok = nn.Embedding(vocab_size, n_embd)
        self.pos = nn.Embedding(block_size, n_embd)
        self.blocks = nn.ModuleList(Block(n_embd, n_head) for _ in range(n_layer))
        self.ln_f = nn.LayerNorm(n_embd)
        self.head = nn.Linear(n_embd, vocab_size, bias=False)
        self.head.weight = self.tok.weight  # weight tying: one parameter, counted once

    def forward(self, idx, cache=None):                      # (B, T) token ids; cache: KVCache or None
        past = len(cache) if cache is not None else 0
        positions = torch.arange(past, past + idx.shape[1], device=idx.device)
        x = self.tok(idx) + self.pos(positions)              # (B, T, C)
        for layer, block in enumerate(self.blocks):
            x = block(x) if cache is None else block(x, cache, layer)
        return self.head(self.ln_f(x))                       # (B, T, vocab)

    @torch.inference_mode()
    def generate(self, idx, new_tokens, *, use_cache=True, on_token=None):
        """Greedy decoding of `new_tokens` after the prompt `idx`; with `use_cache` each step runs
        only the newest token through the model and reads the rest from a KVCache.
        `on_token(step, cache)` is called after each token.  Returns (B, T + new_tokens) ids."""
        cache = KVCache(len(self.blocks)) if use_cache else None
        step_input = idx
        for step in range(new_tokens):
            logits = self(step_input if use_cache else idx, cache)
            token = logits[:, -1].argmax(dim=-1, keepdim=True)
            idx = torch.cat((idx, token), dim=1)
            step_input = token
            if on_token:
                on_token(step, cache)
        return idx


class LSTMClassifier(nn.Module):
    """Embedding -> 2-layer LSTM -> linear on the last hidden state: a text classifier."""

    def __init__(self, vocab_size=10000, embed=128, hidden=256, layers=2, classes=2):
        super().__init__()
        self.embed = nn.Embedding(vocab_size, embed)
        self.lstm = nn.LSTM(embed, hidden, num_layers=layers, batch_first=True)
        self.fc = nn.Linear(hidden, classes)

    def forward(self, idx):                                  # (B, T) token ids
        out, _ = self.lstm(self.embed(idx))                  # (B, T, H)
        return self.fc(out[:, -1])


class ResidualMLPBlock(nn.Module):
    """Pre-norm residual MLP block: x + W2 gelu(W1 LayerNorm(x)), as the MLP half of a transformer."""

    def __init__(self, width):
        super().__init__()
        self.ln = nn.LayerNorm(width)
        self.fc1 = nn.Linear(width, 4 * width)
        self.fc2 = nn.Linear(4 * width, width)

    def forward(self, x):
        return x + self.fc2(F.gelu(self.fc1(self.ln(x))))


class ResMLPClassifier(nn.Module):
    """28x28 images (or any 784 features) -> 10 classes through `depth` residual blocks.
    The blocks sit in one nn.Sequential: the unit that gradient checkpointing recomputes."""

    def __init__(self, in_features=784, width=256, depth=4, classes=10):
        super().__init__()
        self.embed = nn.Linear(in_features, width)
        self.blocks = nn.Sequential(*(ResidualMLPBlock(width) for _ in range(depth)))
        self.ln = nn.LayerNorm(width)
        self.head = nn.Linear(width, classes)

    def forward(self, x):                                    # (B, 784) or (B, 1, 28, 28)
        return self.head(self.ln(self.blocks(self.embed(x.flatten(1)))))


def _torchvision(name):
    def build():
        import torchvision
        return getattr(torchvision.models, name)(weights=None)  # weights=None: nothing downloaded
    return build


# name -> (kind, builder, inputs(batch)): the models every figure compares.
MODEL_ZOO = {
    "MLP-512": ("mlp", functools.partial(mlp, 512), lambda b: (b, 1024)),
    "MLP-2048": ("mlp", functools.partial(mlp, 2048), lambda b: (b, 1024)),
    "MLP-8192": ("mlp", functools.partial(mlp, 8192), lambda b: (b, 1024)),
    "MNIST-CNN": ("cnn", MnistNet, lambda b: (b, 1, 28, 28)),
    "ResNet-18": ("cnn", _torchvision("resnet18"), lambda b: (b, 3, 224, 224)),
    "ResNet-50": ("cnn", _torchvision("resnet50"), lambda b: (b, 3, 224, 224)),
    "MobileNetV2": ("cnn", _torchvision("mobilenet_v2"), lambda b: (b, 3, 224, 224)),
    "EfficientNet-B0": ("cnn", _torchvision("efficientnet_b0"), lambda b: (b, 3, 224, 224)),
    "ViT-B/16": ("transformer", _torchvision("vit_b_16"), lambda b: (b, 3, 224, 224)),
    "TinyGPT": ("transformer", TinyGPT, lambda b: torch.zeros(b, 256, dtype=torch.long)),
    # the LSTM: meta counting is per time step
    "LSTM-Classifier": ("rnn", LSTMClassifier, lambda b: torch.zeros(b, 64, dtype=torch.long)),
}
# --quick: the cheapest models to count op by op (the LSTM costs ~6 ms per time step on meta)


def build_model(name, device="meta"):
    """Build a zoo model directly on `device` (on "meta" its weights take no memory)."""
    kind, builder, _ = MODEL_ZOO[name]
    with torch.device(device):
        return builder()


# name -> (builder, inputs(batch)): the models of the memory figure, small enough to measure.
MEMORY_MODELS = {
    "MLP-2048": (functools.partial(mlp, 2048), lambda b: (b, 1024)),
    "MNIST-CNN": (MnistNet, lambda b: (b, 1, 28, 28)),
    "ResNet-18 (64px)": (_torchvision("resnet18"), lambda b: (b, 3, 64, 64)),
    "TinyGPT (T=64)": (TinyGPT, lambda b: torch.zeros(b, 64, dtype=torch.long)),
}


# name -> (builder, inputs(batch)) for the mixed-precision figure: sizes from tiny to a few M params.
AMP_MODELS = {  # a 2x128 TinyGPT: the 4x256 one's ~0.4 s step left it no room in the default run's budget
    "MLP-1024": (functools.partial(mlp, 1024), lambda b: (b, 1024)),
    "MLP-4096": (functools.partial(mlp, 4096), lambda b: (b, 1024)),
    "TinyGPT 2x128 (T=64)": (functools.partial(TinyGPT, n_layer=2, n_embd=128, n_head=2),
                             lambda b: torch.zeros(b, 64, dtype=torch.long)),
}


# %% =============================================================================================
# 5. FLOP counting
# ================================================================================================
# MAC formulas return multiply-adds for the matmul-class ops; "other" formulas return FLOPs
# directly (one per elementwise operation).  One registry (_FORMULAS) holds every op's formula, its
# kind and its work class.


WORK_CLASSES = ("linear/matmul", "conv", "attention", "RNN")  # what kind of matmul-class work an op is


class Formula(NamedTuple):
    """One registry entry: how an aten op is priced.

    kind: "macs" (fn returns multiply-adds), "other" (fn returns FLOPs) or "by_call" (fn returns
    (kind, amount): the kind depends on the arguments); work: its WORK_CLASSES entry when it does
    matmul-class work; extra: for a fused kernel that hides elementwise work behind one op, a
    function returning those "other" FLOPs, counted beside the op's multiply-adds."""
    kind: str
    fn: object
    work: str = "linear/matmul"
    extra: object = None


_FORMULAS = {}  # aten op name -> Formula: the one registry every count reads


def _register(kind, *op_names, work="linear/matmul", extra=None):
    """Register `formula` for aten ops by name (names, not objects: older torch lacks some ops)."""
    if work not in WORK_CLASSES:
        raise ValueError(f"work must be one of {WORK_CLASSES}, got {work!r}")

    def decorator(fn):
        for name in op_names:
            if name in _FORMULAS:
                raise RuntimeError(f"a formula for aten.{name} is already registered")
            _FORMULAS[name] = Formula(kind, fn, work, extra)
        return fn
    return decorator


macs_formula = functools.partial(_register, "macs")
other_formula = functools.partial(_register, "other")


def _numel(shape):
    return math.prod(shape)


@macs_formula("mm")
def mm_macs(a, b, *args, **kwargs) -> int:
    """(m, k) @ (k, n): m*k*n multiply-adds."""
    return a.shape[0] * a.shape[1] * b.shape[1]


@macs_formula("addmm", "_addmm_activation")
def addmm_macs(bias, a, b, *args, **kwargs) -> int:
    """bias + a @ b: the matmul only (bias adds not counted)."""
    return mm_macs(a, b)


# NB: bmm and baddbmm are classed as attention: in these models they are its score and value
# products (a bmm written elsewhere is classed the same).
@macs_formula("bmm", work="attention")
def bmm_macs(a, b, *args, **kwargs) -> int:
    """(B, m, k) @ (B, k, n): B*m*k*n."""
    return a.shape[0] * a.shape[1] * a.shape[2] * b.shape[2]


@macs_formula("baddbmm", work="attention")
def baddbmm_macs(bias, a, b, *args, **kwargs) -> int:
    return bmm_macs(a, b)


@macs_formula("mv", "addmv")
def mv_macs(*args, **kwargs) -> int:
    """(m, k) @ (k,): m*k.  addmv(bias, mat, vec) shares the formula."""
    mat, vec = (args[0], args[1]) if args[0].dim() == 2 else (args[1], args[2])
    return mat.shape[0] * vec.shape[0]


@macs_formula("dot", "vdot")
def dot_macs(a, b, *args, **kwargs) -> int:
    return a.shape[0]


def _conv_macs(x_shape, w_shape, out_shape, transposed) -> int:
    """Every output element of a conv is a dot product over (C_in/groups) * kernel elements.

    For a transposed conv the roles swap: every *input* element is scattered over
    (C_out/groups) * kernel outputs (as in torch/utils/flop_counter.py conv_flop_count).
    """
    per_element = w_shape[1] * _numel(w_shape[2:])
    return (_numel(x_shape) if transposed else _numel(out_shape)) * per_element


@macs_formula("convolution", "_convolution", work="conv")
def conv_macs(x, w, bias, stride, padding, dilation, transposed, *args, out=None, **kwargs) -> int:
    return _conv_macs(x.shape, w.shape, out.shape, transposed)


@macs_formula("convolution_backward", work="conv")
def conv_backward_macs(grad_out, x, w, bias_sizes, stride, padding, dilation, transposed,
                       output_padding, groups, output_mask, *args, **kwargs) -> int:
    """grad_input and grad_weight each cost one forward conv (flop_counter.py conv_backward_flop)."""
    forward = _conv_macs(x.shape, w.shape, grad_out.shape, transposed)
    return forward * (int(output_mask[0]) + int(output_mask[1]))


def _sdpa_macs(q, k, v) -> int:
    """softmax(q @ k^T) @ v with q (B, Hq, L, E), k (B, Hkv, S, E), v (B, Hkv, S, Ev)."""
    b, h, l, e = q.shape
    s, ev = k.shape[-2], v.shape[-1]
    return b * h * l * s * e + b * h * l * s * ev  # scores + weighted sum of values


@macs_formula("_scaled_dot_product_flash_attention_for_cpu",
              "_scaled_dot_product_flash_attention",
              "_scaled_dot_product_efficient_attention",
              "_scaled_dot_product_cudnn_attention", work="attention")
def sdpa_macs(q, k, v, *args, **kwargs) -> int:
    return _sdpa_macs(q, k, v)


@macs_formula("_scaled_dot_product_flash_attention_for_cpu_backward",
              "_scaled_dot_product_flash_attention_backward",
              "_scaled_dot_product_efficient_attention_backward",
              "_scaled_dot_product_cudnn_attention_backward", work="attention")
def sdpa_backward_macs(grad_out, q, k, v, *args, **kwargs) -> int:
    """Recompute scores, then grad_scores, grad_v, grad_q, grad_k: flop_counter.py's 5 bmms."""
    b, h, l, e = q.shape
    s, ev = k.shape[-2], v.shape[-1]
    return b * h * l * s * (2 * e + 2 * ev + e)


# NB: a fused layer that mixes classes: the q/k/v and output projections are linear work, but the
# whole op is classed as attention (one op, one class).
@macs_formula("_native_multi_head_attention", work="attention")
def mha_fastpath_macs(q, k, v, embed_dim, num_heads, qkv_weight, qkv_bias, proj_weight,
                      *args, **kwargs) -> int:
    """nn.MultiheadAttention's eval fast path: q/k/v projections, attention, out projection."""
    b, l, e = q.shape
    s = k.shape[1]
    projections = b * l * e * e + 2 * b * s * e * e + b * l * e * e
    return projections + 2 * b * l * s * e  # scores and weighted values over all heads


# NB: a fused layer that mixes classes: self-attention (projections and scores) and the FFN; the
# whole op is classed as linear/matmul, where most of its multiply-adds are at the zoo's sizes.
@macs_formula("_transformer_encoder_layer_fwd")
def encoder_fastpath_macs(src, embed_dim, num_heads, qkv_weight, qkv_bias, proj_weight,
                          proj_bias, use_gelu, norm_first, eps, nw1, nb1, nw2, nb2,
                          ffn_weight_1, *args, **kwargs) -> int:
    """nn.TransformerEncoderLayer's eval fast path: self-attention plus the two FFN linears."""
    b, l, e = src.shape
    ffn = 2 * b * l * e * ffn_weight_1.shape[0]
    return mha_fastpath_macs(src, src, src, embed_dim, num_heads, qkv_weight, qkv_bias,
                             proj_weight) + ffn


def _rnn_weight_macs(x, weights) -> int:
    """Each time step multiplies every weight matrix (W_ih and W_hh) once per sequence."""
    steps_times_batch = x.shape[0] * x.shape[1] if x.dim() == 3 else x.shape[0]
    return steps_times_batch * sum(w.numel() for w in weights if w.dim() == 2)


LSTM_GATE_FLOPS_PER_UNIT = 13  # 5 adds, 3 sigmoid, 2 tanh, 3 mul: the ops torch's decomposed LSTM cell runs
LSTM_MODE = 2                  # the `mode` argument of mkldnn_rnn_layer for an LSTM (RNN_RELU 0, RNN_TANH 1, GRU 3)


def lstm_gate_flops(x, w_ih, w_hh, b_ih, b_hh, hx, cx, reverse, batch_sizes, mode, *args, **kwargs) -> int:
    """The elementwise gate work hidden inside the fused CPU LSTM layer, per hidden unit per step,
    priced as the same layer decomposed into aten ops is (so fake, meta and real counts agree)."""
    if int(mode) != LSTM_MODE:
        return 0
    return LSTM_GATE_FLOPS_PER_UNIT * w_hh.shape[-1] * (x.numel() // x.shape[-1])


# NB: a fused kernel that hides elementwise work behind one op: its gate FLOPs are `extra`, counted
# as "other" beside the layer's multiply-adds.  The backward kernels' elementwise work is not counted.
@macs_formula("mkldnn_rnn_layer", work="RNN", extra=lstm_gate_flops)
def mkldnn_rnn_macs(x, w_ih, w_hh, b_ih, b_hh, *args, **kwargs) -> int:
    """The CPU (oneDNN) LSTM/GRU layer: T*B*(W_ih + W_hh) multiply-adds."""
    return _rnn_weight_macs(x, [w_ih, w_hh])


@macs_formula("_cudnn_rnn", work="RNN")
def cudnn_rnn_macs(x, weights, *args, **kwargs) -> int:
    """The cuDNN RNN over all layers and directions: T*B*(sum of weight matrices)."""
    return _rnn_weight_macs(x, weights)


@macs_formula("mkldnn_rnn_layer_backward", "_cudnn_rnn_backward", work="RNN")
def rnn_backward_macs(x, w1, w2, *args, **kwargs) -> int:
    """NB: grad wrt inputs/hidden and grad wrt weights: 2x the forward (an approximation)."""
    weights = w1 if isinstance(w1, (list, tuple)) else [w1, w2]
    return 2 * _rnn_weight_macs(x, weights)


# --- other FLOPs: per-element conventions. NB: these are rough by nature (an exp is not one
# multiply); they are kept apart from `flops` for exactly that reason.
NORM_FLOPS_PER_ELEMENT = 5      # mean, subtract, variance, normalise, scale-and-shift
SOFTMAX_FLOPS_PER_ELEMENT = 5   # max, subtract, exp, sum, divide


@other_formula("sum", "mean", "amax", "amin", "max", "min", "var",
               "var_mean", "std", "prod", "norm", "linalg_vector_norm",
               "logsumexp", "argmax", "argmin", "nll_loss_forward",
               "_adaptive_avg_pool2d", "adaptive_max_pool2d",
               "_adaptive_avg_pool2d_backward", "embedding_dense_backward",
               "nll_loss_backward", "max_pool2d_with_indices_backward",
               "avg_pool2d_backward", "mse_loss", "mse_loss_backward")
def reduction_flops(x, *args, **kwargs) -> int:
    """One operation per input element."""
    return x.numel()


@other_formula("threshold_backward", "hardtanh_backward", "gelu_backward",
               "silu_backward", "sigmoid_backward", "tanh_backward",
               "hardswish_backward", "hardsigmoid_backward", "leaky_relu_backward",
               "elu_backward", "native_dropout_backward")
def activation_backward_flops(grad, *args, **kwargs) -> int:
    """One operation per gradient element (these backward ops carry no pointwise tag)."""
    return grad.numel()


@other_formula("eq", "ne", "lt", "gt", "le", "ge", "where",
               "native_dropout", "hardswish", "_prelu_kernel", "glu", "log_sigmoid_forward")
def untagged_elementwise_flops(*args, out=None, **kwargs) -> int:
    """One operation per output element, for elementwise ops without the pointwise tag."""
    return _first_output_numel(out)


def _first_output_numel(out):
    first = out[0] if isinstance(out, (tuple, list)) else out
    return first.numel() if isinstance(first, torch.Tensor) else 0


@other_formula("_softmax", "_safe_softmax", "_log_softmax",
               "_softmax_backward_data", "_log_softmax_backward_data")
def softmax_flops(x, *args, **kwargs) -> int:
    return SOFTMAX_FLOPS_PER_ELEMENT * x.numel()


@other_formula("native_layer_norm", "native_batch_norm", "_native_batch_norm_legit",
               "_native_batch_norm_legit_functional", "_native_batch_norm_legit_no_training",
               "native_group_norm", "native_layer_norm_backward",
               "native_batch_norm_backward", "native_group_norm_backward",
               "_fused_rms_norm", "_fused_rms_norm_backward")
def norm_flops(x, *args, **kwargs) -> int:
    if not isinstance(x, torch.Tensor):  # the backward ops take grad_out first; same size
        x = args[0]
    return NORM_FLOPS_PER_ELEMENT * x.numel()


@other_formula("max_pool2d_with_indices", "avg_pool2d", "max_pool3d_with_indices",
               "avg_pool3d")
def pool_flops(x, kernel_size, *args, out=None, **kwargs) -> int:
    """One comparison/add per window element for each output element."""
    window = _numel(kernel_size) if len(kernel_size) > 1 else kernel_size[0] ** (x.dim() - 2)
    return _numel(out[0].shape if isinstance(out, tuple) else out.shape) * window


# Interpolation: weighted neighbours per output element, as fvcore's jit_handles price
# upsample (nearest 1, bilinear 4); linear 2, tricubic 64 and bicubic 16 follow the same rule
# (2, 4, 8 neighbours per dimension).  The backward ops scatter the same weights: per grad_input element.
INTERPOLATION_NEIGHBOURS = {"nearest": 1, "linear": 2, "bilinear": 4, "trilinear": 8, "bicubic": 16}


def interpolate_flops(x, *args, out=None, neighbours=1, **kwargs) -> int:
    """Neighbours weighted per output element (F.interpolate / nn.Upsample); a backward op per
    element of the gradient it returns."""
    return _first_output_numel(out) * neighbours


for _op in ("upsample_nearest1d", "upsample_nearest2d", "upsample_nearest3d", "_upsample_nearest_exact1d",
            "_upsample_nearest_exact2d", "_upsample_nearest_exact3d", "upsample_linear1d", "upsample_bilinear2d",
            "_upsample_bilinear2d_aa", "upsample_bicubic2d", "_upsample_bicubic2d_aa", "upsample_trilinear3d"):
    for _name in (_op, _op + "_backward"):
        other_formula(_name)(functools.partial(interpolate_flops, neighbours=INTERPOLATION_NEIGHBOURS[
            next(k for k in ("trilinear", "bilinear", "bicubic", "linear", "nearest") if k in _op)]))


@other_formula("grid_sampler_2d", "cudnn_grid_sampler")
def grid_sampler_flops(x, grid, interpolation_mode=0, *args, out=None, **kwargs) -> int:
    """F.grid_sample: bilinear (mode 0) weighs 4 neighbours per output element, nearest (1) takes
    one, bicubic (2) weighs 16 (the interpolation formulas in PyTorch's grid_sample docs)."""
    return _first_output_numel(out) * {0: 4, 1: 1, 2: 16}.get(int(interpolation_mode), 4)


@other_formula("roi_align")
def roi_align_flops(x, rois, spatial_scale, pooled_height, pooled_width, sampling_ratio, *args, out=None,
                    **kwargs) -> int:
    """torchvision.ops.roi_align: each output bin averages sampling_ratio^2 bilinear samples of 4
    neighbours (He et al. 2017, Mask R-CNN, Sec. 3).  NB: an adaptive ratio (-1) depends on each
    box's size, which is data: counted as 2, the value Mask R-CNN uses."""
    ratio = int(sampling_ratio) if int(sampling_ratio) > 0 else 2
    return _first_output_numel(out) * ratio * ratio * 4


def embedding_bag_cost(weight, indices, offsets=None, scale_grad_by_freq=False, mode=0, sparse=False,
                       per_sample_weights=None, *args, **kwargs):
    """nn.EmbeddingBag: a weighted sum with per_sample_weights is one multiply-add per looked-up
    element; sum/mean/max without weights are reductions, one FLOP per element (mean's divides are
    per bag and not counted).  Returns (kind, amount): the kind depends on the arguments."""
    elements = indices.numel() * weight.shape[-1]
    return ("macs", elements) if per_sample_weights is not None else ("other", elements)


def _embedding_bag_backward_cost(weights_at):
    """The gradient of an EmbeddingBag scatters one value per looked-up element: a multiply-add
    with per_sample_weights, one FLOP without.  `weights_at`: where the op's schema puts them
    among the arguments after (grad, indices)."""
    def cost(grad, indices, *args, **kwargs):
        weights = kwargs.get("per_sample_weights", args[weights_at] if len(args) > weights_at else None)
        elements = indices.numel() * grad.shape[-1]
        return ("macs", elements) if weights is not None else ("other", elements)
    return cost

# Formulas whose kind depends on the call (a weighted bag is multiply-adds, a plain one a reduction)
_register("by_call", "_embedding_bag", "_embedding_bag_forward_only")(embedding_bag_cost)

_register("by_call", "_embedding_bag_backward")(_embedding_bag_backward_cost(8))

_register("by_call", "_embedding_bag_dense_backward")(_embedding_bag_backward_cost(6))


class _CountingMode(TorchDispatchMode):
    """Dispatch mode that prices every op with the registry (_FORMULAS), counts the bytes it
    moves, and attributes it to the modules being called (tracking).  `set_phase` and
    `mark_gradients` let training_step drive it as a tracker: its optimizer phase is counted too.

    Bytes beside FLOPs (tensor_bytes, moved_bytes), by the convention of
    torch/utils/_runtime_estimation.py (get_num_bytes, get_transfer_time): an op reads every tensor
    it takes and writes every tensor it returns, each counted at its size, and a broadcast
    (stride-0) dimension counted once.  Views move nothing.  Copies (clone, copy_, _to_copy, cat,
    contiguous, gathers, fills) move their bytes and do no FLOPs.  NB: it is a model of DRAM
    traffic, not a measurement: it ignores caches (a tensor read twice while it still sits in
    cache is counted twice) and counts copy_'s destination as read too (3 tensors where 2 move).
    """

    OP_CLASSES = WORK_CLASSES + ("elementwise/other", "copies", "optimizer")  # every op of a step is one of these

    @staticmethod
    def intensity(flops, moved_bytes):
        """Arithmetic intensity: FLOPs per byte moved (None when nothing moved)."""
        return flops / moved_bytes if moved_bytes else None

    # Ops that move or create data without arithmetic: neither counted nor "unsupported".
    ZERO_COST = {
        "detach", "clone", "copy_", "_to_copy", "empty", "empty_like", "empty_strided", "zeros",
        "zeros_like", "ones", "ones_like", "full", "full_like", "fill_", "zero_", "new_empty",
        "new_empty_strided", "new_zeros", "new_ones", "new_full", "arange", "cat", "stack",
        "embedding", "index_select", "gather", "lift_fresh", "lift_fresh_copy", "constant_pad_nd",
        "scalar_tensor", "_local_scalar_dense", "_unsafe_view", "contiguous", "index", "index_put_",
        "scatter", "scatter_", "masked_fill_", "masked_fill", "uniform_", "normal_", "bernoulli_",
        "randn", "rand", "randint", "randperm", "resize_", "set_", "_assert_async", "sym_size",
        "sym_numel", "sym_stride", "sym_storage_offset", "is_same_size",
        "_has_compatible_shallow_copy_type", "device", "layout", "dtype",  # prim queries fake tensors answer
        "split_with_sizes_copy", "unbind_copy", "tril", "triu", "flip", "roll", "repeat",
        "_pin_memory", "unsafe_split", "unsafe_split_with_sizes", "unsafe_chunk", "select_backward",
        "slice_backward", "select_scatter", "slice_scatter", "as_strided_scatter", "index_add_", "index_put",
    }

    NO_TRAFFIC = {  # create or describe a tensor without touching its elements (beside the views)
        "detach", "lift_fresh", "_unsafe_view", "alias", "empty", "empty_like", "empty_strided", "new_empty",
        "new_empty_strided", "resize_", "set_", "_assert_async", "sym_size", "sym_numel", "sym_stride",
        "sym_storage_offset", "is_same_size", "_has_compatible_shallow_copy_type", "device", "layout", "dtype",
        "_local_scalar_dense",
    }

    @staticmethod
    def tensor_bytes(t):
        """Bytes an op moves for tensor `t`: its elements x element size, a stride-0 (broadcast)
        dimension counted once (torch/utils/_runtime_estimation.py, get_num_bytes)."""
        if t.is_contiguous():
            return t.numel() * t.element_size()
        elements = 1
        for size, stride in zip(t.shape, t.stride()):
            if stride or size == 0:
                elements *= size
        return elements * t.element_size()

    @staticmethod
    def moved_bytes(values):
        """Bytes of every tensor in `values`, one level into lists (cat, the _foreach_ ops): a loop,
        not a pytree flatten, because it runs on every op."""
        total = 0
        for v in values:
            if isinstance(v, torch.Tensor):
                total += _CountingMode.tensor_bytes(v)
            elif isinstance(v, (list, tuple)):
                for x in v:
                    if isinstance(x, torch.Tensor):
                        total += _CountingMode.tensor_bytes(x)
        return total

    @staticmethod
    def class_totals(ops):
        """{op class: {"flops", "bytes", "calls", "intensity"}} from a _CountingMode's `ops`."""
        totals = {}
        for (op_class, _), (flops, moved, calls) in ops.items():
            t = totals.setdefault(op_class, {"flops": 0, "bytes": 0, "calls": 0})
            t["flops"], t["bytes"], t["calls"] = t["flops"] + flops, t["bytes"] + moved, t["calls"] + calls
        for t in totals.values():
            t["intensity"] = _CountingMode.intensity(t["flops"], t["bytes"])
        return {c: totals[c] for c in _CountingMode.OP_CLASSES if c in totals}

    class Plan(NamedTuple):
        """What _CountingMode decided once for an op overload (cached: ops repeat thousands of times)."""
        name: str             # the aten op's name (by_operator's key)
        entry: object         # the Formula of the op or its in-place twin, or None
        extra: object         # the op's own fused-elementwise extra formula, or None
        kind: str             # "formula", "zero", "pointwise" or "unsupported"
        moves: bool           # reads or writes elements (False: views, empties, queries)
        op_class: str         # _CountingMode.OP_CLASSES entry outside an RNN module and the optimizer

    _plans = {}  # op overload -> _CountingMode.Plan, shared by every counting run

    def __init__(self):
        super().__init__()
        self.phase = "forward"
        self.macs = Counter()          # phase -> matmul-class multiply-adds
        self.flops = Counter()         # phase -> the same work in FLOPs (FLOPS_PER_MAC x macs)
        self.other = Counter()         # phase -> other FLOPs
        self.bytes = Counter()         # phase -> bytes read and written
        self.by_operator = Counter()   # forward op name -> FLOPs (matmul-class and other)
        self.by_module = Counter()     # module name -> forward matmul-class FLOPs
        self.by_class = Counter()      # WORK_CLASSES entry -> forward matmul-class FLOPs
        self.unsupported = Counter()   # op name -> calls
        self.module_stack = []         # (name, module) of the modules being called
        self.ops = {}                  # (op class, op name) -> [FLOPs, bytes, calls], every phase

    def set_phase(self, phase):
        self.phase = phase

    def mark_gradients(self, parameters):
        pass

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        plan = self._plans.get(func) or self._plan(func)
        phase, flops = self.phase, 0
        kind, amount = self._price(plan, args, kwargs, out)
        if plan.extra is not None:
            extra = int(plan.extra.extra(*args, **kwargs))
            self.other[phase] += extra
            flops += extra
            if phase == "forward":
                self.by_operator[plan.name] += extra
        if kind == "unsupported":
            self.unsupported[plan.name] += 1
        elif kind == "other":
            self.other[phase] += amount
            flops += amount
            if phase == "forward":
                self.by_operator[plan.name] += amount
        elif kind == "macs":
            mac_flops = FLOPS_PER_MAC * amount  # the lab's one conversion of multiply-adds into FLOPs
            flops += mac_flops
            self.macs[phase] += amount
            self.flops[phase] += mac_flops
            if phase == "forward":
                self._attribute_forward(plan, mac_flops)
        moved = (self.moved_bytes(args) + self.moved_bytes(kwargs.values()) + self.moved_bytes((out,))
                 if plan.moves else 0)
        self.bytes[phase] += moved
        op_class = "optimizer" if phase == "optimizer" else self._class_here(plan, kind)
        record = self.ops.get((op_class, plan.name))
        if record is None:
            record = self.ops[(op_class, plan.name)] = [0, 0, 0]
        record[0] += flops
        record[1] += moved
        record[2] += 1
        return out

    def _attribute_forward(self, plan, flops):
        self.by_operator[plan.name] += flops
        for module_name in dict.fromkeys(name for name, _ in self.module_stack):
            self.by_module[module_name] += flops
        self.by_class[self._work_here(plan)] += flops

    def _work_here(self, plan):
        innermost = self.module_stack[-1][1] if self.module_stack else None
        # inside an RNN module (an RNN decomposed into matmuls) the work is RNN work
        return "RNN" if isinstance(innermost, nn.RNNBase) else plan.entry.work if plan.entry else "linear/matmul"

    def _class_here(self, plan, kind):
        return self._work_here(plan) if kind == "macs" else plan.op_class

    @staticmethod
    def _price(plan, args, kwargs, out):
        """(kind, amount) for one call of a planned op: kind in {"macs", "other", "zero", "unsupported"}.
        An op called with `out=` is priced on the same arguments (the output is `out` either way)."""
        if plan.kind == "formula":
            entry = plan.entry
            if "out" in kwargs:
                kwargs = {k: v for k, v in kwargs.items() if k != "out"}
            amount = entry.fn(*args, **kwargs, out=out)
            kind, amount = amount if entry.kind == "by_call" else (entry.kind, amount)
            return kind, int(amount)
        if plan.kind == "pointwise":  # one FLOP per output element
            return "other", _first_output_numel(out)
        return plan.kind, 0

    @classmethod
    def _plan(cls, func):
        """Decide once per overload how it is priced: its formula (or its in-place twin's: `relu_`
        costs what `relu` does), zero cost (views, _CountingMode.ZERO_COST, *_copy), pointwise, or unsupported."""
        name = func.overloadpacket.__name__
        twin = name[:-1] if name.endswith("_") and not name.endswith("__") and (
            name[:-1] in _FORMULAS or cls.pointwise(name[:-1])) else name  # `_private` names stay
        entry, extra = _FORMULAS.get(twin), _FORMULAS.get(name)
        if entry is not None:
            kind = "formula"
        elif func.is_view or name in _CountingMode.ZERO_COST or name.endswith("_copy"):
            kind = "zero"
        elif torch.Tag.pointwise in func.tags or cls.pointwise(twin):
            kind = "pointwise"
        else:
            kind = "unsupported"
        moves = not (func.is_view or name in _CountingMode.NO_TRAFFIC)
        op_class = ("copies" if kind == "zero" and moves else
                    entry.work if entry is not None and entry.kind == "macs" else "elementwise/other")
        plan = _CountingMode.Plan(name, entry, extra if extra is not None and extra.extra is not None else None, kind,
                       moves, op_class)
        cls._plans[func] = plan
        return plan

    @staticmethod
    @functools.lru_cache(maxsize=None)
    def pointwise(name):
        """Whether aten.`name` carries the pointwise tag (one FLOP per output element)."""
        packet = getattr(torch.ops.aten, name, None)
        overload = getattr(packet, "default", None) if packet is not None else None
        return overload is not None and torch.Tag.pointwise in overload.tags

    @contextlib.contextmanager
    def tracking(self, model):
        """Keep module_stack in step with `model`'s module calls, via global hooks removed on exit."""
        names = {}
        for name, module in model.named_modules():
            names.setdefault(id(module), name)

        def pre(module, args):
            self.module_stack.append((names.get(id(module), type(module).__name__), module))

        def post(module, args, output):
            if self.module_stack:
                self.module_stack.pop()

        handles = [nn.modules.module.register_module_forward_pre_hook(pre),
                   nn.modules.module.register_module_forward_hook(post, always_call=True)]
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()


class FLOPCalculator:
    """Count FLOPs (2 per multiply-add), MACs and parameters of any nn.Module.

    Counting runs on fake tensors of the model's device by default (mode "meta": no data, no
    memory, CPU for a model on meta): a replica of the model whose weights take no memory, so
    the cost does not grow with the batch and the user's model is never touched, and whose ops
    pick the kernels a real run would (CPU flash attention, the fused LSTM), so "meta" and
    "real" agree.  A model that needs real values (data-dependent control flow) falls back to a
    real run on a clone of its weights; ``result["mode"]`` and ``data_dependent`` say so.
    """

    MODES = ("auto", "meta", "real")

    def analyze_model(self, model, inputs, *, mode="auto", training=True):
        """Count one forward (inference) and one forward + backward (training) of `model`.

        `training=False` counts one forward in eval mode only (for models that cannot run a
        training pass on plain inputs, such as detection models that need targets): the training
        keys are then None.

        Parameters
        ----------
        model : nn.Module
        inputs : shape tuple (batch first), tensor, tuple/list of tensors, or dict of kwargs.
        mode : "auto" (meta, real if meta fails), "meta" or "real".
        training : count the training pass too (default) or only an eval-mode forward.
        """
        Replica.check(model)
        if mode not in self.MODES:
            raise ValueError(f"mode must be one of {self.MODES}, got {mode!r}")
        args, kwargs = Replica.inputs(inputs, model)
        can_run_real = Replica.device(model).type != "meta"
        if mode in ("auto", "meta"):
            try:
                return self._count(model, args, kwargs, real=False, mode_note="meta", training=training)
            except Exception as err:
                meta_error = err
                if mode == "meta" or not can_run_real:
                    raise Replica.error(model, args, kwargs, err) from None
        try:
            note = "real" if mode == "real" else f"real (meta failed: {_first_line(meta_error)})"
            result = self._count(model, args, kwargs, real=True, mode_note=note, training=training)
        except Exception as err:
            raise Replica.error(model, args, kwargs, err) from None
        if mode == "auto":  # meta could not run it: the count followed the real data of this one run
            result["data_dependent"] = _first_line(meta_error)
            result["note"] = ("counted on one real run, because the model needs real values (data-dependent "
                              "control flow or output shapes): another input can give another count")
        return result

    def _count(self, model, args, kwargs, *, real, mode_note, training=True):
        compute = contextlib.nullcontext()
        if real:
            make = Replica.real_like(Replica.device(model), ids_below=Replica.ids_below(model))
        else:  # fake tensors of the target device: the kernels it would choose (CPU flash attention), no data
            compute = FakeTensors.mode()
            target = Replica.device(model) if Replica.device(model).type != "meta" else torch.device("cpu")
            make = Replica.fake_like(compute, target)
        replica = Replica.of(model, make)
        if not training:
            replica.eval()  # the copy only

        def make_input(x):  # an input that requires grad gets its gradient counted too
            made = make(x)
            return made.requires_grad_() if x.requires_grad and made.is_floating_point() else made
        run_args, run_kwargs = Replica.map((args, kwargs), make_input)
        counted_training = training
        training = _CountingMode()
        quiet = FakeTensors.quiet() if not real else contextlib.nullcontext()  # no tracebacks on stderr
        with quiet, compute, training.tracking(replica), training, torch.set_grad_enabled(counted_training):
            output = replica(*run_args, **run_kwargs)
            training.phase = "backward"
            loss = StepLoss.summed(output) if counted_training else None
            if loss is not None:
                loss.backward()
        # NB: eval fast paths (nn.MultiheadAttention, TransformerEncoderLayer) run only without
        # autograd on CPU/CUDA, so a real run counts inference in a second, no-grad forward.
        # On meta they never trigger: the forward above is the inference count too.
        inference = training
        if real and counted_training:
            inference = _CountingMode()
            with inference.tracking(replica), inference, torch.no_grad():
                replica(*run_args, **run_kwargs)
        result = self._result(model, args, kwargs, inference, training, mode_note)
        if not counted_training:
            result.update(training_flops=None, backward_flops=None, training_other_flops=None, training_bytes=None,
                          by_op_class_pass="forward")
        return result

    @staticmethod
    def _result(model, args, kwargs, inference, training, mode_note):
        macs, flops = inference.macs["forward"], inference.flops["forward"]
        parameters = sum(p.numel() for p in model.parameters())
        unsupported = inference.unsupported | training.unsupported  # calls per pass, either pass
        return {
            "model": type(model).__name__,
            "input_shape": Replica.shapes(args, kwargs),
            "flops": flops,
            "macs": macs,
            "other_flops": inference.other["forward"],
            "training_flops": training.flops["forward"] + training.flops["backward"],
            "backward_flops": training.flops["backward"],
            "training_other_flops": training.other["forward"] + training.other["backward"],
            "bytes": inference.bytes["forward"],  # read + written by every op (_CountingMode.tensor_bytes)
            "training_bytes": training.bytes["forward"] + training.bytes["backward"],
            "intensity": _CountingMode.intensity(flops + inference.other["forward"], inference.bytes["forward"]),
            "by_op_class": _CountingMode.class_totals(training.ops),  # the training pass (forward only if not counted)
            "by_op_class_pass": "forward + backward",
            "flops_readable": readable(flops, "FLOPs"),
            "macs_readable": readable(macs, "MACs"),
            "parameters": parameters,
            "parameters_readable": readable(parameters),
            "trainable_parameters": sum(p.numel() for p in model.parameters() if p.requires_grad),
            "by_module": {k: v for k, v in inference.by_module.items() if k},
            "by_operator": dict(inference.by_operator),
            "by_class": {cls: inference.by_class[cls] for cls in WORK_CLASSES},
            "unsupported_ops": dict(unsupported),
            "mode": mode_note,
            "data_dependent": None,
        }


def count_zoo(names, batch=1, report=None):
    """One record (dict) per zoo model of `names`: its count at `batch` (FLOPCalculator, on meta)."""
    keys = ("flops", "macs", "other_flops", "training_flops", "backward_flops", "parameters", "trainable_parameters",
            "by_operator", "by_class", "unsupported_ops", "mode", "input_shape", "bytes", "training_bytes",
            "intensity", "by_op_class")  # what the figures draw
    records = []
    for i, name in enumerate(names):
        kind, _, make_inputs = MODEL_ZOO[name]
        result = FLOPCalculator().analyze_model(build_model(name), make_inputs(batch))
        records.append({"name": name, "kind": kind, "batch": batch, **{k: result[k] for k in keys}})
        if report:
            report(i + 1, len(names), name)
    return records


@stage("flop", measures=False)
def run_flop_analysis(run, *, models=None, batch=1, records=None):
    """Count every zoo model at `batch` (the profile's list by default); one record (dict) per model.
    Models are built on the meta device, so this takes seconds even for ViT-B/16.  `records`: the
    same count_zoo already done (the CLI counts it beside the memory stage)."""
    names = list(models or run.profile.flop_models or MODEL_ZOO)
    return {"records": records or count_zoo(names, batch, run.report)}


# %% =============================================================================================
# 6. Memory
# ================================================================================================
# total = the peak of bytes allocated during one steady-state training step (forward, backward,
# optimizer.step(), optimizer state already created, grads set to None between steps), or during
# one forward under torch.inference_mode() for inference.  Estimated on fake tensors, measured from
# the allocator; the storage tracker sorts the bytes into categories either way.


class CpuScratch:
    """Working memory CPU kernels allocate inside themselves: no tensor carries it past the
    dispatcher, so fake tensors never see it, but the allocator does (read with torch.profiler,
    profile_memory=True, op by op; torch 2.14, x86).  Each rule returns the bytes held during the
    op, freed at its end; bytes(func, ...) looks the op up in RULES."""

    @staticmethod
    def dense(t):
        return t.numel() * t.element_size()

    @staticmethod
    def blas_compatible(t):
        """The layouts BLAS takes as they are (aten/src/ATen/native/LinearAlgebra.cpp, addmm_impl_cpu_:
        one unit stride, the other at least the size); any other operand is copied first."""
        if t.dim() != 2:
            return True
        rows, cols = t.shape
        s0, s1 = t.stride()
        return (s1 == 1 and s0 >= max(1, cols)) or (s0 == 1 and s1 >= max(1, rows))

    @staticmethod
    def conv(x, w, *args, out_bytes, **kwargs):
        # oneDNN computes into a blocked-layout output (nChw16c) and reorders it into the plain one;
        # for most shapes it reorders the weight into a blocked layout too (NB: not for every shape:
        # a small overcount of the weight's bytes where it does not)
        return out_bytes + CpuScratch.dense(w)

    @staticmethod
    def conv_backward(grad_out, x, w, bias_sizes, stride, padding, dilation, transposed, output_padding, groups,
                      output_mask, **kwargs):
        # oneDNN reorders grad_output into its blocked layout, and the input too when its grad is wanted
        return CpuScratch.dense(grad_out) + (CpuScratch.dense(x) if output_mask[0] else 0)

    @staticmethod
    def matmul(*operands, **kwargs):
        # a stride-0 (expanded) or otherwise non-BLAS operand is made contiguous before the GEMM
        return sum(CpuScratch.dense(t) for t in operands
                   if isinstance(t, torch.Tensor) and not CpuScratch.blas_compatible(t))

    # NB: under torch.inference_mode the dispatcher shows the composite ops (conv2d, linear) instead
    RULES = {"convolution": "conv", "conv1d": "conv", "conv2d": "conv", "conv3d": "conv",
             "convolution_backward": "conv_backward", "mm": "matmul", "addmm": "matmul", "linear": "matmul"}

    @classmethod
    def bytes(cls, func, args, kwargs, out):
        """Kernel working memory of `func` on CPU by RULES, or 0 (oneDNN's rules need oneDNN)."""
        rule = cls.RULES.get(func._overloadpacket.__name__)
        if rule is None or not torch.backends.mkldnn.is_available() and rule != "matmul":
            return 0
        out_bytes = sum(cls.dense(t) for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor))
        return getattr(cls, rule)(*args, **(kwargs or {}), out_bytes=out_bytes)


class _StorageTracker(TorchDispatchMode):
    """Follows every tensor storage that ops create, and when each one is freed.

    Storages are told apart by identity (views and in-place results share one), freed through a
    weakref finalizer, and logged as +/- events so categories can be decided after the step.
    """

    @staticmethod
    def measured_step(step, replica, optimizer, run_args, run_kwargs, device):
        """Run `step(tracker)` once under the storage tracker: (what it returns, memory summary).

        The parts come from the tracker on every device; `total` is the allocator's peak during the
        step (CUDA's caching allocator, or the CPU allocator's profiler events, as in measure_memory)
        plus the model state that was alive before it.
        """
        tracker = _StorageTracker()
        state_bytes = tracker.register_state(replica, optimizer, run_args, run_kwargs)
        peak = _PeakMemory(device)
        try:
            with peak:
                value = step(tracker)  # enters the tracker (training_step) and marks its phases
            summary = tracker.summary()
        finally:
            tracker.close()
        summary["tracked_total"] = summary["total"]
        if peak.peak_bytes is not None:
            summary["total"] = peak.peak_bytes + state_bytes
        return value, summary

    def __init__(self, scratch=False):
        super().__init__()
        self.scratch = scratch  # also log CPU kernels' working memory (CpuScratch) as temporaries
        self.phase = "setup"
        self.info = []         # key -> [nbytes, phase created in, category or None]
        self.live = {}         # id(storage) -> key, for storages alive now
        self.events = []       # (key, +1 alloc / -1 free) in order
        self.phase_start = {}  # phase -> index into events
        self.gradient_keys = set()
        self._finalizers = []

    def add(self, tensor, category=None):
        storage = tensor.untyped_storage()
        sid = id(storage)
        if sid in self.live:
            return self.live[sid]
        key = len(self.info)
        self.info.append([storage.nbytes(), self.phase, category])
        self.live[sid] = key
        self.events.append((key, 1))
        self._finalizers.append(weakref.finalize(storage, self._free, sid, key))
        return key

    def _free(self, sid, key):
        self.live.pop(sid, None)
        self.events.append((key, -1))

    def set_phase(self, phase):
        self.phase = phase
        self.phase_start[phase] = len(self.events)

    def mark_gradients(self, parameters):
        """Call after backward: the .grad storages are gradients, whichever phase made them."""
        self.gradient_keys |= {self.add(p.grad) for p in parameters if p.grad is not None}

    def _scratch(self, nbytes):
        """Log kernel working memory held across the op's outputs and freed at its end."""
        key = len(self.info)
        self.info.append([nbytes, self.phase, "temporary"])
        self.events.append((key, 1))
        return key

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        scratch = self.scratch and CpuScratch.bytes(func, args, kwargs, out)
        if scratch:
            key = self._scratch(scratch)
        # autocast's low-precision copy of a weight, cached for the whole forward
        category = "weight_copies" if func is torch.ops.aten._to_copy.default and \
            isinstance(args[0], nn.Parameter) else None
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.layout == torch.strided:
                self.add(t, category)
        if scratch:
            self.events.append((key, -1))
        return out

    def close(self):
        for finalizer in self._finalizers:
            finalizer.detach()

    # what the tracker sorts storages into (in this order: what lives all step first, then what comes
    # and goes, the memory timeline's stack from the bottom), and the result keys they become: bytes
    # are *_bytes (`parameters` elsewhere is a count)
    CATEGORIES = ("parameters", "buffers", "inputs", "optimizer", "gradients", "activations", "weight_copies",
                  "temporary")
    PART_KEYS = {"parameters": "parameter_bytes", "buffers": "buffer_bytes", "inputs": "input_bytes",
                 "optimizer": "optimizer_bytes", "gradients": "gradient_bytes", "activations": "activation_bytes",
                 "weight_copies": "weight_copy_bytes", "temporary": "temporary_bytes"}
    SOURCE = "live tensor storages (dispatch-mode tracker)"  # a measurement's `method` when it is the tracker

    def register_state(self, replica, optimizer, run_args, run_kwargs):
        """Tensors alive before the step starts, each in its category (every parameter, buffer,
        optimizer-state tensor and input); returns the bytes of their distinct storages (what was
        allocated before an allocator's reading of the step began)."""
        state = [*(("parameters", p) for p in replica.parameters()), *(("buffers", b) for b in replica.buffers())]
        for per_param in (optimizer.state.values() if optimizer else ()):
            state += [("optimizer", v) for v in per_param.values() if isinstance(v, torch.Tensor)]
        keys = {self.add(tensor, category) for category, tensor in state}
        keys |= {self.add(x, "inputs") for x in tree_flatten((run_args, run_kwargs))[0] if isinstance(x, torch.Tensor)}
        return sum(self.info[key][0] for key in keys)

    def categorize(self):
        """Name each storage: given categories, gradients, activations (made in forward and still
        alive when backward starts) or temporary (everything else)."""
        forward_end = self.phase_start.get("backward", len(self.events))
        freed_at = {key: i for i, (key, sign) in enumerate(self.events) if sign < 0}
        for key, entry in enumerate(self.info):
            if entry[2]:
                continue
            if key in self.gradient_keys:
                entry[2] = "gradients"
            elif entry[1] == "forward" and freed_at.get(key, math.inf) >= forward_end:
                entry[2] = "activations"
            else:
                entry[2] = "temporary"

    def replay(self):
        """Replay alloc/free events: the peak, what was live at it, and the phase it fell in."""
        live, by_cat = 0, Counter()
        peak, at_peak, peak_index = 0, Counter(), 0
        for i, (key, sign) in enumerate(self.events):
            nbytes, _, category = self.info[key]
            live += sign * nbytes
            by_cat[category] += sign * nbytes
            if live > peak:
                peak, at_peak, peak_index = live, Counter(by_cat), i
        phases = sorted(self.phase_start.items(), key=lambda kv: kv[1])
        peak_phase = next((p for p, start in reversed(phases) if start <= peak_index), "setup")
        return peak, {self.PART_KEYS[c]: int(at_peak[c]) for c in self.CATEGORIES}, peak_phase

    def summary(self):
        """The step's memory: each part's bytes, `total` (the peak), `at_peak`, `peak_phase`."""
        self.categorize()
        peak, at_peak, peak_phase = self.replay()
        sizes = Counter()
        for nbytes, _, category in self.info:
            sizes[category] += nbytes
        result = {self.PART_KEYS[c]: int(sizes[c]) for c in self.CATEGORIES}
        # parts that live all step are their full size; temporary is what was live at the peak
        result["temporary_bytes"] = at_peak["temporary_bytes"]
        result.update(total=int(peak), at_peak=at_peak, peak_phase=peak_phase)
        return result


class _Napkin:
    """The lecture's memory formulas, beside the measured step: params x bytes, grads = params,
    optimizer = k x params, activations = the sum of every leaf module's output bytes in one
    forward (counted by this global forward hook while the step runs)."""

    def __init__(self):
        self.nbytes = 0

    @contextlib.contextmanager
    def hooked(self):
        handle = nn.modules.module.register_module_forward_hook(self)
        try:
            yield
        finally:
            handle.remove()

    def __call__(self, module, args, output):
        if next(module.children(), None) is None:
            self.nbytes += sum(t.numel() * t.element_size() for t in tree_flatten(output)[0]
                               if isinstance(t, torch.Tensor))

    def formula(self, model, options):
        n = sum(p.numel() for p in model.parameters() if p.requires_grad)
        # pure bf16/fp16 weights are 2 bytes; AMP keeps fp32 weights
        bytes_per_param = BYTES_PER_ELEMENT[PURE_DTYPES.get(options["precision"], torch.float32)]
        parameters = sum(p.numel() for p in model.parameters()) * bytes_per_param
        training = options["training"]
        formula = {
            "parameter_bytes": parameters,
            "gradient_bytes": n * bytes_per_param if training else 0,
            "optimizer_bytes": OPTIMIZER_STATES[options["optimizer_name"]] * n * bytes_per_param if training else 0,
            "activation_bytes": self.nbytes,
        }
        formula["total"] = sum(formula.values())
        return formula


def _memory_run(model, args, kwargs, options, *, make, device, compute=None, foreach=None, loss=None,
                targets=None):
    """Run one tracked step (or inference forward) on a replica; return the summary dict.

    `loss` is the step's StepLoss, called with `targets` (else the inputs); the summary's `loss`
    names the rule it used (None for inference, which has no loss)."""
    loss = loss if loss is not None else StepLoss()
    targets = targets if options["training"] else None  # inference has no loss to feed
    replica = Replica.of(model, make)
    blocks = _checkpoint_blocks(replica) if options["checkpointing"] else 0
    with compute or contextlib.nullcontext():
        run_args, run_kwargs, run_targets = Replica.map((args, kwargs, targets), make)
    # an estimate (fake tensors) on CPU adds the kernels' working memory the allocator will see
    tracker, layers = _StorageTracker(scratch=compute is not None and device.type == "cpu"), _Napkin()
    try:
        if options["training"]:
            optimizer = _make_optimizer(options["optimizer_name"], replica.parameters(), foreach=foreach)
            _create_optimizer_state(replica, optimizer, compute)
            tracker.register_state(replica, optimizer, (run_args, run_targets), run_kwargs)  # targets: inputs
            batch = StepLoss.batch(run_args, run_kwargs, run_targets)
            with layers.hooked():
                training_step(replica, optimizer, [(run_args, run_kwargs, batch, None)], loss_fn=loss,
                              precision=options["precision"], device=device, tracker=tracker, compute=compute)
        else:
            tracker.register_state(replica, None, run_args, run_kwargs)
            with compute or contextlib.nullcontext(), tracker, torch.inference_mode(), \
                    layers.hooked(), _autocast(options["precision"], device):
                tracker.set_phase("forward")
                replica(*run_args, **run_kwargs)
        summary = tracker.summary()
    finally:
        tracker.close()
    if not options["training"]:  # the forward's working set is its activations
        summary["activation_bytes"] = (summary["total"] - summary["parameter_bytes"] - summary["buffer_bytes"]
                                       - summary["input_bytes"])
        summary["temporary_bytes"] = 0
    summary["tracked_total"] = summary["total"]  # measure_memory replaces `total` with the allocator's peak
    summary["formula"] = layers.formula(model, options)
    summary["checkpointed_blocks"] = blocks
    summary["loss"] = loss.used if options["training"] else None
    return summary


def _create_optimizer_state(replica, optimizer, compute=None):
    """Give the optimizer the state it holds in steady training, as its first step would create
    it (torch/optim/adam.py and sgd.py, `_init_group`): Adam's step counter, m and v; SGD's
    momentum buffer; zero-filled.  Cheaper than running a step for it, which would cost one more
    pass of the optimizer per estimate and measurement; a test checks it against a real step.
    Lazy (uninitialised) parameters have no shape yet: refused."""
    params = [p for p in replica.parameters() if p.requires_grad]
    if any(isinstance(p, nn.parameter.UninitializedParameter) for p in params):
        raise ValueError("lazy modules (uninitialised parameters) are not supported: run one forward "
                         "on the model first so every parameter has its shape")
    adam = isinstance(optimizer, (torch.optim.Adam, torch.optim.AdamW))
    for group in optimizer.param_groups:
        for p in group["params"]:
            if not p.requires_grad or not (adam or group.get("momentum")):
                continue
            step = torch.tensor(0.0)  # a real CPU scalar, as torch keeps it (outside `compute`)
            with compute or contextlib.nullcontext():
                if adam:
                    state = {"step": step, "exp_avg": torch.zeros_like(p, memory_format=torch.preserve_format),
                             "exp_avg_sq": torch.zeros_like(p, memory_format=torch.preserve_format)}
                    if group.get("amsgrad"):
                        state["max_exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                else:
                    state = {"momentum_buffer": torch.zeros_like(p)}
            optimizer.state[p] = state


def _check_memory_options(optimizer, precision):
    if optimizer not in OPTIMIZER_STATES:
        raise ValueError(f"optimizer must be one of {sorted(OPTIMIZER_STATES)}, got {optimizer!r}")
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {list(PRECISIONS)}, got {precision!r}")


def _memory_options(model, inputs, training, optimizer, precision, checkpointing, device):
    Replica.check(model)
    _check_memory_options(optimizer, precision)
    args, kwargs = Replica.inputs(inputs, model)
    device = resolve_device(device, model)
    if training and not any(p.requires_grad for p in model.parameters()):
        raise LabError(f"{type(model).__name__} has no trainable parameters, so a training step has nothing to "
                       "train (no parameter requires grad); pass training=False to measure inference")
    options = {"training": bool(training), "optimizer_name": optimizer, "precision": precision,
               "checkpointing": bool(checkpointing)}
    return args, kwargs, device, options


def estimate_memory(model, inputs, *, training=True, optimizer="adam", precision="fp32",
                    checkpointing=False, device=None, loss_fn=None, targets=None):
    """Predict the memory of one training step (or inference forward) without real arithmetic.

    Runs the step on fake tensors of the target device (default: the model's; CPU for a model
    on meta): the same kernels are chosen as in a real run (e.g. CPU flash attention, autocast
    casts) but no memory is allocated.  Returns bytes per part, `total` (the peak), `at_peak`,
    `peak_phase`, the napkin `formula` terms and `loss`, the loss the step trained on:

    - "loss_fn": yours, called as `loss_fn(output, batch)` or `loss_fn(output)` (read from its
      signature), where `batch` is `targets` when given, else the inputs; it must return a
      scalar tensor that requires grad (ValueError otherwise);
    - "output.loss": the model's own loss (a Hugging Face model given `labels=`, or a dict
      output with "loss"), used alone;
    - "sum of outputs": the sum of every floating output that requires grad.

    The loss is part of the step's memory (a language model's cross-entropy holds a copy of its
    logits), so the rule that matches your training is the one to estimate.
    """
    args, kwargs, device, options = _memory_options(model, inputs, training, optimizer, precision,
                                                    checkpointing, device)
    loss = StepLoss(loss_fn)
    if device.type == "meta":
        device = torch.device("cpu")
    fake_mode = FakeTensors.mode()
    make = Replica.fake_like(fake_mode, device, PURE_DTYPES.get(precision))
    from torch._subclasses.fake_tensor import DataDependentOutputException, DynamicOutputShapeException
    try:
        with FakeTensors.quiet():
            result = _memory_run(model, args, kwargs, options, make=make, device=device, compute=fake_mode,
                                 foreach=(device.type == "cuda"), loss=loss, targets=targets)  # CUDA: foreach
    except (DataDependentOutputException, DynamicOutputShapeException) as err:
        return _measured_instead(model, inputs, options, device, str(getattr(err, "func", err)), loss_fn, targets)
    except Exception as err:
        raise Replica.error(model, args, kwargs, err) from None
    return {**result, **options, "device": str(device), "method": f"fake tensors on {device.type}",
            "data_dependent": None}


def _measured_instead(model, inputs, options, device, op, loss_fn=None, targets=None):
    """An estimate the model's data-dependent control flow made impossible, measured instead."""
    if Replica.device(model).type == "meta":
        raise LabError(f"data-dependent control flow: {op} needs real values, which fake tensors do not have, "
                       "and the model's weights are on the meta device, so it cannot be measured either")
    measured = measure_memory(model, inputs, training=options["training"], optimizer=options["optimizer_name"],
                              precision=options["precision"], checkpointing=options["checkpointing"],
                              device=device, loss_fn=loss_fn, targets=targets)
    return {**measured, "data_dependent": op,
            "method": f"measured instead: data-dependent control flow ({op}) needs real values; {measured['method']}"}


def measure_memory(model, inputs, *, training=True, optimizer="adam", precision="fp32",
                   checkpointing=False, device=None, loss_fn=None, targets=None):
    """Run one real step (or inference forward) on a copy of the model and measure its memory.

    `total` comes from the allocator, not from the storage tracker the estimate shares:
    CUDA's caching allocator (torch.cuda.max_memory_allocated), or on CPU the allocator's events
    read through torch.profiler, over the whole copy-and-step, so the copy's weights, inputs and
    optimizer state are counted as allocated.  MPS, or a CPU whose profiler is busy, falls back to
    the tracker (`method` says which).  The parts come from the tracker on every device, and
    `tracked_total` is the tracker's own peak.  `loss_fn` and `targets` choose the loss as in
    estimate_memory, and `loss` says which was used: the two stay comparable.
    """
    args, kwargs, device, options = _memory_options(model, inputs, training, optimizer, precision,
                                                    checkpointing, device)
    loss = StepLoss(loss_fn)
    if device.type == "meta":
        raise ValueError("measure_memory needs real weights; the model is on the meta device "
                         "(use estimate_memory, or pass device='cpu' after materialising it)")
    make = Replica.real_like(device, PURE_DTYPES.get(precision), ids_below=Replica.ids_below(model))
    peak = _PeakMemory(device)
    try:
        with peak:
            result = _memory_run(model, args, kwargs, options, make=make, device=device, loss=loss, targets=targets)
    except Exception as err:
        raise Replica.error(model, args, kwargs, err) from None
    method = _StorageTracker.SOURCE + (f": {peak.reason}" if device.type == "cpu" and peak.reason else "")
    if peak.peak_bytes is not None:
        result["total"], method = peak.peak_bytes, peak.method
    return {**result, **options, "device": str(device), "method": method, "data_dependent": None}


def zero_memory_per_device(parameters, devices):
    """Bytes per device of model states (no activations) under DDP and ZeRO stages 1-3."""
    # ZeRO (Rajbhandari et al. 2020, Sec. 3 / Fig. 1): mixed-precision Adam holds per parameter
    # 2 bytes fp16 weights + 2 bytes fp16 grads + K = 12 bytes of fp32 master weights, m and v.
    w, g, k = 2, 2, 12
    return {
        "DDP": parameters * (w + g + k),
        "ZeRO-1": parameters * (w + g + k / devices),      # optimizer states sharded
        "ZeRO-2": parameters * (w + (g + k) / devices),    # + gradients sharded
        "ZeRO-3": parameters * (w + g + k) / devices,      # + parameters sharded
    }


@stage("memory")
def run_memory_analysis(run, *, batch=None):
    """Estimate and measure training and inference memory of the profile's MEMORY_MODELS; then, on
    TinyGPT, how memory grows with the batch, what precision and checkpointing save, and the KV cache."""
    batch = batch or run.profile.memory_batch
    data = {"device": _device_name(run.device), "batch": batch, "optimizer": "adam", "dtype": "fp32", "models": {}}
    names, built = list(run.profile.memory_models or MEMORY_MODELS), {}
    for i, name in enumerate(names):
        builder, inputs = MEMORY_MODELS[name]
        with torch.device(run.device):
            built[name] = model = builder()
        data["models"][name] = {mode: {"estimate": estimate_memory(model, inputs(batch), training=mode == "training"),
                                       "measured": measure_memory(model, inputs(batch), training=mode == "training")}
                                for mode in ("training", "inference")}
        run.report(i + 1, len(names) + 3, name)
    gpt, gpt_inputs = built["TinyGPT (T=64)"], MEMORY_MODELS["TinyGPT (T=64)"][1]  # the rest is about TinyGPT
    known = {batch: data["models"]["TinyGPT (T=64)"]["training"]}  # reused, not run again
    data["growth"] = _memory_growth(gpt, gpt_inputs, run.profile.growth_measured, run.profile.growth_estimated, known)
    run.report(len(names) + 1, len(names) + 3, "batch growth")
    data["variants"] = _memory_variants(gpt, gpt_inputs(batch), run.profile.memory_variants, known[batch]["estimate"])
    data["gpt_parameters"] = sum(p.numel() for p in gpt.parameters())
    data["kv_cache"] = measure_kv_cache(gpt, **run.profile.kv_sizes())
    seven_b = 7_000_000_000
    data["zero"] = {"parameters": seven_b, "devices": 8, "per_device": zero_memory_per_device(seven_b, 8)}
    run.report(len(names) + 2, len(names) + 3, "precision and sharding")
    data["timeline"] = {"model": "TinyGPT (T=64)", "batch": batch, "micro_batches": _PhaseLog.MICRO_BATCHES,
                        "runs": {s: memory_timeline(gpt, gpt_inputs(batch), strategy=s, device=run.device,
                                                    micro_batches=_PhaseLog.MICRO_BATCHES)
                                 for s in _PhaseLog.STRATEGIES}}  # three real steps, ~0.1 s each here
    run.report(len(names) + 3, len(names) + 3, "memory over one step")
    return data


def _memory_growth(model, inputs, measured_batches, estimated_batches, known=None):
    """Estimated (and at `measured_batches`, measured) training memory as the batch grows;
    `known` maps a batch to an {"estimate", "measured"} pair already run, reused here."""
    known = known or {}
    batches = sorted({*estimated_batches, *measured_batches})
    estimates = [known[b]["estimate"] if b in known else estimate_memory(model, inputs(b)) for b in batches]
    return {
        "batches": batches,
        "estimated_total": [e["total"] for e in estimates],
        "fixed": [e["parameter_bytes"] + e["buffer_bytes"] + e["gradient_bytes"] + e["optimizer_bytes"]
                  for e in estimates],
        "measured_batches": list(measured_batches),
        "measured_total": [(known[b]["measured"] if b in known else measure_memory(model, inputs(b)))["total"]
                           for b in measured_batches],
    }


def _memory_variants(model, inputs, labels, fp32_estimate=None):
    """Estimated peak of each variant (a Profile's memory_variants labels); the plain fp32 one is
    reused when already estimated."""
    options = {"fp32": {}, "AMP bf16": {"precision": "amp_bf16"}, "AMP fp16": {"precision": "amp_fp16"},
               "pure bf16": {"precision": "bf16"}, "fp32 + checkpoint": {"checkpointing": True},
               "AMP bf16 + checkpoint": {"precision": "amp_bf16", "checkpointing": True}}
    return {label: (fp32_estimate if label == "fp32" and fp32_estimate else
                    estimate_memory(model, inputs, **options[label]))["total"] for label in labels}


def measure_kv_cache(model, *, batch=8, prompt=16, new_tokens=48):
    """Memory while a TinyGPT generates `new_tokens` greedily with its KVCache, read after each
    token: `held_bytes` (allocated and not yet freed, counted from the start of generation),
    `step_peak_bytes` (the most at once during that token), `cache_bytes` (the cache's own
    tensors) and `formula_bytes` (KVCache.formula_bytes).  CPU: the allocator's events through
    torch.profiler; CUDA: torch.cuda.memory_allocated; elsewhere the cache's tensor sizes.
    The model is used in eval mode and put back as it was."""
    if not isinstance(model, TinyGPT):
        raise TypeError(f"measure_kv_cache takes a TinyGPT (a model with a KVCache), not {type(model).__name__}")
    if prompt + new_tokens > model.pos.num_embeddings:
        raise ValueError(f"prompt + new_tokens = {prompt + new_tokens} is longer than the model's "
                         f"{model.pos.num_embeddings} positions")
    device = Replica.device(model)
    layers, hidden = len(model.blocks), model.tok.embedding_dim
    element = model.tok.weight.element_size()
    idx = torch.zeros(batch, prompt, dtype=torch.long, device=device)
    cache_bytes, cuda_held = [], []
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize(device)
        base = torch.cuda.memory_allocated(device)

    def on_token(step, cache):
        cache_bytes.append(cache.nbytes())
        if cuda:
            torch.cuda.synchronize(device)
            cuda_held.append(torch.cuda.memory_allocated(device) - base)
        _AllocatorPeak.mark()

    allocator = _AllocatorPeak() if device.type == "cpu" else contextlib.nullcontext()
    with Replica.eval_mode(model), allocator:
        model.generate(idx, new_tokens, on_token=on_token)
    tokens = list(range(prompt + 1, prompt + new_tokens + 1))
    result = {"batch": batch, "prompt": prompt, "new_tokens": new_tokens, "layers": layers, "hidden": hidden,
              "dtype": str(model.tok.weight.dtype).replace("torch.", ""), "tokens": tokens,
              "cache_bytes": cache_bytes,
              "formula_bytes": [KVCache.formula_bytes(batch, t - 1, layers, hidden, element) for t in tokens],
              "step_peak_bytes": None}
    # NB: after token t the cache holds t - 1 positions: the newest token's keys are made when it is fed
    if device.type == "cpu" and allocator.marks:
        result["held_bytes"] = [held for held, _ in allocator.marks]
        result["step_peak_bytes"] = [peak for _, peak in allocator.marks]
        result["method"] = _AllocatorPeak.SOURCE
    elif cuda:
        result["held_bytes"] = cuda_held
        result["method"] = _PeakMemory.CUDA_SOURCE.replace("max_memory_allocated", "memory_allocated")
    else:
        reason = getattr(allocator, "reason", None) or f"no allocator reading on {device.type}"
        result["held_bytes"], result["method"] = cache_bytes, f"the cache's tensor sizes ({reason})"
    return result


# ---- Memory over one training step: the tracker's events replayed in order -------------------
# The peak bars show one moment; PyTorch's memory snapshot viewer shows memory over time.  Here the
# same picture comes from the storage tracker's alloc/free events of one real steady-state step.


class _PhaseLog(_StorageTracker):
    """The storage tracker, also logging every phase change in order: with micro-batches forward
    and backward repeat, and `phase_start` keeps only the last start of each."""

    STRATEGIES = ("baseline", "gradient_checkpointing", "gradient_accumulation")
    MICRO_BATCHES = 4  # the training comparison's accumulation: 4 micro-batches of batch / 4

    @staticmethod
    def categories(tracker):
        """Each storage's category: categorize()'s, except that a storage a micro-batch's forward made
        and still alive when that micro-batch's backward starts is an activation (categorize() sees only
        the last backward's start, so with accumulation it would call the earlier ones temporary)."""
        tracker.categorize()
        categories = [entry[2] for entry in tracker.info]
        log = getattr(tracker, "phase_log", [])
        spans = [(start, log[i + 1][1]) for i, (phase, start) in enumerate(log[:-1])
                 if phase == "forward" and log[i + 1][0] == "backward"]  # (forward start, its backward start)
        born, freed = {}, {}
        for i, (key, sign) in enumerate(tracker.events):
            (born if sign > 0 else freed).setdefault(key, i)
        for key, at in born.items():
            if categories[key] != "temporary" or tracker.info[key][1] != "forward":
                continue
            span = next((s for s in spans if s[0] <= at < s[1]), None)
            if span and freed.get(key, math.inf) >= span[1]:
                categories[key] = "activations"
        return categories

    @staticmethod
    def series(tracker, points=300):
        """Replay the tracker's events into bytes per category after each event, thinned to about
        `points` samples: each keeps the event where its stretch of events held the most, so the
        peak is never thinned away.  Returns plain lists (results.json)."""
        categories = _PhaseLog.categories(tracker)
        column = {c: i for i, c in enumerate(_StorageTracker.CATEGORIES)}
        n = len(tracker.events)
        delta = np.zeros((n, len(_StorageTracker.CATEGORIES)))
        for i, (key, sign) in enumerate(tracker.events):
            delta[i, column[categories[key]]] = sign * tracker.info[key][0]
        live = np.cumsum(delta, axis=0)  # (events, categories): bytes alive after each event
        total = live.sum(axis=1)
        keep = sorted({int(chunk[np.argmax(total[chunk])]) for chunk in np.array_split(np.arange(n), min(points, n))})
        peak = int(np.argmax(total))
        phases = []
        for phase, start in getattr(tracker, "phase_log", sorted(tracker.phase_start.items(), key=lambda kv: kv[1])):
            if not phases or phases[-1][0] != phase:
                phases.append([phase, start])
        return {"events": n, "index": keep, "phases": phases,
                "parts": {_StorageTracker.PART_KEYS[c]: [int(live[i, j]) for i in keep] for c, j in column.items()},
                "peak_bytes": int(total[peak]), "peak_index": peak,
                "peak_phase": next((p for p, start in reversed(phases) if start <= peak), "setup"),
                "at_peak": {_StorageTracker.PART_KEYS[c]: int(live[peak, j]) for c, j in column.items()}}

    @staticmethod
    def split_batch(tree, k):
        """`tree`'s tensors cut into k micro-batches along dim 0 (tensors of another length stay whole)."""
        if k == 1:
            return [tree]
        leaves, spec = tree_flatten(tree)
        sizes = {x.shape[0] for x in leaves if isinstance(x, torch.Tensor) and x.dim() > 0}
        batch = max(sizes) if sizes else 0
        if batch < k or batch % k:
            raise LabError(f"gradient accumulation needs a batch divisible into {k} micro-batches, got {batch}")
        pieces = [[x.chunk(k)[i] if isinstance(x, torch.Tensor) and x.dim() > 0 and x.shape[0] == batch else x
                   for x in leaves] for i in range(k)]
        return [tree_unflatten(p, spec) for p in pieces]

    def __init__(self, scratch=False):
        super().__init__(scratch)
        self.phase_log = []  # (phase, index into events) in order

    def set_phase(self, phase):
        self.phase_log.append((phase, len(self.events)))
        super().set_phase(phase)


def memory_timeline(model, inputs, *, strategy="baseline", micro_batches=4, device=None, points=300,
                    loss_fn=None, targets=None):
    """Memory over one real steady-state training step (fp32, Adam, its state already there, as
    after the first step) on a copy of `model`: bytes per category after every allocation and
    free the storage tracker saw, thinned to ~`points` samples (_PhaseLog.series), with the
    phases (forward, backward, optimizer) and the peak.  `strategy`: "baseline",
    "gradient_checkpointing" (_checkpoint_blocks) or "gradient_accumulation" (`micro_batches`
    forwards and backwards, each loss weighted 1/k, one optimizer step)."""
    if strategy not in _PhaseLog.STRATEGIES:
        raise ValueError(f"strategy must be one of {_PhaseLog.STRATEGIES}, got {strategy!r}")
    args, kwargs, device, _ = _memory_options(model, inputs, True, "adam", "fp32", False, device)
    if device.type == "meta":
        raise ValueError("memory_timeline runs a real step: the model is on the meta device")
    make = Replica.real_like(device, ids_below=Replica.ids_below(model))
    replica = Replica.of(model, make)
    blocks = _checkpoint_blocks(replica) if strategy == "gradient_checkpointing" else 0
    run_args, run_kwargs, run_targets = Replica.map((args, kwargs, targets), make)
    k = micro_batches if strategy == "gradient_accumulation" else 1
    loss = StepLoss(loss_fn)
    micro = [(a, kw, StepLoss.batch(a, kw, t), 1 / k if k > 1 else None)
             for a, kw, t in _PhaseLog.split_batch((run_args, run_kwargs, run_targets), k)]
    optimizer = _make_optimizer("adam", replica.parameters())
    _create_optimizer_state(replica, optimizer)
    tracker = _PhaseLog()
    try:
        tracker.register_state(replica, optimizer, (run_args, run_targets), run_kwargs)
        training_step(replica, optimizer, micro, loss_fn=loss, device=device, tracker=tracker)
        timeline = _PhaseLog.series(tracker, points)
    except Exception as err:
        raise Replica.error(model, args, kwargs, err) from None
    finally:
        tracker.close()
    return {**timeline, "strategy": strategy, "micro_batches": k, "checkpointed_blocks": blocks,
            "device": str(device), "method": _StorageTracker.SOURCE}


# %% =============================================================================================
# 7. Mixed precision
# ================================================================================================
# fp32 against autocast bf16 / fp16 on this device: step time with its spread, peak memory and
# the outputs' error, each precision gated by a matmul probe so that a 25-50x slowdown on a CPU
# without AMX is predicted, said and skipped rather than waited for.


class _AmpTrainer:
    """One copy of the model trained in one precision: forward under autocast, GradScaler for
    fp16 on CUDA (torch.amp.GradScaler("cuda")), Adam."""

    @staticmethod
    def slow_reason(device, precision):
        """Why a low precision can be slower than fp32 here, from what the hardware reports."""
        device = torch.device(device)
        if device.type == "cpu":
            flags = cpu_flags()
            if precision == "amp_bf16" and not (flags["avx512_bf16"] or flags["amx_bf16"]):
                return "this CPU has neither AVX512-BF16 nor AMX: bf16 math is converted to fp32 in software"
            if precision == "amp_fp16" and not flags["amx_bf16"]:
                return "this CPU has no native fp16 matmul (AMX-FP16): fp16 math is converted in software"
        return None

    @staticmethod
    def ratio_words(factor):
        """0.37 -> '2.7x faster than fp32', 3.2 -> '3.2x slower than fp32', 0.96 -> 'as fast as fp32'."""
        if 1 / 1.1 <= factor <= 1.1:
            return "as fast as fp32 (within 10 %)"
        return f"{1 / factor:.1f}x faster than fp32" if factor < 1 else f"{factor:.1f}x slower than fp32"

    @staticmethod
    def max_rel_error(outputs, reference):
        """max |out - ref| / max |ref| over all output tensors."""
        scale = max(float(r.abs().max()) for r in reference) or 1.0
        return max(float((o - r).abs().max()) for o, r in zip(outputs, reference)) / scale

    @staticmethod
    def check_options(precisions, max_runs, device):
        """The precisions to time, fp32 (the reference) first; a ValueError for a bad list or max_runs."""
        if device.type == "meta":
            raise ValueError("benchmark_mixed_precision needs real weights; the model is on the meta device")
        if isinstance(max_runs, bool) or not isinstance(max_runs, int) or max_runs < 1:
            raise ValueError(f"max_runs must be an integer >= 1, got {max_runs!r}")
        if isinstance(precisions, str):
            raise ValueError(f"precisions must be a list such as [{precisions!r}], not a string; valid names: "
                             f"{list(AMP_DTYPES)}")
        precisions = list(precisions or supported_precisions(device))
        unknown = [p for p in precisions if p not in AMP_DTYPES]
        if unknown:
            pure = [p for p in unknown if p in PURE_DTYPES]
            raise ValueError(f"precisions must be among {list(AMP_DTYPES)}, got {unknown}"
                             + (f" ({', '.join(pure)}: pure low-precision weights, an estimate_memory precision; "
                                f"autocast is amp_{pure[0]})" if pure else ""))
        return ["fp32"] + [p for p in precisions if p != "fp32"]

    @staticmethod
    def skipped(precision, kind, reason):
        return {"precision": precision, "median_s": None, "iqr_s": None, "runs": 0, "peak_memory_bytes": None,
                "activation_bytes": None, "speedup_vs_fp32": None, "max_rel_error_vs_fp32": None,
                "skipped": reason, "skip_kind": kind, "note": None, "times_s": [], "loss_scale": None}

    @staticmethod
    def benchmark_one(model, run_args, run_kwargs, precision, device, training, share_s, reference, max_runs):
        """One precision: why it cannot run here, or its steps timed (measure, gated by a matmul
        probe's prediction), one more step for its memory, its outputs' error against fp32."""
        why_not = _AmpTrainer.why_not(precision, device, Replica.dtype(model), reference)
        if why_not:
            return _AmpTrainer.skipped(precision, *why_not)
        started = _now()
        factor = _matmul_slowdown(device, precision) if reference else None
        trainer = _AmpTrainer(model, run_args, run_kwargs, precision, device, training)
        outputs = trainer.outputs()
        timed = measure(trainer.step, device=device, budget_s=max(share_s - (_now() - started), 1e-9),
                        runs=(MIN_RUNS, max_runs), predicted_s=reference["median_s"] * factor if reference else None,
                        reserve_runs=3, what="step")  # the memory step below costs ~3 steps
        slow_reason = _AmpTrainer.slow_reason(device, precision)
        if timed["skipped"]:
            probe = f"a matmul probe predicts {_AmpTrainer.ratio_words(factor)}; " if reference else ""
            reason = probe + timed["skipped"] + (f"; {slow_reason}" if slow_reason else "")
            return {**_AmpTrainer.skipped(precision, "budget", reason),
                    "predicted_speedup": 1 / factor if factor else None}  # the probe's prediction, for the figure
        peak, activations = trainer.peak_memory()
        speedup = reference["median_s"] / timed["median_s"] if reference else 1.0
        note = None
        if reference is not None:
            slower = f": {slow_reason}" if speedup < 1 / 1.1 and slow_reason else ""
            note = _AmpTrainer.ratio_words(1 / speedup) + slower
        return {"precision": precision, **timed, "peak_memory_bytes": peak, "activation_bytes": activations,
                "speedup_vs_fp32": speedup, "predicted_speedup": 1 / factor if factor else None,
            "skipped": None, "skip_kind": None, "note": note, "outputs": outputs,
                "max_rel_error_vs_fp32": _AmpTrainer.max_rel_error(outputs, reference["outputs"]) if reference else 0.0,
                "loss_scale": trainer.scaler and float(trainer.scaler.get_scale())}

    @staticmethod
    def why_not(precision, device, dtype, reference):
        """(skip kind, reason) when `precision` cannot be timed here at all, else None."""
        if precision == "fp32":
            return None
        if precision not in supported_precisions(device):
            return "unsupported", f"autocast {precision} is not supported on {device.type}"
        if dtype != torch.float32:  # NB: "fp32" is then the model as given
            return "unsupported", (f"autocast casts float32 ops only; this model computes in {str(dtype)[6:]}: "
                                   "nothing would change")
        if reference is None or reference["skipped"]:
            return "budget", "no fp32 reference: it did not fit the budget"
        return None

    def peak_memory(self):
        """(peak, activation) bytes of one untimed step, measured as in measure_memory."""
        _, summary = _StorageTracker.measured_step(self.step, self.replica, self.optimizer, self.args, self.kwargs,
                                                   self.device)
        return summary["total"], summary["activation_bytes"]

    def __init__(self, model, run_args, run_kwargs, precision, device, training):
        self.replica = Replica.of(model, Replica.real_like(device))
        self.args, self.kwargs = run_args, run_kwargs
        self.precision, self.device, self.training = precision, device, training
        self.optimizer = torch.optim.Adam(self.replica.parameters(), lr=1e-4) if training else None
        if training:  # steady state from the first step: a GradScaler may skip the first steps (inf grads
            _create_optimizer_state(self.replica, self.optimizer)  # at scale 65536), which leaves no Adam state
        self.scaler = _grad_scaler(precision, device)

    def forward(self):
        with _autocast(self.precision, self.device):
            return self.replica(*self.args, **self.kwargs)

    def step(self, tracker=None):
        if not self.training:
            with tracker if tracker is not None else contextlib.nullcontext(), torch.inference_mode():
                if tracker is not None:
                    tracker.set_phase("forward")
                self.forward()
            return
        training_step(self.replica, self.optimizer, [(self.args, self.kwargs, None, None)], precision=self.precision,
                      device=self.device, scaler=self.scaler, tracker=tracker)

    def outputs(self):
        with torch.no_grad():
            leaves = [x for x in tree_flatten(self.forward())[0] if isinstance(x, torch.Tensor)]
        return [x.detach().float() for x in leaves if x.is_floating_point()]


def benchmark_mixed_precision(model, inputs, *, device=None, precisions=None, training=True,
                              time_budget_s=DEFAULT.model_amp_s, max_runs=MAX_RUNS):
    """Time a training step (or a forward) of `model` in fp32 and each low precision.

    Returns one record per precision: median_s with its spread (time_stats), runs,
    peak_memory_bytes, speedup_vs_fp32 (below 1 is a slowdown), max_rel_error_vs_fp32 (outputs),
    skipped (reason or None) with skip_kind ("unsupported", "budget", "failed"), note, and the
    hardware.  fp32 is the reference and may take half of `time_budget_s`; every other precision
    gets an equal share of what is left, and is timed by measure() with a cheap matmul probe's
    prediction, so that one too slow for its share is skipped with that reason.
    """
    Replica.check(model)
    device = resolve_device(device, model)
    precisions = _AmpTrainer.check_options(precisions, max_runs, device)
    args, kwargs = Replica.inputs(inputs, model)
    run_args, run_kwargs = Replica.map((args, kwargs), Replica.real_like(device, ids_below=Replica.ids_below(model)))
    budget, hardware, dtype = Budget(time_budget_s), hardware_info(device), Replica.dtype(model)
    records, reference = [], None
    with Load.fitted_threads():
        for i, precision in enumerate(precisions):
            share = budget.left() / 2 if i == 0 and len(precisions) > 1 else budget.share(len(precisions) - i)
            try:
                record = _AmpTrainer.benchmark_one(model, run_args, run_kwargs, precision, device, training, share,
                                                   reference, max_runs)
            except Exception as err:
                if i == 0:
                    raise Replica.error(model, args, kwargs, err) from None
                record = _AmpTrainer.skipped(precision, "failed", f"failed: {_first_line(err)}")
            reference = record if precision == "fp32" else reference
            records.append({**record, "device": str(device), "training": training, "hardware": hardware,
                            "model_dtype": str(dtype)[6:]})
    return records


@stage("amp")
def run_amp_analysis(run, *, batch=None):
    """Mixed precision on the profile's AMP_MODELS: benchmark_mixed_precision on each, within the
    profile's `amp_measure_s` in all (each model an equal share of what is left)."""
    batch = batch or run.profile.amp_batch
    names = list(run.profile.amp_models or AMP_MODELS)
    data = {"device": _device_name(run.device), "batch": batch, "hardware": hardware_info(run.device),
            "models": {}, "profile": run.profile.name, "ranges": dtype_ranges()}
    budget = Budget(run.profile.amp_measure_s)
    for i, name in enumerate(names):
        builder, inputs = AMP_MODELS[name]
        seed_everything(run.seed)
        with torch.device(run.device):
            model = builder()
        records = benchmark_mixed_precision(model, inputs(batch), device=run.device, max_runs=run.profile.amp_max_runs,
                                            time_budget_s=max(budget.share(len(names) - i), 1e-3))
        data["models"][name] = [{k: v for k, v in r.items() if k not in ("outputs", "hardware")} for r in records]
        run.report(i + 1, len(names), name)
    return data


def dtype_ranges(value=1e-8, loss_scale=65536):
    """Representable ranges of fp16/bf16/fp32 (torch.finfo) and what happens to a small gradient."""
    ranges = {}
    for name, dtype in (("fp16", torch.float16), ("bf16", torch.bfloat16), ("fp32", torch.float32)):
        info = torch.finfo(dtype)
        ranges[name] = {"smallest_subnormal": float(info.smallest_normal * info.eps),
                        "smallest_normal": float(info.smallest_normal), "max": float(info.max),
                        "value_after_cast": float(torch.tensor(value, dtype=dtype))}
    scaled = float(torch.tensor(value * loss_scale, dtype=torch.float16))
    return {"value": value, "loss_scale": loss_scale, "fp16_scaled": scaled, "dtypes": ranges}


# %% =============================================================================================
# 8. Training: one small model, four strategies, real runs
# ================================================================================================
# Every strategy starts from the same initial weights and sees the same batches in the same
# order, so their curves differ only by what the strategy does.  The model has no dropout and no
# BatchNorm: gradient accumulation and checkpointing must then reproduce the baseline's losses.


TRAIN_STRATEGIES = ("baseline", "mixed_precision", "gradient_accumulation", "gradient_checkpointing")


# --- data: a learnable synthetic task by default, MNIST from disk when asked ---------------

class TrainingData:
    """The training comparison's data: a learnable synthetic task by default, MNIST from its IDX
    files when asked (load), and every step's batch drawn in a seeded order (batch_order)."""

    SIGNAL = 0.1  # prototype amplitude against unit noise: hard per pixel, learnable over 784

    @staticmethod
    def synthetic(n_train, n_val, seed=0, features=784, classes=10):
        """Ten random prototypes; a sample is TrainingData.SIGNAL x its class prototype + N(0, 1) noise.

        No sample is informative pixel by pixel, but over 784 features the class is learnable: a
        model has to pool evidence, and fresh samples keep validation honest.
        """
        g = torch.Generator().manual_seed(seed)
        prototypes = torch.randn(classes, features, generator=g)

        def draw(n):
            y = torch.randint(0, classes, (n,), generator=g)
            return TrainingData.SIGNAL * prototypes[y] + torch.randn(n, features, generator=g), y
        (x, y), (vx, vy) = draw(n_train), draw(n_val)
        return {"name": "synthetic", "train_x": x, "train_y": y, "val_x": vx, "val_y": vy}

    FILES = {"train_x": "train-images-idx3-ubyte", "train_y": "train-labels-idx1-ubyte",
             "val_x": "t10k-images-idx3-ubyte", "val_y": "t10k-labels-idx1-ubyte"}
    MEAN, STD = 0.1307, 0.3081  # of the training pixels in [0, 1] (pytorch/examples mnist)

    @staticmethod
    def read_idx(path):
        """An IDX file (yann.lecun.com/exdb/mnist format): magic 0x0000 08 ndim, big-endian uint32
        sizes, then unsigned bytes.  Gzipped files are read too."""
        import gzip
        with (gzip.open if path.suffix == ".gz" else open)(path, "rb") as f:
            raw = f.read()
        if len(raw) < 4 or raw[:3] != b"\x00\x00\x08":
            raise ValueError(f"{path} is not an IDX file of unsigned bytes (bad magic number {raw[:4].hex()})")
        ndim = raw[3]
        shape = tuple(int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
        data = raw[4 + 4 * ndim:]
        if len(data) != _numel(shape):
            raise ValueError(f"{path}: header says shape {shape} ({_numel(shape)} bytes) but {len(data)} bytes follow")
        return torch.frombuffer(bytearray(data), dtype=torch.uint8).reshape(shape)

    @staticmethod
    def mnist_paths(data_dir):
        """{train_x, train_y, val_x, val_y: path}, or a ValueError naming the files that are missing."""
        folder = Path(data_dir).expanduser()
        paths = {key: TrainingData.find_mnist_file(folder, stem) for key, stem in TrainingData.FILES.items()}
        missing = [TrainingData.FILES[key] for key, path in paths.items() if path is None]
        if missing:
            raise ValueError(f"MNIST files not found in {str(data_dir)!r}: {', '.join(missing)} (optionally .gz). "
                             "Put them there, allow the download (download=True / --download-mnist), "
                             "or use dataset='synthetic'")
        return paths

    @staticmethod
    def find_mnist_file(data_dir, stem):
        for folder in (data_dir, data_dir / "MNIST" / "raw"):  # the second is torchvision's layout
            for name in (stem, stem + ".gz"):
                if (folder / name).is_file():
                    return folder / name
        return None

    @staticmethod
    def mnist(data_dir, *, n_train=None, n_val=None, download=False):
        """MNIST from the four IDX files in `data_dir` (or torchvision's data_dir/MNIST/raw).

        Nothing is downloaded unless download=True (then torchvision fetches the files).  Pixels are
        scaled to [0, 1] and standardised; the first n_train / n_val samples are kept.
        """
        if data_dir is None:
            raise ValueError("dataset='mnist' needs data_dir: a folder with the MNIST IDX files")
        data_dir = Path(data_dir)
        if download and any(TrainingData.find_mnist_file(data_dir, s) is None for s in TrainingData.FILES.values()):
            import torchvision
            torchvision.datasets.MNIST(str(data_dir), train=True, download=True)  # the network, as asked
            torchvision.datasets.MNIST(str(data_dir), train=False, download=True)
        paths = TrainingData.mnist_paths(data_dir)
        data = {key: TrainingData.read_idx(path) for key, path in paths.items()}
        for split, n in (("train", n_train), ("val", n_val)):
            x, y = data[f"{split}_x"][:n], data[f"{split}_y"][:n]
            if x.ndim != 3 or len(x) != len(y):
                raise ValueError(f"MNIST {split} files disagree: images {tuple(x.shape)}, labels {tuple(y.shape)}")
            data[f"{split}_x"] = (x.float() / 255 - TrainingData.MEAN) / TrainingData.STD
            data[f"{split}_y"] = y.long()
        return {"name": "mnist", **data}

    @staticmethod
    def batch_order(n_samples, batch, steps, seed):
        """Indices of every step's batch: reshuffled each epoch by a seeded generator, so every
        strategy sees the same batches in the same order."""
        g = torch.Generator().manual_seed(seed)
        epochs = math.ceil(steps * batch / n_samples)
        order = torch.cat([torch.randperm(n_samples, generator=g) for _ in range(epochs)])
        return order[:steps * batch].view(steps, batch)

    VAL_SAMPLES = 512    # one validation pass costs ~2 training steps at batch 256

    MAX_SAMPLES = 60_000  # one pass over at most this many training samples

    @staticmethod
    def load(dataset, data_dir, download, n_train, seed):
        if dataset == "mnist":
            return TrainingData.mnist(data_dir, n_train=n_train, n_val=TrainingData.VAL_SAMPLES, download=download)
        return TrainingData.synthetic(n_train, TrainingData.VAL_SAMPLES, seed)


# --- the input pipeline: can the data keep up with the step? -------------------------------

class SyntheticImages(torch.utils.data.Dataset):
    """Images made per sample as a decoder would: `channels` x `size` x `size` bytes drawn from a
    seeded generator (the "decoding"), then converted to floats and standardised, as
    torchvision's ToTensor + Normalize do.  Real CPU work in __getitem__, no files needed."""

    def __init__(self, n=1024, size=28, channels=1, classes=10, seed=0):
        self.n, self.size, self.channels, self.classes, self.seed = n, size, channels, classes, seed

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + i)
        pixels = torch.randint(0, 256, (self.channels, self.size, self.size), generator=g, dtype=torch.uint8)
        return (pixels.float() / 255 - TrainingData.MEAN) / TrainingData.STD, i % self.classes


def measure_input_pipeline(dataset=None, *, batch_size, num_workers=(0, 1, 2), pin_memory=None, device=None,
                           time_budget_s=DEFAULT.pipeline_s):
    """Samples per second a torch.utils.data.DataLoader delivers for each `num_workers`, with spread.

    `dataset` defaults to SyntheticImages (real per-sample CPU work).  Each setting gets an equal
    share of `time_budget_s`: the loader's start (worker processes) is timed apart, then the
    batches are timed by measure().  `pin_memory` is measured only where an accelerator exists;
    on a CPU-only machine it does nothing (the DataLoader itself warns so) and is left off, said
    in `pin_memory_note`.  Every worker process is shut down before returning.
    """
    device = resolve_device(device)
    accelerator = device.type in ("cuda", "mps")
    pin = accelerator if pin_memory is None else bool(pin_memory) and accelerator
    budget, rows = Budget(time_budget_s), []
    for i, workers in enumerate(num_workers):
        if isinstance(workers, bool) or not isinstance(workers, int) or workers < 0:
            raise ValueError(f"num_workers must be integers >= 0, got {workers!r}")
        data = dataset if dataset is not None else SyntheticImages(n=batch_size * (MAX_RUNS + 4) * max(3 * workers, 1))
        rows.append(_time_loader(data, batch_size, workers, pin, device, budget.share(len(num_workers) - i)))
    return {"batch_size": batch_size, "device": str(device), "pin_memory": pin, "rows": rows,
            "dataset": type(dataset).__name__ if dataset is not None else "SyntheticImages (28x28, decoded + "
                                                                           "normalised per sample)",
            "pin_memory_note": None if accelerator else "no accelerator here: pin_memory does nothing, left off"}


def _time_loader(dataset, batch_size, workers, pin, device, budget_s):
    """One DataLoader setting: its start-up time, then batches (moved to `device`) timed by measure()."""
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=workers,
                                         pin_memory=pin, drop_last=True)
    started = _now()
    batches = iter(loader)
    try:
        for _ in range(2 * workers):  # the batches the workers prefetched while starting (prefetch_factor 2
            next(batches)             # each) arrive at once: the steady rate is what comes after them
        start_s = _now() - started

        per_run = max(workers, 1)  # one batch from each worker: the workers take turns, so a single batch
                                   # alternates between waiting and being ready

        def next_batches():
            for _ in range(per_run):
                x, _ = next(batches)
                x.to(device, non_blocking=pin)
        runs = min(MAX_RUNS, (len(loader) - 2 * workers) // per_run - 1)
        timed = measure(next_batches, device=device, budget_s=max(budget_s - start_s, 1e-3), runs=(MIN_RUNS, runs),
                        always=True, what="batch")
    finally:
        getattr(batches, "_shutdown_workers", lambda: None)()  # no worker process outlives the call
    samples = batch_size * per_run
    return {"num_workers": workers, "start_s": start_s, "batches_per_run": per_run, **timed,
            "samples_per_s": samples / timed["median_s"],
            "samples_per_s_range": [samples / timed["spread_hi_s"], samples / timed["spread_lo_s"]]}


def _input_bound(pipeline, step_samples_per_s):
    """Whether one training step waits for its data: the best loader setting against the step."""
    best = max(pipeline["rows"], key=lambda r: r["samples_per_s"])
    return {"step_samples_per_s": step_samples_per_s, "best_num_workers": best["num_workers"],
            "best_samples_per_s": best["samples_per_s"], "input_bound": best["samples_per_s"] < step_samples_per_s}


# --- one strategy's run --------------------------------------------------------------------

def _strategy_precision(strategy, device):
    """The autocast precision a strategy trains in: mixed precision is bf16 on CPU (fp16 is not
    faster there), fp16 on CUDA and MPS; every other strategy is fp32."""
    if strategy != "mixed_precision":
        return "fp32"
    return "amp_bf16" if device.type == "cpu" else "amp_fp16"


class _StrategyRun:
    """A replica of the model trained with Adam under one strategy."""

    def __init__(self, model, strategy, device, accumulation, lr):
        self.replica = Replica.of(model, Replica.real_like(device))
        self.device, self.strategy = device, strategy
        self.precision = _strategy_precision(strategy, device)
        self.blocks = _checkpoint_blocks(self.replica) if strategy == "gradient_checkpointing" else 0
        self.micro_batches = accumulation if strategy == "gradient_accumulation" else 1
        self.optimizer = torch.optim.Adam(self.replica.parameters(), lr=lr)
        _create_optimizer_state(self.replica, self.optimizer)  # the state exists even if a scaler skips step 1
        self.scaler = _grad_scaler(self.precision, device)
        self.gradients = None  # the last step's ((group, grad) pairs, per-tensor norms), for gradient_health

    def step(self, x, y, tracker=None):
        """One optimizer step on the batch (x, y); returns its mean training loss."""
        self.gradients = None  # the last step's gradients, if unread, go before this step makes its own
        # micro-batch mean x its share of the batch: the k gradients add up to the batch mean's
        micro = [((xs,), {}, ys, len(xs) / len(x) if self.micro_batches > 1 else None)
                 for xs, ys in zip(x.chunk(self.micro_batches), y.chunk(self.micro_batches))]
        return training_step(self.replica, self.optimizer, micro, precision=self.precision, device=self.device,
                             loss_fn=F.cross_entropy, scaler=self.scaler, tracker=tracker, item=True,
                             on_gradients=self._watch_gradients)

    def _watch_gradients(self, replica):
        """Keep the step's gradients and their per-tensor norms (one torch._foreach_norm, left on
        the device: no host sync inside the timed step; gradient_health reads them after it).  The
        norm's cost stays in the step's time: logging it is part of a real step, as users write it.
        zero_grad(set_to_none=True) only drops the parameters' references, so the values survive."""
        named = [(name.split(".")[0], p.grad) for name, p in replica.named_parameters() if p.grad is not None]
        self.gradients = (named, torch.stack(torch._foreach_norm([g for _, g in named])))

    def gradient_health(self):
        """The last step's global gradient norm, its norm per top-level child (named as in
        named_children; the root's own parameters by their name) and its count of non-finite
        elements.  Read once: the gradients are let go."""
        (named, norms), self.gradients = self.gradients, None
        norms, by_group = norms.tolist(), {}  # the host sync, after the timed step
        for (group, _), norm in zip(named, norms):
            by_group.setdefault(group, []).append(norm)
        grad_norm = math.hypot(*norms)
        # an inf or NaN element makes the norm non-finite: only then are the elements counted
        nonfinite = 0 if math.isfinite(grad_norm) else sum(int(g.isfinite().logical_not().sum()) for _, g in named)
        return {"grad_norm": grad_norm, "nonfinite": nonfinite,
                "by_group": {group: math.hypot(*values) for group, values in by_group.items()}}

    @torch.no_grad()
    def evaluate(self, x, y, batch=1024):
        """Mean cross-entropy over (x, y), in the strategy's precision."""
        total = 0.0
        for xs, ys in zip(x.split(batch), y.split(batch)):
            with _autocast(self.precision, self.device):
                total += float(F.cross_entropy(self.replica(xs), ys, reduction="sum"))
        return total / len(x)


def _train_one(model, strategy, data, order, options):
    """Train one strategy for every planned step (the plan already fits the budget: no cut)."""
    device, started = options["device"], _now()
    run = _StrategyRun(model, strategy, device, options["accumulation"], options["lr"])
    val_x, val_y = data["val_x"].to(device), data["val_y"].to(device)
    record = {"strategy": strategy, "precision": run.precision, "micro_batches": run.micro_batches,
              "checkpointed_blocks": run.blocks, "train_loss": [], "val_steps": [0],
              "val_loss": [run.evaluate(val_x, val_y)], "step_times_s": [], "grad_norm": [],
              "grad_norm_by_group": {}, "nonfinite_grads": [],
              "loss_scale_per_step": None if run.scaler is None else [],
              "skipped_steps": None if run.scaler is None else 0}
    scale = run.scaler and float(run.scaler.get_scale())
    for i, index in enumerate(order):
        x, y = data["train_x"][index].to(device), data["train_y"][index].to(device)
        if i == 1:  # the first steady step (Adam state exists): measured for memory, not timed
            loss, memory = _StorageTracker.measured_step(functools.partial(run.step, x, y), run.replica, run.optimizer,
                                          (x, y), {}, device)
        else:
            loss, seconds = _timed(device, run.step, x, y)
            if i > 0:  # step 1 is warm-up
                record["step_times_s"].append(seconds)
        record["train_loss"].append(loss)
        scale = _log_gradient_health(record, run, scale)
        step = i + 1
        if step % options["eval_every"] == 0 or step == len(order):
            record["val_steps"].append(step)
            record["val_loss"].append(run.evaluate(val_x, val_y))
    stats = time_stats(record["step_times_s"])  # steps 3.. : the plan has at least 3 steps
    batch = order.shape[1]
    record.update(steps_done=len(record["train_loss"]), wall_s=_now() - started, cut=None,
                  median_step_s=stats["median_s"], step_time=stats, samples_per_s=batch / stats["median_s"],
                  samples_per_s_range=[batch / stats["spread_hi_s"], batch / stats["spread_lo_s"]],
                  peak_memory_bytes=memory["total"], activation_bytes=memory["activation_bytes"],
                  at_peak=memory["at_peak"], peak_phase=memory["peak_phase"],
                  achieved_flops_per_s=options["training_flops"] / stats["median_s"],
                  loss_scale=run.scaler and float(run.scaler.get_scale()))
    return record


def _log_gradient_health(record, run, scale):
    """Append the step's gradient health to `record`: global norm, non-finite count, the norms per
    group at the first and the last step and, with a GradScaler, the loss scale the step used
    (`scale`) and whether it skipped the step.  Returns the scale the next step uses."""
    health = run.gradient_health()
    record["grad_norm"].append(health["grad_norm"])
    record["nonfinite_grads"].append(health["nonfinite"])
    record["grad_norm_by_group"].setdefault("first", health["by_group"])
    record["grad_norm_by_group"]["last"] = health["by_group"]
    if run.scaler is None:
        return None
    after = run.scaler and float(run.scaler.get_scale())
    record["loss_scale_per_step"].append(scale)
    record["skipped_steps"] += after < scale  # GradScaler backs its scale off only when it skips a step
    return after


# --- planning: calibrate a step of each strategy, then choose the size that fits -------------

load_mnist = TrainingData.mnist  # public: MNIST from its IDX files


class TrainingPlan:
    """Calibrate a step of each strategy, then choose the size that fits the budget (plan)."""

    MIN_BATCH = MIN_WIDTH = 32  # the smallest size still worth a figure

    @staticmethod
    def evals(steps, eval_every):
        """How many validation passes a run of `steps` makes (step 0 and the last included)."""
        return 1 + steps // eval_every + (steps % eval_every != 0)

    @staticmethod
    def predict_s(calibration, steps, eval_every):
        """Seconds the planned runs take, from one calibration: every strategy's steps (the memory-
        measured step costs ~3 steps under the tracker), its validation passes, its set-up."""
        total = 0.0
        for strategy, step_s in calibration["step_s"].items():
            eval_s = calibration["eval_s"].get(calibration["precision"][strategy], max(calibration["eval_s"].values()))
            total += (steps + 2) * step_s + TrainingPlan.evals(steps, eval_every) * eval_s + calibration["setup_s"]
        return total

    @staticmethod
    def fits(calibration, steps, eval_every, left_s):
        return Budget.fits_in(TrainingPlan.predict_s(calibration, steps, eval_every(steps)), left_s)

    @staticmethod
    def halve(size, key, over, smallest, fixed, shrunk):
        """Halve size[key] as often as `over` (predicted / available time) asks, as if time were
        linear in it, not below `smallest`; note it in `shrunk`.  False when it cannot shrink."""
        if key in fixed or size[key] // 2 < smallest:
            return False
        new = size[key]
        while new // 2 >= smallest and over > 1:
            new, over = new // 2, over / 2
        shrunk.append({"size": key, "from": size[key], "to": new})
        size[key] = new
        return True

    @staticmethod
    def at_smallest(size, fixed, accumulation):
        """Nothing left to halve: batch and width at their floors (or fixed by the caller)."""
        return all(key in fixed or size[key] // 2 < floor for key, floor in
                   (("batch", max(TrainingPlan.MIN_BATCH, accumulation)), ("width", TrainingPlan.MIN_WIDTH)))

    @staticmethod
    def plan(calibrate, budget_s, *, steps, batch, width, min_steps, eval_every, accumulation,
                      fixed=()):
        """Choose steps, batch and width so that every strategy runs the same steps within `budget_s`.

        `calibrate(batch, width, limit_s)` times one steady step of each strategy at that size (once
        it has spent `limit_s`, the strategies left are taken as slow as the slowest timed: a limit of
        0 is a cheap probe of the first one, used to find a feasible size before timing them all) and returns
        {"step_s": {strategy: s}, "precision": {strategy: name}, "eval_s": {precision: s}, "setup_s": s,
        "wall_s": its own cost}.  Shrinks, in
        this order, what is not in `fixed`: steps (to the most that fit, not below `min_steps`),
        then batch (halved, down to TrainingPlan.MIN_BATCH), then width (halved, down to TrainingPlan.MIN_WIDTH),
        calibrating again at each new size.  Only when nothing is left to shrink (and the caller fixed
        no size) does it drop the slowest strategy but the baseline, with the reason.  Returns the
        plan: the sizes, the prediction, what was shrunk, the skips and the calibration it was made from.
        """
        size, shrunk, skipped, skipped_ms, spent = {"steps": steps, "batch": batch, "width": width}, [], {}, {}, 0.0
        cal = calibrate(batch, width, 0.0)  # a probe: the first strategy's step; the rest taken as slow as it
        spent += cal.get("wall_s", 0.0)
        while True:
            left = budget_s - spent
            complete = cal.get("complete", True)
            if TrainingPlan.fits(cal, size["steps"], eval_every, left) and complete:
                break
            if TrainingPlan.fits(cal, size["steps"], eval_every, left) or (
                    not complete and TrainingPlan.at_smallest(size, fixed, accumulation)):
                cal = calibrate(size["batch"], size["width"], math.inf)  # the whole calibration where it looks feasible
                spent += cal.get("wall_s", 0.0)
                continue
            if "steps" not in fixed and size["steps"] > min_steps:
                n = max((n for n in range(min_steps, size["steps"]) if TrainingPlan.fits(cal, n, eval_every, left)),
                        default=min_steps)
                shrunk.append({"size": "steps", "from": size["steps"], "to": n})
                size["steps"] = n
                continue
            predicted = TrainingPlan.predict_s(cal, size["steps"], eval_every(size["steps"]))
            over = predicted * Budget.MARGIN / max(left, 1e-9)
            if TrainingPlan.halve(size, "batch", over, max(TrainingPlan.MIN_BATCH, accumulation), fixed, shrunk) or \
                    TrainingPlan.halve(size, "width", over, TrainingPlan.MIN_WIDTH, fixed, shrunk):
                pass
            elif len(cal["step_s"]) > 1 and not fixed:  # sizes the caller chose: run as asked
                # the baseline is what every other strategy is compared with: it is never the one dropped
                droppable = [s for s in cal["step_s"] if s != "baseline"] or list(cal["step_s"])
                slowest = max(droppable, key=cal["step_s"].get)
                alone = TrainingPlan.predict_s({**cal, "step_s": {slowest: cal["step_s"][slowest]}}, size["steps"],
                                               eval_every(size["steps"]))
                total = TrainingPlan.predict_s(cal, size["steps"], eval_every(size["steps"]))
                skipped_ms[slowest] = cal["step_s"][slowest] * 1e3
                skipped[slowest] = (f"the slowest strategy but the baseline ({skipped_ms[slowest]:.0f} ms per step, "
                                    f"~{alone:.1f} s for {size['steps']} steps): all of them would need "
                                    f"~{total:.1f} s, more than the {max(left, 0):.1f} s left at the smallest size")
                cal = {**cal, "step_s": {s: t for s, t in cal["step_s"].items() if s != slowest}}
                continue
            else:
                break  # nothing left to shrink: run the smallest plan and say it does not fit
            cal = calibrate(size["batch"], size["width"], 0.0)  # a new size: probe it again
            spent += cal.get("wall_s", 0.0)
        predicted = TrainingPlan.predict_s(cal, size["steps"], eval_every(size["steps"]))
        return {**size, "predicted_s": predicted, "budget_s": budget_s, "calibration_s": spent,
                "fits": Budget.fits_in(predicted, budget_s - spent), "shrunk": shrunk, "skipped": skipped,
                "calibration_skipped_ms": skipped_ms, "calibration": cal}

    @staticmethod
    def calibrator(strategies, data, device, options, depth, seed):
        """calibrate(batch, width) for TrainingPlan.plan: a warm-up and one timed step of each strategy on
        a throwaway model of that size, and one validation pass per precision."""
        val = (data["val_x"].to(device), data["val_y"].to(device))

        def calibrate(batch, width, limit_s=math.inf):
            started = _now()
            seed_everything(seed)
            model = ResMLPClassifier(width=width, depth=depth)
            order = TrainingData.batch_order(len(data["train_x"]), batch, 2, seed)
            xs = [(data["train_x"][i].to(device), data["train_y"][i].to(device)) for i in order]
            step_s, precision, eval_s, setup_s = {}, {}, {}, []
            for strategy in strategies:
                if step_s and _now() - started > limit_s:  # far too slow at this size: the rest is extrapolated
                    step_s[strategy] = max(step_s.values())
                    precision[strategy] = _strategy_precision(strategy, device)
                    continue
                run, seconds = _timed(device, _StrategyRun, model, strategy, device, options["accumulation"],
                                      options["lr"])
                setup_s.append(seconds)
                run.step(*xs[0])  # warm-up: allocations, Adam state, autocast caches
                step_s[strategy] = _timed(device, run.step, *xs[1])[1]
                precision[strategy] = run.precision
                if run.precision not in eval_s:
                    eval_s[run.precision] = _timed(device, run.evaluate, *val)[1]
            return {"step_s": step_s, "precision": precision, "eval_s": eval_s,
                    "complete": len(setup_s) == len(strategies),
                    "setup_s": spread(setup_s)[0],  # the first one pays one-time imports
                    "batch": batch, "width": width, "wall_s": _now() - started}
        return calibrate


def _check_training_options(strategies, steps, batch, accumulation, eval_every, dataset):
    unknown = [s for s in strategies if s not in TRAIN_STRATEGIES]
    if unknown or not strategies:
        raise ValueError(f"strategies must be a non-empty subset of {list(TRAIN_STRATEGIES)}, got {strategies!r}")
    for name, value, low in (("steps", steps, 3), ("batch", batch, 1), ("accumulation", accumulation, 1),
                             ("eval_every", eval_every, 1)):
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < low):
            raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
    if batch is not None and batch % accumulation:
        raise ValueError(f"batch ({batch}) must be a multiple of accumulation ({accumulation}) so that the "
                         "micro-batches add up to the baseline's batch")
    if dataset not in ("synthetic", "mnist"):
        raise ValueError(f"dataset must be 'synthetic' or 'mnist', got {dataset!r}")


@stage("training")
def run_training_comparison(run, *, strategies=None, steps=None, batch=None, width=None, accumulation=4,
                            eval_every=None, dataset="synthetic", data_dir=None, download=False, time_budget_s=None):
    """Train ResMLPClassifier under each strategy from the same weights on the same batches.

    Sizes and the budget of the timed work default to the profile's (training_*).  The work is
    planned before it runs: a calibration times one step of each strategy, then TrainingPlan.plan
    shrinks what was not given (steps to the profile's minimum, then batch, then width) until
    every strategy's run of the same number of steps fits; the runs then go to the end.  Sizes you
    pass are kept; if they do not fit, `plan["fits"]` is False and the runs take longer.

    Returns {"runs": {strategy: record}, "plan": ..., "skipped": {strategy: reason}, ...}.  A
    record holds train_loss (one per optimizer step), val_loss at val_steps (step 0 = before
    training), samples_per_s (median over the timed steps: step 1 is warm-up, step 2 is measured
    for memory) with its spread, peak_memory_bytes and its parts (as measure_memory measures
    them), wall_s, achieved_flops_per_s (model FLOPs of a step / median step time) and mfu
    (against the measured matmul peak, `peak_flops`; None with `mfu_invalid` if impossible).
    Its gradient health, per step: grad_norm (the global L2 norm before optimizer.step(), unscaled),
    nonfinite_grads (inf/NaN gradient elements) and, with a GradScaler (fp16 on CUDA),
    loss_scale_per_step and skipped_steps (None without); grad_norm_by_group holds the norm of
    each top-level child at the "first" and the "last" step.
    """
    p, device = run.profile, run.device
    strategies = list(TRAIN_STRATEGIES if strategies is None else strategies)
    _check_training_options(strategies, steps, batch, accumulation, eval_every, dataset)
    fixed = {k for k, v in (("steps", steps), ("batch", batch), ("width", width)) if v is not None}
    budget = Budget(time_budget_s if time_budget_s is not None else p.training_measure_s)
    steps, batch, width = steps or p.steps, batch or p.training_batch, width or p.width
    data = TrainingData.load(dataset, data_dir, download, min(steps * batch, TrainingData.MAX_SAMPLES), run.seed)
    options = {"device": device, "accumulation": accumulation, "lr": 1e-3}
    precisions = sorted({_strategy_precision(s, device) for s in strategies})
    peak_flops = {precision: measure_peak_flops(device, precision, time_budget_s=p.peak_s) for precision in precisions}

    def every(n):
        return eval_every or max(1, n // 10)
    calibrate = TrainingPlan.calibrator(strategies, data, device, options, p.depth, run.seed)
    plan = TrainingPlan.plan(calibrate, budget.left(), steps=steps, batch=batch, width=width,
                             min_steps=min(p.min_steps, steps), eval_every=every, accumulation=accumulation,
                             fixed=fixed)
    run.report(0, len(strategies), f"planned {plan['steps']} steps x batch {plan['batch']}, width {plan['width']} "
                                   f"(predicted {plan['predicted_s']:.1f} s)")
    seed_everything(run.seed)
    model = ResMLPClassifier(width=plan["width"], depth=p.depth)
    order = TrainingData.batch_order(len(data["train_x"]), plan["batch"], plan["steps"], run.seed)
    options.update(eval_every=every(plan["steps"]),
                   training_flops=FLOPCalculator().analyze_model(model, (plan["batch"], 784))["training_flops"])
    result = {**_training_header(run, plan, model, data, options), "time_budget_s": budget.seconds,
              "peak_flops": peak_flops, "runs": {}}
    to_run = [s for s in strategies if s not in plan["skipped"]]
    for i, strategy in enumerate(to_run):
        result["runs"][strategy] = _train_one(model, strategy, data, order, options)
        run.report(i + 1, len(to_run), strategy)
    _training_findings(result, device, p)
    result["wall_s"] = budget.elapsed()
    return result


def _training_findings(result, device, profile):
    """What the runs tell beside themselves: MFU, whether the data keeps up with the step (the input
    pipeline at the same batch), each curve's largest gap from the baseline."""
    _add_mfu(result, device, profile.peak_s)
    result["input_pipeline"] = measure_input_pipeline(batch_size=result["batch"], device=device,
                                                      time_budget_s=profile.pipeline_s)
    if "baseline" in result["runs"]:
        result["input_pipeline"].update(_input_bound(result["input_pipeline"],
                                                     result["runs"]["baseline"]["samples_per_s"]))
    result["loss_diff_vs_baseline"] = {s: {key: _max_loss_diff(result, s, key) for key in ("train_loss", "val_loss")}
                                       for s in result["runs"]}


def _training_header(run, plan, model, data, options):
    """What the training comparison ran: model, sizes, data, optimizer, the plan."""
    return {"model": f"ResMLP ({run.profile.depth}x{plan['width']})", "depth": run.profile.depth,
            "width": plan["width"], "parameters": sum(q.numel() for q in model.parameters()),
            "dataset": data["name"], "train_samples": len(data["train_x"]), "val_samples": len(data["val_x"]),
            "device": _device_name(run.device), "batch": plan["batch"], "steps": plan["steps"],
            "accumulation": options["accumulation"], "eval_every": options["eval_every"], "lr": options["lr"],
            "optimizer": "adam", "seed": run.seed, "profile": run.profile.name,
            "training_flops_per_step": options["training_flops"], "flops_note": TRAINING_FLOPS_NOTE,
            "hardware": hardware_info(run.device), "plan": plan, "skipped": plan["skipped"]}


TRAINING_FLOPS_NOTE = ("model FLOPs of one step (forward + backward, FLOPCalculator); the forward that checkpointing "
                       "recomputes is not counted (MFU as in PaLM, App. B)")


def _max_loss_diff(data, strategy, key):
    """The largest gap between a strategy's loss curve and the baseline's (None for the baseline)."""
    base = data["runs"].get("baseline")
    if base is None or strategy == "baseline":
        return None
    ours = data["runs"][strategy][key]
    n = min(len(ours), len(base[key]))
    return float(np.max(np.abs(np.array(ours[:n]) - np.array(base[key][:n]))))


def _add_mfu(result, device, peak_s):
    """Each run's MFU against its precision's measured peak, re-measured once if it looks impossible."""
    for run in result["runs"].values():
        p = run["precision"]
        remeasure = functools.partial(measure_peak_flops, device, p, time_budget_s=peak_s)
        mfu, result["peak_flops"][p], invalid = checked_utilisation(run["achieved_flops_per_s"],
                                                                    result["peak_flops"][p], remeasure)
        run.update(mfu=mfu, mfu_invalid=invalid)


def _has_tensorboard():
    import importlib.util
    return importlib.util.find_spec("tensorboard") is not None


def write_tensorboard(data, log_dir):
    """The training comparison (run_training_comparison's data) as TensorBoard logs, one run per
    strategy under `log_dir`: train and validation loss per step, step time, throughput, and the
    hyper-parameters with their results (the HPARAMS tab).  tensorboard is an optional dependency.
    Returns the folder written."""
    if not _has_tensorboard():
        raise LabError("write_tensorboard needs the tensorboard package, which is optional and not installed "
                       "here: pip install tensorboard")
    from torch.utils.tensorboard import SummaryWriter
    log_dir = Path(log_dir)
    for strategy, run in data["runs"].items():
        with SummaryWriter(log_dir / strategy) as writer:
            for step, loss in enumerate(run["train_loss"], 1):
                writer.add_scalar("loss/train", loss, step)
            for step, loss in zip(run["val_steps"], run["val_loss"]):
                writer.add_scalar("loss/val", loss, step)
            for step, seconds in enumerate(run["step_times_s"], 1):
                writer.add_scalar("time/step_s", seconds, step)
            writer.add_scalar("throughput/samples_per_s", run["samples_per_s"], run["steps_done"])
            hparams = {"strategy": strategy, "precision": run["precision"], "micro_batches": run["micro_batches"],
                       "batch": data["batch"], "width": data["width"], "depth": data["depth"], "lr": data["lr"],
                       "steps": run["steps_done"], "optimizer": data["optimizer"], "dataset": data["dataset"]}
            metrics = {"hparam/final_val_loss": run["val_loss"][-1], "hparam/samples_per_s": run["samples_per_s"],
                       "hparam/peak_memory_mib": run["peak_memory_bytes"] / 2 ** 20}
            writer.add_hparams(hparams, metrics, run_name=".")
    return log_dir


# %% =============================================================================================
# 9. Model selection: measured latency, estimated training memory, a stated rule
# ================================================================================================
# The dashboard reuses the FLOP stage's counts and adds what only a real run can tell: how long a
# forward takes on this device at batch 1 (one request) and at a small serving batch.


LATENCY_BATCHES = (1, 8)     # one request; a small serving batch


class Scenarios:
    """The model-selection rule, stated: per scenario a hard limit (verdict, with its margin), then
    a preference among the models that pass (recommend).  Only resources are compared: the models
    solve different tasks, accuracy is not measured."""
    NAMES = ("edge", "serving", "training")
    TRAIN_MEMORY_BATCH = 32      # the batch of the "train on one 8 GB GPU" scenario
    EDGE_MAX_PARAMETERS = 10e6   # edge inference: at most 10 M parameters (40 MB of fp32 weights)
    EDGE_MAX_LATENCY_S = 0.020   # ... answering one request within 20 ms on this device
    SERVING_MIN_SAMPLES_PER_S = 100  # batch serving: at least 100 samples/s on this device
    TRAINING_GPU_BYTES = 8 * 2 ** 30

    @staticmethod
    def latency_of(model_data, batch):
        rec = next((r for r in model_data["latency"] if r["batch"] == batch), None)
        return rec["median_s"] if rec and not rec.get("skipped") else None

    @staticmethod
    def log_scores(values, higher_is_better):
        """Scale values to [0, 1] on a log axis: the best gets 1, the worst 0 (a lone value gets 1).
        Log, because these metrics span orders of magnitude across the zoo."""
        if not values:
            return {}
        logs = {k: math.log10(v) for k, v in values.items()}
        lo, hi = min(logs.values()), max(logs.values())
        if hi - lo < 1e-12:
            return {k: 1.0 for k in values}
        return {k: (v - lo) / (hi - lo) if higher_is_better else (hi - v) / (hi - lo) for k, v in logs.items()}


    @staticmethod
    def verdict(scenario, m):
        """("pass" | "fail" | "not_measured", why) for one model and scenario, by the rule below."""
        big = LATENCY_BATCHES[-1]
        if scenario == "edge":
            latency = Scenarios.latency_of(m, 1)
            if m["parameters"] > Scenarios.EDGE_MAX_PARAMETERS:
                return "fail", f"{readable(m['parameters'])} parameters > {readable(Scenarios.EDGE_MAX_PARAMETERS)}"
            if latency is None:
                return "not_measured", "batch-1 latency not measured"
            ok = latency <= Scenarios.EDGE_MAX_LATENCY_S
            return ("pass" if ok else "fail"), f"batch-1 latency {latency * 1e3:.1f} ms"
        if scenario == "serving":
            latency = Scenarios.latency_of(m, big)
            if latency is None:
                reason = next((r.get("skipped") for r in m["latency"] if r["batch"] == big), None)
                return "not_measured", reason or f"batch-{big} latency not measured"
            ok = big / latency >= Scenarios.SERVING_MIN_SAMPLES_PER_S
            return ("pass" if ok else "fail"), f"{big / latency:.0f} samples/s at batch {big}"
        ok = m["training_memory_bytes"] <= Scenarios.TRAINING_GPU_BYTES
        return ("pass" if ok else "fail"), f"estimated {m['training_memory_bytes'] / GIB:.2f} GiB"

    @staticmethod
    def verdicts(models):
        """{scenario: {model: {"verdict": pass/fail/not_measured, "why": ..., "value", "unit", "margin"}}}:
        a limit a model was not measured against is not a failure; `margin` (Scenarios.margin) says how
        far inside (above 1) or outside (below 1) its tightest limit the model is."""
        return {s: {n: {**dict(zip(("verdict", "why"), Scenarios.verdict(s, m))),
                        **dict(zip(("value", "unit", "margin"), Scenarios.margin(s, m)))} for n, m in models.items()}
                for s in Scenarios.NAMES}

    @staticmethod
    def margin(scenario, m):
        """(measured value, its unit, margin) of the scenario's tightest limit: the limit over the value
        for a ceiling (parameters, latency, memory), the value over the limit for a floor (throughput),
        so that above 1 passes; (None, None, None) where nothing was measured against it."""
        big = LATENCY_BATCHES[-1]
        if scenario == "edge":
            limits = [(m["parameters"], "parameters", Scenarios.EDGE_MAX_PARAMETERS / m["parameters"])]
            latency = Scenarios.latency_of(m, 1)
            if latency:
                limits.append((latency, "s", Scenarios.EDGE_MAX_LATENCY_S / latency))
            return min(limits, key=lambda limit: limit[2])
        if scenario == "serving":
            latency = Scenarios.latency_of(m, big)
            if latency is None:
                return None, None, None
            return big / latency, "samples/s", big / latency / Scenarios.SERVING_MIN_SAMPLES_PER_S
        return m["training_memory_bytes"], "bytes", Scenarios.TRAINING_GPU_BYTES / m["training_memory_bytes"]

    @staticmethod
    def recommend(models):
        """Score every model for three scenarios by one rule: a hard limit, then a preference.

        Limits (None: the model fails it, or was not measured against it; Scenarios.verdicts
        tells the two apart):
        - edge inference: at most Scenarios.EDGE_MAX_PARAMETERS parameters and batch-1 latency within
          Scenarios.EDGE_MAX_LATENCY_S, measured on this device;
        - batch serving: at least Scenarios.SERVING_MIN_SAMPLES_PER_S at the largest latency batch;
        - training on one 8 GB GPU: estimated peak at Scenarios.TRAIN_MEMORY_BATCH (fp32 Adam) within 8 GiB.
        Preference among the models that pass: the most forward FLOPs per sample, log-scaled to
        [0, 1] (a proxy for capacity: with the same budget, prefer the model that computes more).
        Only resources are compared: the models solve different tasks, accuracy is not measured.
        """
        scores = {}
        for scenario in Scenarios.NAMES:
            passing = {n: m["flops"] for n, m in models.items() if Scenarios.verdict(scenario, m)[0] == "pass"}
            scaled = Scenarios.log_scores(passing, higher_is_better=True)
            scores[scenario] = {n: scaled.get(n) for n in models}
        return scores


def measure_latency(model, inputs, *, device=None, time_budget_s=DEFAULT.model_latency_s, max_runs=MAX_RUNS):
    """Median wall time of one inference forward (eval mode, torch.inference_mode) of `model`.

    Timed by measure() within `time_budget_s`: a warm-up, then as many runs as fit, up to
    `max_runs` (at least one).  Runs on a copy of the model, so that nothing a forward changes (a
    counter buffer, a lazily cached mask) reaches yours; torch's threads fit the machine's load
    during the call.  Returns median_s with its spread (time_stats), runs, samples_per_s (the first
    input dimension / median), the device and the conditions (load, busy, threads).
    """
    Replica.check(model)
    if isinstance(max_runs, bool) or not isinstance(max_runs, int) or max_runs < 1:
        raise ValueError(f"max_runs must be an integer >= 1, got {max_runs!r}")
    Budget(time_budget_s)  # checks it
    device, load_start = resolve_device(device, model), Load.now()
    if device.type == "meta" or Replica.device(model).type == "meta":
        raise ValueError("measure_latency needs real weights; the model or the device is meta")
    args, kwargs = Replica.inputs(inputs, model)
    try:
        runner = Replica.of(model, Replica.real_like(device))  # counters, cached masks: changed on the copy only
        make = Replica.real_like(device, ids_below=Replica.ids_below(model))
        run_args, run_kwargs = Replica.map((args, kwargs), make)
        with Load.fitted_threads():
            result = _time_forward(runner, run_args, run_kwargs, device, time_budget_s, (1, max_runs))
    except Exception as err:
        raise Replica.error(model, args, kwargs, err) from None
    return {**result, "conditions": Load.conditions(load_start)}


def _time_forward(runner, run_args, run_kwargs, device, budget_s, runs):
    """Latency runs of `runner` (a model the lab owns: it is run as it is), timed by measure()."""
    forward = functools.partial(runner, *run_args, **run_kwargs)
    with Replica.eval_mode(runner), torch.inference_mode():
        timed = measure(forward, device=device, budget_s=budget_s, runs=runs, always=True, what="forward")
    batch = tree_flatten((run_args, run_kwargs))[0][0].shape[0]
    return {**timed, "samples_per_s": batch / timed["median_s"], "batch": batch, "device": str(device)}


def _zoo_latency(model, name, batch, device, runs):
    """Latency of a zoo model the lab built itself: no copy needed (it is nobody else's)."""
    inputs = MODEL_ZOO[name][2](batch)
    run_args = Replica.map(Replica.inputs(inputs, model)[0], Replica.real_like(device))
    return _time_forward(model, run_args, {}, device, 1e9, (runs, runs))


def _measure_latencies(records, device, budget_s, progress=None, done=0, total=0, seed=0):
    """Batch-1 and larger-batch latency of every model, planned to fit `budget_s` in all.

    Pass 1, batch 1, cheapest model first (by forward FLOPs, with a floor: tiny models still
    cost): a warm-up and MIN_RUNS runs each.  Before each model its cost is predicted from
    the model before it (seconds per FLOP, build included); a model that would not fit what is
    left is not measured, with the reason.  Pass 2, the larger batch: plan_latency chooses which
    models fit and how many runs each gets; the others are skipped with the reason.
    """
    budget = Budget(budget_s)
    flops = {r["name"]: r["flops"] + 1e8 for r in records}
    order = sorted(flops, key=flops.get)
    big = LATENCY_BATCHES[-1]
    latency, calibration, seconds_per_flop = {}, {}, None
    for name in order:
        predicted = None if seconds_per_flop is None else seconds_per_flop * flops[name]
        if predicted is not None and not budget.fits(predicted, margin=Budget.MARGIN):
            why = (f"planned skip: predicted ~{predicted:.1f} s for batch 1 (x{Budget.MARGIN} margin: "
                   f"{predicted * Budget.MARGIN:.1f} s), more than the {budget.left():.1f} s left of the latency "
                   "budget")
            latency[name] = [{"batch": b, "skipped": why} for b in LATENCY_BATCHES]
            done += len(LATENCY_BATCHES)
            if progress:
                progress(done, total, f"{name} latency skipped (budget)")
            continue
        started = _now()
        seed_everything(seed)
        model = build_model(name, device)
        build_s = _now() - started
        one = _zoo_latency(model, name, 1, device, MIN_RUNS)
        seconds_per_flop = (_now() - started) / flops[name]
        latency[name] = [one]
        calibration[name] = {"build_s": build_s, "batch1_s": one["median_s"]}
        del model
        done += 1
        if progress:
            progress(done, total, f"{name} latency, batch 1")
    for name, runs in plan_latency(calibration, budget.left()).items():
        if isinstance(runs, str):  # a planned skip and its reason
            latency[name].append({"batch": big, "skipped": runs})
        else:
            seed_everything(seed)
            model = build_model(name, device)
            latency[name].append(_zoo_latency(model, name, big, device, runs))
            del model
        done += 1
        if progress:
            progress(done, total, f"{name} latency, batch {big}")
    return {r["name"]: latency[r["name"]] for r in records}


def plan_latency(calibration, budget_s):
    """Timed runs of the larger batch per model: {name: runs, or the reason it is skipped}.

    `calibration[name]` holds build_s and batch1_s.  The larger batch is predicted as batch x
    the batch-1 time (an upper bound: batching never costs more per sample on these models);
    each needs a build, a warm-up and MIN_RUNS runs.  Models go in cheapest first while
    they fit; the rest are skipped with the reason.  Time left over buys every measured model
    more runs alike, up to MAX_RUNS.
    """
    big = LATENCY_BATCHES[-1]
    run_s = {n: c["batch1_s"] * big for n, c in calibration.items()}

    def need(names, runs):
        return sum(calibration[n]["build_s"] + (1 + runs) * run_s[n] for n in names) * Budget.MARGIN
    chosen = []
    for name in sorted(run_s, key=run_s.get):
        if need(chosen + [name], MIN_RUNS) <= budget_s:
            chosen.append(name)
    runs = MIN_RUNS
    while runs < MAX_RUNS and need(chosen, runs + 1) <= budget_s:
        runs += 1
    return {n: runs if n in chosen else
            (f"planned skip: batch {big} predicted {run_s[n] * 1e3:.0f} ms per run; with a warm-up and "
             f"{MIN_RUNS} runs it did not fit the {budget_s:.1f} s left of the latency budget")
            for n in calibration}


def zoo_training_memory(names, batch=Scenarios.TRAIN_MEMORY_BATCH):
    """{zoo model: estimated peak bytes of a training step (fake tensors, fp32 Adam) at `batch`}."""
    return {name: estimate_memory(build_model(name), MODEL_ZOO[name][2](batch))["total"] for name in names}


@stage("dashboard")
def run_dashboard_analysis(run, *, flop_records=None, peak_flops=None, time_budget_s=None, training_memory=None):
    """Everything the dashboard draws, per model of the FLOP figure's zoo.

    Reuses `flop_records` (the FLOP stage's records, batch 1) and `peak_flops` (the training
    stage's fp32 matmul peak) and `training_memory` (zoo_training_memory, worked out beside the
    counting stages) when given; adds the estimated training peak at Scenarios.TRAIN_MEMORY_BATCH
    (fake tensors, fp32 Adam), the measured inference latency at LATENCY_BATCHES planned within
    `time_budget_s` (default: the profile's `latency_s`), each model's utilisation of the peak at
    its largest measured batch (checked_utilisation: never above 1), and the recommendation verdicts.
    """
    records = flop_records or run_flop_analysis(profile=run.profile)["records"]
    budget = time_budget_s if time_budget_s is not None else run.profile.latency_s
    peak = peak_flops or measure_peak_flops(run.device, time_budget_s=run.profile.peak_s)
    data = {"device": _device_name(run.device), "latency_batches": list(LATENCY_BATCHES), "profile": run.profile.name,
            "train_memory_batch": Scenarios.TRAIN_MEMORY_BATCH, "peak_flops": peak, "latency_budget_s": budget,
            "models": {}}
    steps = (1 + len(LATENCY_BATCHES)) * len(records)  # a memory estimate, then each latency batch
    training_memory = training_memory or {}
    for i, record in enumerate(records):  # training memory: fake tensors, no real compute
        name = record["name"]
        memory = training_memory.get(name) or zoo_training_memory([name])[name]
        data["models"][name] = {**{k: record[k] for k in ("kind", "flops", "macs", "training_flops", "parameters")},
                                "training_memory_bytes": memory}
        run.report(i + 1, steps, f"{name} memory")
    latency = _measure_latencies(records, run.device, budget, run.progress, done=len(records), total=steps,
                                 seed=run.seed)
    for name, runs in latency.items():
        data["models"][name]["latency"] = runs
    _add_utilisation(data, run.device, run.profile.peak_s)
    data["scores"], data["verdicts"] = Scenarios.recommend(data["models"]), Scenarios.verdicts(data["models"])
    return data


def _add_utilisation(data, device, peak_s):
    """Forward FLOP/s at the largest measured batch / the fp32 peak, per model (None if impossible);
    and `utilisation_by_batch`, [[batch, utilisation or None], ...] for every measured batch against
    the final peak, so that a figure compares models at one batch."""
    for m in data["models"].values():
        measured = [r for r in m["latency"] if not r.get("skipped")]
        if not measured:  # not measured at all: no utilisation, and it says why
            m.update(utilisation=None, util_batch=None, utilisation_invalid=None,
                     utilisation_not_measured=m["latency"][0]["skipped"])
            continue
        best = measured[-1]  # the largest batch measured
        achieved = m["flops"] * best["batch"] / best["median_s"]
        m["utilisation"], data["peak_flops"], m["utilisation_invalid"] = checked_utilisation(
            achieved, data["peak_flops"],
            lambda: measure_peak_flops(device, time_budget_s=peak_s))
        m["util_batch"] = best["batch"]
    for m in data["models"].values():
        shares = [(r["batch"], m["flops"] * r["batch"] / r["median_s"] / data["peak_flops"]["flops_per_s"])
                  for r in m["latency"] if not r.get("skipped")]
        m["utilisation_by_batch"] = [[b, u if u <= 1 else None] for b, u in shares]  # above the peak: invalid


# %% =============================================================================================
# 9b. The roofline: where the time of a step goes, and why
# ================================================================================================
# Two measured roofs (Williams, Waterman & Patterson 2009, "Roofline", CACM 52(4)): the peak
# FLOP/s (measure_peak_flops) and the memory bandwidth (measure_bandwidth).  Each op of one
# training step is counted (FLOPs and bytes, _CountingMode) and timed (torch.profiler's self time),
# and sits at its arithmetic intensity (FLOPs per byte).  An op cannot run faster than
#     max(FLOPs / peak FLOP/s, bytes / bandwidth)
# and what it takes beyond that is overhead: dispatch, autograd, Python, a kernel too small to fill
# the machine.  The ridge point (peak / bandwidth, FLOP/byte) splits memory-bound from compute-bound.

ROOFLINE_PRECISIONS = ("fp32", "amp_bf16", "amp_fp16")  # what a step can run in (autocast, fp32 weights)


def _profiled_self_times(step, device, counted=frozenset()):
    """Run `step()` once under torch.profiler; {(op name, in the optimizer): self seconds} of every
    aten op (CUDA: the device time of its kernels; CPU and MPS: host time), and the profiled wall.
    An op the counter never saw (a backend kernel such as mkldnn_convolution, called inside the
    aten::convolution the counter priced) is timed as its nearest ancestor among the `counted` names."""
    from torch.profiler import ProfilerActivity, profile
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    prof = profile(activities=activities)
    with _AllocatorPeak.quiet():
        prof.start()
    _, wall = _timed(device, step)
    with _AllocatorPeak.quiet():
        prof.stop()
    attr = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    times = Counter()
    for ev in prof.events():
        if not ev.name.startswith("aten::"):
            continue  # autograd nodes, Optimizer.step: the framework's own time (the profiled wall keeps it)
        name, parent, in_optimizer = ev.name[len("aten::"):], ev.cpu_parent, False
        while parent is not None:
            parent_name = parent.name[len("aten::"):] if parent.name.startswith("aten::") else None
            if name not in counted and parent_name in counted:
                name = parent_name
            in_optimizer, parent = in_optimizer or parent.name.startswith("Optimizer.step"), parent.cpu_parent
        times[(name, in_optimizer)] += getattr(ev, attr) * 1e-6
    return times, wall


def _static_class(name):
    """The op class of an aten op the counter did not see (a composite wrapper such as aten::linear,
    an empty): from its name, as the counter would plan it."""
    entry = _FORMULAS.get(name)
    if entry is not None and entry.kind == "macs":
        return entry.work
    return "copies" if name in _CountingMode.ZERO_COST and name not in _CountingMode.NO_TRAFFIC else "elementwise/other"


def _op_rows(ops, times, peak, bandwidth):
    """Per (class, op) rows: counted FLOPs and bytes, measured self time, the roofs' time."""
    by_name = {}  # op name -> the class holding most of its FLOPs (mm inside an LSTM is RNN work)
    for (op_class, name), (flops, _, _) in ops.items():
        if op_class != "optimizer" and (name not in by_name or flops > ops[(by_name[name], name)][0]):
            by_name[name] = op_class
    rows = {key: {"class": key[0], "op": key[1], "flops": f, "bytes": b, "calls": c, "measured_s": 0.0}
            for key, (f, b, c) in ops.items()}
    for (name, in_optimizer), seconds in times.items():
        op_class = "optimizer" if in_optimizer else by_name.get(name, _static_class(name))
        row = rows.setdefault((op_class, name), {"class": op_class, "op": name, "flops": 0, "bytes": 0, "calls": 0,
                                                 "measured_s": 0.0})
        row["measured_s"] += seconds
    ridge = peak / bandwidth
    for row in rows.values():
        compute_s, memory_s = row["flops"] / peak, row["bytes"] / bandwidth
        row.update(intensity=_CountingMode.intensity(row["flops"], row["bytes"]), predicted_s=max(compute_s, memory_s),
                   bound="compute" if compute_s >= memory_s and row["flops"] else "memory" if row["bytes"] else "none",
                   achieved_flops_per_s=row["flops"] / row["measured_s"] if row["measured_s"] else None)
        row["why"] = _why(row, ridge)
    return sorted(rows.values(), key=lambda r: -r["measured_s"])


def _why(row, ridge):
    """A few words on what bounds an op or a class: '<bound>-bound: <intensity> FLOP/byte'."""
    if row["intensity"] is None:
        return "no FLOPs, no bytes: overhead only"
    return f"{row['bound']}-bound: {row['intensity']:.3g} FLOP/byte (ridge {ridge:.3g})"


def _class_rows(rows, ridge):
    """The per-op rows summed per op class (_CountingMode.OP_CLASSES order)."""
    out = {}
    for r in rows:
        c = out.setdefault(r["class"], {"flops": 0, "bytes": 0, "calls": 0, "measured_s": 0.0, "predicted_s": 0.0})
        for k in c:
            c[k] += r[k]
    for c in out.values():
        c["intensity"] = _CountingMode.intensity(c["flops"], c["bytes"])
        c["bound"] = ("compute" if c["intensity"] is not None and c["intensity"] >= ridge else
                      "memory" if c["bytes"] else "none")
        c["overhead_s"] = max(c["measured_s"] - c["predicted_s"], 0.0)
        c["achieved_flops_per_s"] = c["flops"] / c["measured_s"] if c["measured_s"] else None
        c["why"] = _why(c, ridge)
    return {k: out[k] for k in _CountingMode.OP_CLASSES if k in out}


def _check_roofline_options(training, precision, device):
    if not isinstance(training, bool):
        raise TypeError(f"training must be True or False, got {training!r}")
    if precision not in ROOFLINE_PRECISIONS:
        raise ValueError(f"precision must be one of {ROOFLINE_PRECISIONS}, got {precision!r}")
    if precision not in supported_precisions(device):
        raise LabError(f"{precision} does not run on {device.type}; here: {', '.join(supported_precisions(device))}")
    if device.type == "meta":
        raise LabError("roofline measures a real step: pass device='cpu', 'cuda' or 'mps' (the model is on meta)")


def _step_of(model, inputs, training, precision, device):
    """A steady-state step on a replica of `model` (forward, backward, Adam; or a no-grad forward):
    (step(), counter-driven step(counter)) with the user's model untouched."""
    args, kwargs = Replica.inputs(inputs, model)
    replica = Replica.of(model, Replica.real_like(device))
    run_args, run_kwargs = Replica.map((args, kwargs), Replica.real_like(device, ids_below=Replica.ids_below(model)))
    if training:
        optimizer = _make_optimizer("adam", [p for p in replica.parameters() if p.requires_grad])
        batches = [(run_args, run_kwargs, None, None)]
        return replica, lambda tracker=None: training_step(replica, optimizer, batches, precision=precision,
                                                           device=device, tracker=tracker)
    replica.eval()

    def forward(tracker=None):
        with tracker or contextlib.nullcontext(), torch.no_grad(), _autocast(precision, device):
            replica(*run_args, **run_kwargs)
    return replica, forward


def roofline(model, inputs, *, training=True, device=None, precision="fp32", time_budget_s=None, peak=None,
             bandwidth=None, dispatch=None, page_faults=None):
    """Where the time of one step of `model` goes, and why: each op's FLOPs and bytes (counted),
    its measured self time (torch.profiler), its bound and its roofline time max(FLOPs / peak,
    bytes / bandwidth), per op and per op class (_CountingMode.OP_CLASSES), against the measured step.

    training: a training step (forward, backward, Adam) or a no-grad forward; precision: fp32 or an
    autocast precision (amp_bf16, amp_fp16), as supported_precisions(device) lists.  `peak`,
    `bandwidth`, `dispatch` and `page_faults` (measure_peak_flops, measure_bandwidth,
    measure_dispatch, measure_page_faults results) are measured when not given.  The model is never
    changed: everything runs on a replica.
    Returns rows (per op), classes, predicted_step_s (roofs only), predicted_with_dispatch_s (plus
    each op call's measured dispatch cost), page_faults and page_fault_s (a timed step's minor page
    faults, median, and what they cost at measure_page_faults' rate: measured, not predicted),
    measured_step_s (median, with its spread), overhead_s (measured - predicted_step_s: all the roofs
    leave unexplained, the per-call cost and the page faults included), peak_flops_per_s,
    bandwidth_bytes_per_s, ridge_flops_per_byte.
    """
    Replica.check(model)
    device = resolve_device(device, model)
    _check_roofline_options(training, precision, device)
    args, kwargs = Replica.inputs(inputs, model)  # a bad shape is refused before anything is measured
    budget = Budget(time_budget_s or DEFAULT.roofline_step_s)
    peak = peak or measure_peak_flops(device, precision, time_budget_s=DEFAULT.peak_s / 2)
    bandwidth = bandwidth or measure_bandwidth(device, time_budget_s=DEFAULT.bandwidth_s)
    dispatch = dispatch or measure_dispatch(device)
    page_faults = page_faults or measure_page_faults(device)
    try:
        replica, step = _step_of(model, inputs, training, precision, device)
        faults = []  # minor page faults of each call
        timed = measure(_counting_faults(step, faults), device=device, budget_s=budget.seconds, always=True,
                        what="step")
        counter = _CountingMode()
        with counter.tracking(replica):
            step(counter)
        times, profiled_s = _profiled_self_times(step, device, {name for _, name in counter.ops})
    except LabError:
        raise
    except Exception as err:  # the model cannot run these inputs: the lab's short error, naming the cause
        raise Replica.error(model, args, kwargs, err) from None
    result = _roofline_result(counter, times, timed, profiled_s, peak, bandwidth, dispatch, training, precision,
                              device)
    faults = float(np.median(faults[-timed["runs"]:])) if None not in faults else None  # the timed runs'
    rate = page_faults.get("s_per_fault")
    result.update(page_faults=faults, page_fault_s=None if faults is None or rate is None else faults * rate,
                  page_fault_cost=page_faults)
    return result


def _roofline_result(counter, times, timed, profiled_s, peak, bandwidth, dispatch, training, precision, device):
    peak_rate, bw = peak["flops_per_s"], bandwidth["bytes_per_s"]
    rows = _op_rows(counter.ops, times, peak_rate, bw)
    classes = _class_rows(rows, peak_rate / bw)
    predicted = sum(r["predicted_s"] for r in rows)
    calls = sum(r["calls"] for r in rows)
    measured = timed["median_s"]
    return {"device": _device_name(device), "training": training, "precision": precision,
            "peak_flops_per_s": peak_rate, "bandwidth_bytes_per_s": bw, "ridge_flops_per_byte": peak_rate / bw,
            "flops": sum(r["flops"] for r in rows), "bytes": sum(r["bytes"] for r in rows), "calls": calls,
            "predicted_step_s": predicted, "dispatch_s_per_call": dispatch["s_per_call"],
            "predicted_with_dispatch_s": predicted + calls * dispatch["s_per_call"],
            "measured_step_s": measured, "measured": {k: timed[k] for k in ("median_s", "spread_lo_s", "spread_hi_s",
                                                                            "runs", "spread")},
            "profiled_step_s": profiled_s, "profiled_ops_s": sum(times.values()),
            "overhead_s": max(measured - predicted, 0.0), "classes": classes, "rows": rows}


def measure_dispatch(device=None, *, time_budget_s=0.1):
    """Seconds one op call of a training step costs on `device` whatever its size: the measured
    step (measure()) of a tiny MLP (8 -> 8 -> 4 -> 2, batch 2, Adam), whose FLOPs and bytes take no
    time at all, over its counted op calls.  The third roof of a small model: a floor per op call
    (Python, autograd, dispatcher, launch) that neither FLOPs nor bytes explain."""
    device = resolve_device(device)
    tiny = mlp(8, in_features=8, classes=2)
    replica, step = _step_of(tiny, (2, 8), True, "fp32", device)
    timed = measure(step, device=device, budget_s=time_budget_s, always=True, what="tiny step")
    counter = _CountingMode()
    step(counter)
    calls = sum(c for _, _, c in counter.ops.values())
    return {"s_per_call": timed["median_s"] / calls, "spread_lo_s": timed["spread_lo_s"] / calls,
            "spread_hi_s": timed["spread_hi_s"] / calls, "runs": timed["runs"], "calls": calls,
            "method": f"a training step of mlp(8, in_features=8, classes=2) at batch 2 (Adam): median / "
                      f"{calls} op calls"}


def _counting_faults(step, counts):
    """`step` that appends its call's minor page faults to `counts` (None where the OS does not
    count them).  NB: counted on the timed runs, not on the profiled step: the profiler's own
    buffers keep the heap's top in use, and the step's faults vanish under it."""
    def run(*args, **kwargs):
        before = minor_page_faults()
        out = step(*args, **kwargs)
        counts.append(None if before is None else minor_page_faults() - before)
        return out
    return run


def minor_page_faults():
    """The process's minor page faults so far (getrusage), or None where the OS does not count them."""
    try:
        import resource
    except ImportError:  # Windows
        return None
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


FIRST_TOUCH_BYTES = 64 * MIB  # above glibc's largest mmap threshold (32 MiB): a fresh mapping every time


def measure_page_faults(device=None, *, time_budget_s=0.1):
    """Seconds one minor page fault costs on this CPU: filling a fresh FIRST_TOUCH_BYTES tensor
    (memory the OS maps in and zeroes page by page as it is first touched) against filling one
    already held, over the faults the fresh one took.  A large tensor made anew each step pays this
    every step: the CPU allocator hands big blocks back to the OS on free (glibc maps blocks above its
    mmap threshold and unmaps them; it trims the heap's free top), where a GPU's caching allocator
    keeps them.  CPU only; elsewhere `skipped` says why."""
    device = resolve_device(device)
    if device.type != "cpu" or minor_page_faults() is None:
        why = "this OS does not report them" if device.type == "cpu" else f"{device.type} is not the CPU"
        return {"s_per_fault": None, "skipped": f"page faults are counted on a CPU whose OS reports them "
                                                f"(getrusage): {why}"}
    n = FIRST_TOUCH_BYTES // 4
    held = torch.empty(n)
    fresh = measure(lambda: torch.empty(n).fill_(1.0), device=device, budget_s=time_budget_s / 2, always=True,
                    what="fresh fill")
    reused = measure(held.fill_, 1.0, device=device, budget_s=time_budget_s / 2, always=True, what="held fill")
    before = minor_page_faults()
    torch.empty(n).fill_(1.0)
    faults = minor_page_faults() - before
    extra_s = max(fresh["median_s"] - reused["median_s"], 0.0)
    return {"s_per_fault": extra_s / faults if faults else None, "faults_per_fill": faults,
            "fresh_s": fresh["median_s"], "held_s": reused["median_s"], "bytes": FIRST_TOUCH_BYTES,
            "skipped": None if faults else "filling fresh memory took no page fault here",
            "method": f"fill of a fresh {FIRST_TOUCH_BYTES // MIB} MiB tensor minus the same fill of a held one "
                      f"(medians), over its {faults} minor page faults"}


# name -> (builder, inputs(batch), batch): small models of four kinds, a step each of a few ms
ROOFLINE_MODELS = {
    "MLP-2048": (functools.partial(mlp, 2048), lambda b: (b, 1024), 64),
    "MNIST-CNN": (MnistNet, lambda b: (b, 1, 28, 28), 32),
    "TinyGPT (2x128, T=64)": (functools.partial(TinyGPT, n_layer=2, n_embd=128, n_head=4, block_size=64),
                              lambda b: torch.zeros(b, 64, dtype=torch.long), 8),
    "LSTM (T=32)": (functools.partial(LSTMClassifier, vocab_size=1000, embed=64, hidden=128),
                    lambda b: torch.zeros(b, 32, dtype=torch.long), 16),
}


def _low_precision(device):
    """The autocast precision a roofline compares with fp32 here (bf16 on CPU), or None."""
    return next((p for p in ("amp_bf16", "amp_fp16") if p in supported_precisions(device)), None)


@stage("roofline")
def run_roofline_analysis(run, *, peak_flops=None, models=None):
    """This machine's roofs and every op class of a training step of ROOFLINE_MODELS on them.

    Reuses `peak_flops` (the training stage's fp32 peak) when given.  Per model: one roofline() in
    fp32; the first model also in low precision (bf16 autocast on CPU) where it runs, against its
    own measured peak.  Every number lands in results.json; `why` holds the few words per class and
    per model that other figures can show."""
    device, p = run.device, run.profile
    names = list(models or p.roofline_models or ROOFLINE_MODELS)
    peak = peak_flops or measure_peak_flops(device, time_budget_s=p.peak_s)
    bandwidth = measure_bandwidth(device, time_budget_s=p.bandwidth_s)
    roofs = {"bandwidth": bandwidth, "dispatch": measure_dispatch(device), "page_faults": measure_page_faults(device)}
    models = _roofline_models(run, names, peak, roofs)
    if peak_flops and _above(models, {**peak, "flops_per_s": 1.3 * peak["flops_per_s"]}):  # far above: a peak
        # taken in a bad moment (a busy machine), measured once more as MFU's is; a oneDNN convolution a few
        # percent above the matmul sweep's best is real and stays listed in above_roof
        again = measure_peak_flops(device, time_budget_s=p.peak_s)
        if again["flops_per_s"] > peak["flops_per_s"]:
            peak = {**again, "remeasured": True}
            models = _roofline_models(run, names, peak, roofs)
    data = {"device": _device_name(device), "profile": p.name, "peak_flops": {"fp32": peak}, **roofs,
            "ridge_flops_per_byte": peak["flops_per_s"] / bandwidth["bytes_per_s"],
            "models": models, "low_precision": None}
    data["low_precision"] = _low_precision_case(run, names[0], roofs)
    data["why"] = {name: {c: v["why"] for c, v in m["classes"].items()} for name, m in data["models"].items()}
    data["above_roof"] = [f"{name} {c}: {readable(v['achieved_flops_per_s'], 'FLOP/s')} above the measured peak "
                          "(a kernel the matmul sweep does not reach, or a peak measured in a busy moment)"
                          for name, c, v in _above(models, peak)]
    data["above_bandwidth"] = [f"{name} {c}: {readable(v['bytes'] / v['measured_s'], 'B/s')} above the measured "
                               "bandwidth (part of its data in cache, the roof being DRAM's, or a roof measured in a "
                               "slow moment)"
                               for name, c, v in _above_bandwidth(models, bandwidth)]
    run.report(len(names) + 1, len(names) + 1, "low precision")
    return data


def _roofline_models(run, names, peak, roofs):
    """roofline() of each of ROOFLINE_MODELS[names] in fp32 against these roofs (bandwidth, dispatch,
    page_faults)."""
    models = {}
    for i, name in enumerate(names):
        builder, make_inputs, batch = ROOFLINE_MODELS[name]
        result = roofline(builder(), make_inputs(batch), device=run.device, peak=peak, **roofs,
                          time_budget_s=run.profile.roofline_step_s)
        models[name] = {"batch": batch, **result, "rows": result["rows"][:ROOFLINE_TOP_OPS]}
        run.report(i + 1, len(names) + 1, name)
    return models


def _above_bandwidth(models, bandwidth):
    """(model, class, row) of every op class that moved its counted bytes faster than the bandwidth roof."""
    return [(name, c, v) for name, m in models.items() for c, v in m["classes"].items()
            if v["measured_s"] and v["bytes"] / v["measured_s"] > bandwidth["bytes_per_s"]]


def _above(models, peak):
    """(model, class, row) of every op class whose achieved FLOP/s is above the compute roof."""
    return [(name, c, v) for name, m in models.items() for c, v in m["classes"].items()
            if (v["achieved_flops_per_s"] or 0) > peak["flops_per_s"]]


ROOFLINE_TOP_OPS = 25  # per-op rows kept per model in results.json (by measured time): the rest is in the classes


def _low_precision_case(run, name, roofs):
    """The first model's step in fp32 beside the same step under low-precision autocast, each class
    on its own precision's roofs; None with a reason where no low precision runs here."""
    precision = _low_precision(run.device)
    if precision is None or not run.budget.fits(2 * run.profile.roofline_step_s):
        return {"skipped": "no autocast precision here" if precision is None else "the stage's budget is spent"}
    builder, make_inputs, batch = ROOFLINE_MODELS[name]
    low_peak = measure_peak_flops(run.device, precision, time_budget_s=run.profile.peak_s / 2)
    low = roofline(builder(), make_inputs(batch), device=run.device, precision=precision, peak=low_peak, **roofs,
                   time_budget_s=run.profile.roofline_step_s)
    return {"model": name, "batch": batch, "precision": precision, "peak_flops": low_peak, "skipped": None,
            **{k: low[k] for k in ("classes", "measured_step_s", "predicted_step_s", "ridge_flops_per_byte")}}


# %% =============================================================================================
# 9c. Beyond one device: data-parallel training measured on torch.distributed, and simulated
# ================================================================================================
# Data parallelism gives each of N ranks a copy of the model and 1/N of the global batch.  DDP keeps
# the whole model, its gradients and optimizer state on every rank and all-reduces the gradients;
# FSDP2 (torch.distributed.fsdp.fully_shard) keeps 1/N of each and all-gathers a layer's parameters
# when it runs ("fsdp": ZeRO-3-like, gathered in forward and again in backward; "zero2":
# reshard_after_forward=False, gathered once and kept until backward, close to ZeRO-2).
# Measured: N spawned processes (gloo on CPU, NCCL where there are N GPUs), each reading its own
# allocator as measure_memory does.  Estimated: one process, fake tensors and the fake process
# group (torch/testing/_internal/distributed/fake_pg.py), rank 0's picture at any N.
# Communication, per rank and step, for ring collectives (Patarasuk & Yuan 2009, "Bandwidth optimal
# all-reduce algorithms"; the bus-bandwidth factors of nccl-tests' doc/PERFORMANCE.md): an
# all-reduce of B bytes sends 2(N-1)/N x B, an all-gather or a reduce-scatter (N-1)/N x B of the
# full buffer.  So DDP moves 2(N-1)/N x the gradient bytes (Li et al. 2020, "PyTorch Distributed",
# Sec. 2-3), ZeRO-3 / FSDP 3 x (N-1)/N x the model (ZeRO paper, Sec. 7.2.2: all-gather in forward
# and backward, reduce-scatter of gradients; Zhao et al. 2023, "PyTorch FSDP", Sec. 3).

DISTRIBUTED_STRATEGIES = ("ddp", "zero2", "fsdp")
DIST_TIMED_STEPS = 3      # steady-state steps timed per strategy, after the parity and the memory step
DIST_TIMEOUT_S = 240.0    # a spawned run that has not finished by then is stopped (start-up included)
DIST_PARITY_TOL = 1e-5    # fp32: a data-parallel gradient differs from one process's by summation order only
COLLECTIVE_KINDS = {  # c10d op (as the dispatcher shows it) -> (kind, which argument holds the full buffer)
    "allreduce_": ("all_reduce", 0), "_allgather_base_": ("all_gather", 0),
    "allgather_into_tensor_coalesced_": ("all_gather", 0), "_reduce_scatter_base_": ("reduce_scatter", 1),
    "reduce_scatter_tensor_coalesced_": ("reduce_scatter", 1), "broadcast_": ("broadcast", 0),
}


def ring_bytes(kind, payload_bytes, world_size):
    """Bytes one rank sends (and receives) in a ring collective over a full buffer of `payload_bytes`."""
    n = world_size
    if n <= 1:
        return 0.0
    factor = {"all_reduce": 2 * (n - 1) / n, "all_gather": (n - 1) / n, "reduce_scatter": (n - 1) / n,
              "broadcast": (n - 1) / n}[kind]  # NB: a ring broadcast: each rank passes the buffer on (pipelined)
    return factor * payload_bytes


def communication_formula(strategy, world_size, parameter_bytes, gradient_bytes=None):
    """Bytes each rank sends per training step (it receives as many): ring collectives.
    ddp: all-reduce of the gradients; zero2: all-gather of the parameters once + reduce-scatter of
    the gradients; fsdp: all-gather in forward and again in backward + reduce-scatter."""
    grads = parameter_bytes if gradient_bytes is None else gradient_bytes
    if strategy == "ddp":
        return ring_bytes("all_reduce", grads, world_size)
    gathers = {"zero2": 1, "fsdp": 2}[strategy]
    return gathers * ring_bytes("all_gather", parameter_bytes, world_size) + \
        ring_bytes("reduce_scatter", grads, world_size)


def _check_distributed_options(world_size, strategy, optimizer, precision, most=None):
    strategies = (strategy,) if isinstance(strategy, str) else tuple(strategy)
    bad = [s for s in strategies if s not in DISTRIBUTED_STRATEGIES]
    if bad or not strategies:
        raise ValueError(f"strategy must be one of {list(DISTRIBUTED_STRATEGIES)}, got {strategy!r}")
    if isinstance(world_size, bool) or not isinstance(world_size, (int, np.integer)) or world_size < 1:
        raise ValueError(f"world_size must be an integer >= 1, got {world_size!r}")
    if most is not None and world_size > most[0]:
        raise ValueError(f"world_size={world_size} is more than this machine can run: {most[1]}; "
                         "estimate_distributed simulates any world size in one process")
    _check_memory_options(optimizer, precision)
    return strategies


def _data_parallel(replica, strategy, mesh=None, device=None):
    """`replica` wrapped for `strategy` (the process group must exist): DDP, or fully_shard on each
    unit and the root (fsdp: parameters freed after forward; zero2: kept until backward)."""
    if strategy == "ddp":
        from torch.nn.parallel import DistributedDataParallel
        ids = [device.index] if device is not None and device.type == "cuda" else None
        return DistributedDataParallel(replica, device_ids=ids)
    from torch.distributed.fsdp import fully_shard
    reshard = strategy == "fsdp"
    for unit in Replica.blocks(replica):
        fully_shard(unit, mesh=mesh, reshard_after_forward=reshard)
    return fully_shard(replica, mesh=mesh, reshard_after_forward=reshard)


def _local(t):
    """The rank's own tensor of a DTensor (FSDP's sharded parameter, gradient, Adam state); else `t`."""
    local = getattr(t, "_local_tensor", None)
    return local if local is not None else t


def _mean_loss(output, batch=None):
    """The distributed lesson's loss: the mean of every floating output.  A mean, not the lab's sum:
    N ranks averaging their local means give the mean over the global batch, so DDP's and FSDP's
    averaged gradient equals one process's on the whole batch (a sum would give 1/N of it)."""
    leaves = StepLoss.leaves(output)
    return sum(x.float().mean() for x in leaves) if leaves else None


def _local_batch(tree, rank, world_size):
    """Rank `rank`'s 1/N of every input tensor along dim 0 (the global batch split as a
    DistributedSampler would); ValueError when the batch does not split evenly."""
    def split(x):
        if not isinstance(x, torch.Tensor) or x.dim() == 0:
            return x
        if x.shape[0] % world_size:
            raise ValueError(f"the global batch ({x.shape[0]}, dim 0 of an input of shape {tuple(x.shape)}) "
                             f"must split evenly over world_size={world_size}")
        size = x.shape[0] // world_size
        return x.narrow(0, rank * size, size).clone()  # a rank holds only its own samples
    return tree_map(split, tree)


class _RankTracker(_StorageTracker):
    """The storage tracker for a rank: DTensors are counted by their local shard, buffers a
    collective reads or fills are "communication", and each collective is logged with its payload."""

    def __init__(self, world_size, scratch=False):
        super().__init__(scratch=scratch)
        self.world_size, self.collectives, self.resized_away = world_size, [], set()

    def add(self, tensor, category=None):
        key = super().add(_local(tensor), category)
        if category and self.info[key][2] is None:  # made while wrapping, named once the step starts
            self.info[key][2] = category
        return key

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = super().__torch_dispatch__(func, types, args, kwargs)
        kind = COLLECTIVE_KINDS.get(func._overloadpacket.__name__) if func.namespace == "c10d" else None
        if kind is not None and self.phase != "setup":
            buffers = [t for t in tree_flatten(args[kind[1]])[0] if isinstance(t, torch.Tensor)]
            payload = sum(CpuScratch.dense(_local(t)) for t in buffers)
            self.collectives.append((kind[0], payload))
            for t in buffers:  # a gradient reduce-scattered into place stays a gradient (that is args[0])
                entry = self.info[self.add(t)]
                entry[2] = entry[2] or "communication"
        return out

    def _free(self, sid, key):
        if key in self.resized_away:  # its bytes already went with resize_(0)
            self.live.pop(sid, None)
            return
        super()._free(sid, key)

    def resized(self, tensor, before, after):
        """FSDP frees and re-grows parameter storages in place (storage.resize_): log it as a free or
        an allocation of that storage.  What it re-grows holds the all-gathered (unsharded)
        parameters: "gathered", not the activations or temporaries its phase would make it."""
        storage = _local(tensor).untyped_storage()
        key = self.live.get(id(storage))
        if after and not before:
            if key is None:
                key = self.add(tensor)
            elif key in self.resized_away:
                self.resized_away.discard(key)
                self.events.append((key, 1))
            self.info[key][2] = self.info[key][2] or "gathered"
        elif before and not after and key is not None and key not in self.resized_away:
            self.resized_away.add(key)
            self.events.append((key, -1))

    def communication(self):
        """{kind: {calls, payload_bytes, sent_bytes}} and the total sent per step (ring model)."""
        kinds = {}
        for kind, payload in self.collectives:
            k = kinds.setdefault(kind, {"calls": 0, "payload_bytes": 0, "sent_bytes": 0.0})
            k["calls"] += 1
            k["payload_bytes"] += payload
            k["sent_bytes"] += ring_bytes(kind, payload, self.world_size)
        return kinds, sum(k["sent_bytes"] for k in kinds.values())


@contextlib.contextmanager
def _fsdp_storage_hooks(tracker):
    """Tell `tracker` when FSDP2 frees or re-grows a storage in place: it resizes the unsharded
    parameters' storages to 0 after use instead of dropping them (_fsdp_param.free_storage /
    alloc_storage), which no dispatch mode sees.  NB: patches those two private helpers (torch 2.14)
    for the duration of the block only."""
    from torch.distributed.fsdp._fully_shard import _fsdp_param, _fsdp_param_group
    originals = {(m, name): getattr(m, name) for m in (_fsdp_param, _fsdp_param_group)
                 for name in ("alloc_storage", "free_storage") if hasattr(m, name)}

    def watched(original):
        def run(tensor):
            before = tensor.untyped_storage().size()
            original(tensor)
            tracker.resized(tensor, before, tensor.untyped_storage().size())
        return run
    for (module, name), original in originals.items():
        setattr(module, name, watched(original))
    try:
        yield
    finally:
        for (module, name), original in originals.items():
            setattr(module, name, original)


def _rank_summary(tracker):
    """_memory_summary plus the communication buffers and the all-gathered parameters (total and at
    the peak) and the collectives."""
    summary = tracker.summary()
    live, peak, parts, at_peak = 0, 0, Counter(), Counter()
    for key, sign in tracker.events:
        nbytes, _, category = tracker.info[key]
        live += sign * nbytes
        parts[category] += sign * nbytes
        if live > peak:
            peak, at_peak = live, Counter(parts)
    for category, part in (("communication", "communication_bytes"), ("gathered", "gathered_parameter_bytes")):
        summary[part] = sum(n for n, _, c in tracker.info if c == category)
        summary["at_peak"][part] = int(at_peak[category])
    summary["collectives"], summary["sent_bytes"] = tracker.communication()
    summary["received_bytes"] = summary["sent_bytes"]  # a ring receives what it sends
    return summary


def _state_bytes(model):
    """(parameter bytes, gradient bytes) of the whole model, unsharded."""
    params = list(model.parameters())
    return sum(CpuScratch.dense(p) for p in params), sum(CpuScratch.dense(p) for p in params if p.requires_grad)


def fsdp_shard_bytes(model, world_size, rank=0, optimizer="adam"):
    """FSDP2's sharding arithmetic for one rank: each parameter is split along dim 0 into N chunks of
    ceil(d0 / N) rows (torch.chunk); every rank's parameter and gradient storage is padded to that
    size (torch/distributed/fsdp/_fully_shard/_fsdp_param.py), while Adam's m and v follow the
    unpadded local shard (zeros_like), plus one 4-byte step counter per parameter."""
    params = bytes_grads = optimizer_bytes = 0
    states = OPTIMIZER_STATES[optimizer]
    for p in model.parameters():
        d0 = p.shape[0] if p.dim() else 1
        rows = -(-d0 // world_size)                                  # ceil(d0 / N)
        per_row = (p.numel() // max(d0, 1)) * p.element_size()
        local_rows = max(0, min(rows, d0 - rank * rows))
        params += rows * per_row
        if p.requires_grad:
            bytes_grads += rows * per_row
            optimizer_bytes += states * local_rows * per_row + (4 if optimizer in ("adam", "adamw") else 0)
    return {"parameter_bytes": params, "gradient_bytes": bytes_grads, "optimizer_bytes": optimizer_bytes}


# --- measured: N processes ------------------------------------------------------------------

def _most_ranks(device):
    """(the most ranks this machine runs, why): one per GPU with NCCL, one per CPU core with gloo."""
    if device.type == "cuda":
        n = torch.cuda.device_count()
        return n, f"{n} GPU(s), one rank each (NCCL)"
    n = os.cpu_count() or 1
    return max(n, 1), f"{n} CPU core(s), one rank each (gloo)"


def _free_port():
    import socket
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _reference_step(model, run_args, run_kwargs, job, device):
    """One process on the whole global batch: the gradients and the parameters after one step."""
    replica = Replica.of(model, Replica.real_like(device))
    optimizer = _make_optimizer(job["optimizer"], replica.parameters(), foreach=device.type == "cuda")
    grads = {}
    training_step(replica, optimizer, [(run_args, run_kwargs, None, None)], precision=job["precision"],
                  device=device, loss_fn=_mean_loss,
                  on_gradients=lambda r: grads.update({n: p.grad.detach().clone() for n, p in r.named_parameters()
                                                       if p.grad is not None}))
    return grads, {n: p.detach().clone() for n, p in replica.named_parameters()}


def _full(t):
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def _parity(replica, grads, reference, world_size):
    """Largest |difference| of the gradients (before the step) and the parameters (after it) from
    the single-process run; `grad_ratio` = sum |g| / sum |g_reference| (1: averaged, N: summed)."""
    params = {n: _full(p.detach()) for n, p in replica.named_parameters()}  # all ranks gather
    if reference is None:
        return None
    ref_grads, ref_params = reference
    grad_diff = max((float((grads[n] - g).abs().max()) for n, g in ref_grads.items()), default=0.0)
    param_diff = max((float((params[n] - p).abs().max()) for n, p in ref_params.items()), default=0.0)
    ratio = sum(float(grads[n].abs().sum()) for n in ref_grads) / max(
        sum(float(g.abs().sum()) for g in ref_grads.values()), 1e-30)
    summed = abs(ratio - world_size) < 0.05 * world_size and world_size > 1
    return {"grad_max_abs_diff": grad_diff, "param_max_abs_diff": param_diff, "grad_ratio": ratio,
            "passes": grad_diff <= DIST_PARITY_TOL and param_diff <= DIST_PARITY_TOL,
            "tolerance": DIST_PARITY_TOL,
            "note": (f"gradients are {ratio:.2f}x the single-process ones: summed over the ranks, not averaged "
                     "(pytorch#162338, FSDP2 on gloo)") if summed else None}


def _rank_strategy(model, local, strategy, world_size, job, device, reference):
    """One strategy on this rank: a parity step, a tracked step read from the allocator (on CPU one
    more beside it), timed steps."""
    run_args, run_kwargs = local
    micro = [(run_args, run_kwargs, None, None)]
    options = {"precision": job["precision"], "device": device, "loss_fn": _mean_loss}
    tracker, peak, grads = _RankTracker(world_size), _PeakMemory(device), {}
    try:
        with peak:  # the whole copy-wrap-step, as measure_memory reads it; the peaks are step 2's (and 3's)
            replica = Replica.of(model, Replica.real_like(device))
            with tracker:
                wrapped = _data_parallel(replica, strategy, device=device)
            optimizer = _make_optimizer(job["optimizer"], replica.parameters(), foreach=device.type == "cuda")
            training_step(wrapped, optimizer, micro, **options, on_gradients=lambda r: grads.update(
                {n: _full(p.grad) for n, p in replica.named_parameters() if p.grad is not None}))
            parity = _parity(replica, grads, reference, world_size)
            grads.clear()
            state_bytes = tracker.register_state(replica, optimizer, run_args, run_kwargs)
            before = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
            step_peak = _PeakMemory(device) if device.type == "cuda" else contextlib.nullcontext()
            _AllocatorPeak.mark()
            with step_peak, _fsdp_storage_hooks(tracker):
                training_step(wrapped, optimizer, micro, **options, tracker=tracker)
            _AllocatorPeak.mark()
            if device.type == "cpu":  # gloo's worker thread now and then releases a buffer late: a second reading
                training_step(wrapped, optimizer, micro, **options)
                _AllocatorPeak.mark()
        summary = _rank_summary(tracker)
    finally:
        tracker.close()
    summary["tracked_total"] = summary["total"]
    if device.type == "cuda":
        summary["total"], summary["method"] = before + step_peak.peak_bytes, _PeakMemory.CUDA_SOURCE
    elif peak._cpu.marks:
        summary["step_peaks"] = [since for _, since in peak._cpu.marks[1:]]  # steps 2 and 3
        summary["total"], summary["method"] = max(summary["step_peaks"]), _AllocatorPeak.SOURCE
        if not job["every_thread"]:
            summary["method"] += "; NB: a free made on gloo's worker thread may be missed (an overcount)"
        summary["held_before_step_bytes"] = peak._cpu.marks[0][0]  # allocated and not freed when step 2 began
    else:
        summary["method"] = _StorageTracker.SOURCE + f": {peak.reason}"
    summary.setdefault("step_peaks", [summary["total"]])
    summary["state_bytes"] = state_bytes  # parameters, optimizer state, inputs: what the tracker knew of
    step = functools.partial(training_step, wrapped, optimizer, micro, **options)
    times = [_timed(device, step)[1] for _ in range(DIST_TIMED_STEPS)]
    return {**summary, "parity": parity, "step": time_stats(times)}


def _distributed_child(rank, world_size, port, job_path, out_dir):
    """One rank of measure_distributed (spawned): join the group, run every strategy, write JSON."""
    import datetime
    import torch.distributed as dist
    every_thread = _AllocatorPeak.count_every_thread()  # first: it knows the blocks allocated from now on
    job = {**torch.load(job_path, weights_only=False), "every_thread": every_thread}
    torch.set_num_threads(job["threads"])
    device = torch.device(f"cuda:{rank}") if job["backend"] == "nccl" else torch.device("cpu")
    out = {"rank": rank}
    try:
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(job["backend"], init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                                world_size=world_size, timeout=datetime.timedelta(seconds=job["timeout_s"]))
        run_args, run_kwargs = Replica.map((job["args"], job["kwargs"]), Replica.real_like(device))
        reference = _reference_step(job["model"], run_args, run_kwargs, job, device) if rank == 0 else None
        local = _local_batch((run_args, run_kwargs), rank, world_size)
        out["strategies"] = {s: _rank_strategy(job["model"], local, s, world_size, job, device, reference)
                             for s in job["strategies"]}
    except Exception as err:
        out["error"] = f"{type(err).__name__}: {_first_line(err)}"
    finally:
        with contextlib.suppress(Exception):
            if dist.is_initialized():
                dist.destroy_process_group()
        write_json_atomic(out, Path(out_dir) / f"rank{rank}.json")


def _stop(processes):
    """Terminate, then kill, every process still alive; wait for each."""
    for p in processes:
        if p.is_alive():
            p.terminate()
    for p in processes:
        p.join(5)
        if p.is_alive():
            p.kill()
            p.join(5)


def rank_server():
    """The multiprocessing context ranks (and the CLI's work beside the counting stages, _Beside)
    start from, its server started now (main() starts it before the counting stages, whose work does
    not mind sharing the CPU with the server's imports).

    forkserver (Linux, macOS) imports torch and this module once, in a fresh server process, and
    forks every rank from it: ~3 s saved per rank on 2 cores.  Not plain fork: this process may have
    run autograd and OpenMP's threads, which do not survive a fork (pytorch wiki, Autograd-and-Fork).
    Elsewhere, spawn."""
    import multiprocessing.forkserver as server

    import torch.multiprocessing as mp
    if "forkserver" not in mp.get_all_start_methods():
        return mp.get_context("spawn")
    context = mp.get_context("forkserver")
    context.set_forkserver_preload(["torch", "torch._dynamo", "pytorch_practice_demo"])  # _dynamo: the first
    # optimizer or fake tensor imports it (and sympy), ~1.1 s quiet: paid once here, not in every child
    with _importable_here():
        server.ensure_running()
    return context


@contextlib.contextmanager
def _importable_here():
    """This module importable by its path inside the block: the forkserver imports it, and a
    spawned child (spawn copies sys.path) imports it by name."""
    sys.path.insert(0, str(_HERE))
    try:
        yield
    finally:
        sys.path.remove(str(_HERE))


def _start_process(target, *args):
    """A daemon process running target(*args), started from rank_server()'s context."""
    with _importable_here():
        process = rank_server().Process(target=target, args=args, daemon=True)
        process.start()
    return process


def stop_rank_server():
    """Nothing stays behind: the forkserver and the resource tracker it started, stopped and waited
    for (CPython's own _stop, as its tests use); nothing to do when none runs."""
    import multiprocessing.forkserver as server
    import multiprocessing.resource_tracker as tracker
    with contextlib.suppress(AttributeError, OSError, ChildProcessError):
        server._forkserver._stop()
        tracker._resource_tracker._stop()


def _spawn_ranks(job, world_size, timeout_s):
    """Run `world_size` ranks of _distributed_child (forkserver or spawn) and read what each wrote.
    Every process is stopped on return: on success, on a rank's error, on timeout or on Ctrl-C."""
    processes = []
    with tempfile.TemporaryDirectory(prefix="lab-dist-") as tmp:
        job_path = Path(tmp) / "job.pt"
        torch.save(job, job_path)
        port, deadline = _free_port(), _now() + timeout_s
        for rank in range(world_size):
            processes.append(_start_process(_distributed_child, rank, world_size, port, str(job_path), tmp))
        try:
            while any(p.is_alive() for p in processes):
                failed = [p for p in processes if not p.is_alive() and p.exitcode]
                if failed or _now() > deadline:
                    break
                processes[0].join(0.05)
        finally:
            _stop(processes)
            stop_rank_server()
        results = []
        for rank, p in enumerate(processes):
            path = Path(tmp) / f"rank{rank}.json"
            results.append(json.loads(path.read_text()) if path.exists() else
                           {"rank": rank, "error": f"exited with code {p.exitcode} before reporting (a script "
                            "that calls measure_distributed needs the `if __name__ == '__main__':` guard: "
                            "spawned ranks import it)" if _now() <= deadline else f"stopped after {timeout_s:.0f} s"})
    return {"results": results, "port": port}


def _distributed_job(model, inputs, strategies, world_size, optimizer, precision, device):
    Replica.check(model)
    args, kwargs = Replica.inputs(inputs, model)
    if Replica.device(model).type == "meta":
        raise ValueError("measure_distributed needs real weights; the model is on the meta device "
                         "(estimate_distributed simulates it)")
    cpu = torch.device("cpu")
    args, kwargs = Replica.map((args, kwargs), Replica.real_like(cpu, ids_below=Replica.ids_below(model)))
    _local_batch((args, kwargs), 0, world_size)  # ValueError now if the batch does not split
    cpu_model = model if Replica.device(model).type == "cpu" else Replica.of(model, Replica.real_like(cpu))
    threads = max(1, (os.cpu_count() or 1) // world_size) if device.type == "cpu" else 1
    return {"model": cpu_model, "args": args, "kwargs": kwargs, "strategies": list(strategies),
            "optimizer": optimizer, "precision": precision, "threads": threads, "timeout_s": DIST_TIMEOUT_S,
            "backend": "nccl" if device.type == "cuda" else "gloo"}


def measure_distributed(model, inputs, *, world_size=2, strategy="ddp", optimizer="adam", precision="fp32",
                        device=None):
    """Train a copy of `model` data-parallel in `world_size` processes and measure each rank.

    Starts the ranks (torch.multiprocessing: from a forkserver, else spawn) on a free port of
    127.0.0.1: gloo on CPU, NCCL on CUDA with one GPU per rank.  `inputs` is the global batch, split
    along dim 0.  Each rank runs one step compared with a single process on the whole batch
    (parity), one step read from its allocator (as measure_memory: the allocator's total through the
    profiler on CPU, max_memory_allocated on CUDA, the parts from the storage tracker) with its
    collectives counted, and DIST_TIMED_STEPS timed steps.  `strategy` is one of
    DISTRIBUTED_STRATEGIES, or a tuple of them run in one start of the ranks
    (then {strategy: result}).  The loss is the mean of the outputs (_mean_loss).  Returns per rank
    `total` (peak bytes), the parts, `sent_bytes`/`received_bytes` per step, `collectives`, `step`
    (time_stats) and on rank 0 `parity`.  Every process is stopped before it returns, on error too.

    On CPU a rank reads a second step's peak too (`step_peaks`; `total` is the higher): gloo's
    worker thread releases a collective's buffers when it next runs, now and then milliseconds after
    the program let go of them, and a peak that falls then holds them too.  The lowest reading is the
    program's own, what estimate_distributed predicts; the others show that scheduling's cost.
    """
    device = resolve_device(device, model)
    strategies = _check_distributed_options(world_size, strategy, optimizer, precision, _most_ranks(device))
    job = _distributed_job(model, inputs, strategies, int(world_size), optimizer, precision, device)
    start = _now()
    spawned = _spawn_ranks(job, int(world_size), DIST_TIMEOUT_S)
    errors = [r["error"] for r in spawned["results"] if "error" in r]
    if errors:
        raise RuntimeError(f"a rank failed: {errors[0]}")
    param_bytes, grad_bytes = _state_bytes(model)
    out = {}
    for s in strategies:
        ranks = [r["strategies"][s] for r in spawned["results"]]
        out[s] = {"strategy": s, "world_size": int(world_size), "ranks": ranks, "parity": ranks[0]["parity"],
                  "total": max(r["total"] for r in ranks), "sent_bytes": ranks[0]["sent_bytes"],
                  "formula_sent_bytes": communication_formula(s, int(world_size), param_bytes, grad_bytes),
                  "backend": job["backend"], "device": str(device), "method": ranks[0]["method"],
                  "threads_per_rank": job["threads"]}
    wall_s = _now() - start
    batch_norm = any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    for s in strategies:
        out[s].update(wall_s=wall_s, port=spawned["port"])
        parity = out[s]["parity"]
        if parity and not parity["passes"] and batch_norm and not parity["note"]:
            parity["note"] = ("BatchNorm normalises each rank's batch / N, not the global batch: its gradients differ "
                              "(nn.SyncBatchNorm would share the statistics)")
    return out[strategy] if isinstance(strategy, str) else out


# --- simulated: one process, fake tensors, the fake process group ---------------------------------

@contextlib.contextmanager
def _fake_process_group(world_size):
    """A fake process group of `world_size` ranks in this process (this process is rank 0) and its
    1-D device mesh (made outside FakeTensorMode); destroyed on exit, whatever happens."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.testing._internal.distributed.fake_pg import FakeStore  # registers the "fake" backend
    if dist.is_initialized():
        raise LabError("a process group is already initialised in this process; estimate_distributed needs its "
                       "own (fake) one: call it outside torch.distributed code")
    dist.init_process_group("fake", rank=0, world_size=world_size, store=FakeStore())
    try:
        yield init_device_mesh("cpu", (world_size,))
    finally:
        dist.destroy_process_group()


def _simulate_sharded(model, run_args, run_kwargs, strategy, world_size, optimizer, precision):
    """Rank 0's tracked step of fully_shard on fake tensors with the fake process group."""
    cpu, fake_mode, dtype = torch.device("cpu"), FakeTensors.mode(), PURE_DTYPES.get(precision)
    make = Replica.fake_like(fake_mode, cpu, dtype)
    tracker = _RankTracker(world_size, scratch=True)  # CPU kernels' working memory, as estimate_memory
    with _fake_process_group(world_size) as mesh:
        # sharded on meta, then given fake storages (FSDP2's deferred initialisation, to_empty); fully_shard
        # splits each parameter into N views (torch.chunk), cheap on meta but N Python objects each on fake
        # tensors (Llama-70B at N=512: 30 s of 37).  to_empty gives rank 0 its padded shards, as sharding fake
        # tensors does; the tracker starts at register_state, which counts them as parameters.
        replica = Replica.of(model, functools.partial(Replica.meta_like, dtype=dtype))
        wrapped = _data_parallel(replica, strategy, mesh=mesh)
        Replica.materialize(replica, fake_mode, cpu)
        try:
            opt = _make_optimizer(optimizer, replica.parameters(), foreach=False)
            with fake_mode:
                args, kwargs = Replica.map(_local_batch((run_args, run_kwargs), 0, world_size), make)
            # a first step, as the measured ranks run: FSDP's lazy set-up, the optimizer's state, and
            # the buffers one step leaves to the next are then there, as in steady training
            training_step(wrapped, opt, [(args, kwargs, None, None)], precision=precision, device=cpu,
                          loss_fn=_mean_loss, compute=fake_mode)
            tracker.register_state(replica, opt, args, kwargs)
            with _fsdp_storage_hooks(tracker):
                training_step(wrapped, opt, [(args, kwargs, None, None)], precision=precision, device=cpu,
                              loss_fn=_mean_loss, tracker=tracker, compute=fake_mode)
            return _rank_summary(tracker)
        finally:
            tracker.close()


def estimate_distributed(model, inputs, *, world_size, strategy, optimizer="adam", precision="fp32"):
    """Rank 0's memory and communication per step under `strategy` on `world_size` ranks, in this
    process and without real arithmetic: any world size, models on meta included.

    fsdp / zero2: fully_shard runs for real on fake tensors, with the fake process group (its
    collectives do nothing but are seen, with their sizes, by the storage tracker).  ddp: DDP
    refuses fake tensors (it checks parameter data across ranks), so it is estimate_memory of one
    rank's step (the local batch) plus DDP's gradient buckets, which hold a flat copy of every
    gradient (torch/csrc/distributed/c10d/reducer.cpp, gradient_as_bucket_view=False), all-reduced
    once per step.  `method` says which.  The loss is the mean of the outputs, as measure_distributed's.
    """
    Replica.check(model)
    _check_distributed_options(world_size, strategy, optimizer, precision)
    args, kwargs = Replica.inputs(inputs, model)
    _local_batch((args, kwargs), 0, world_size)  # ValueError now if the batch does not split
    param_bytes, grad_bytes = _state_bytes(model)
    base = {"strategy": strategy, "world_size": int(world_size), "optimizer": optimizer, "precision": precision,
            "formula_sent_bytes": communication_formula(strategy, world_size, param_bytes, grad_bytes)}
    if strategy != "ddp":
        with FakeTensors.quiet():
            try:
                summary = _simulate_sharded(model, args, kwargs, strategy, world_size, optimizer, precision)
            except (LabError, ValueError):
                raise
            except Exception as err:
                raise Replica.error(model, args, kwargs, err) from None
        return {**summary, **base, "method": f"fully_shard on fake tensors, fake process group of {world_size} "
                                             "ranks (rank 0)"}
    local = Replica.map(_local_batch((args, kwargs), 0, world_size), Replica.meta_like)
    single = estimate_memory(model, local[1] or local[0], optimizer=optimizer, precision=precision,
                             loss_fn=_mean_loss)
    buckets = grad_bytes  # DDP builds its buckets on any number of ranks
    summary = {k: v for k, v in single.items() if k not in ("training", "optimizer_name", "checkpointing")}
    summary["at_peak"] = {**single["at_peak"], "communication_bytes": buckets}
    collectives = {"all_reduce": {"calls": None, "payload_bytes": grad_bytes,
                                  "sent_bytes": ring_bytes("all_reduce", grad_bytes, world_size)}}
    sent = collectives["all_reduce"]["sent_bytes"]
    return {**summary, **base, "total": single["total"] + buckets, "communication_bytes": buckets,
            "collectives": collectives, "sent_bytes": sent, "received_bytes": sent,
            "method": f"estimate_memory of one rank's step (batch / {world_size}) + DDP's gradient buckets"}


# --- a Llama-like configuration, built on meta: what a learner asks about ---------------------------

class LlamaBlock(nn.Module):
    """One Llama decoder layer: RMSNorm, attention with grouped key/value heads, RMSNorm, SwiGLU MLP;
    no biases.  NB: no rotary embedding (it has no parameters; its small activations are left out)."""

    def __init__(self, hidden, heads, kv_heads, ffn):
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = heads, kv_heads, hidden // heads
        self.norm1, self.norm2 = nn.RMSNorm(hidden), nn.RMSNorm(hidden)
        self.q = nn.Linear(hidden, hidden, bias=False)
        self.kv = nn.Linear(hidden, 2 * kv_heads * self.head_dim, bias=False)
        self.o = nn.Linear(hidden, hidden, bias=False)
        self.gate_up = nn.Linear(hidden, 2 * ffn, bias=False)
        self.down = nn.Linear(ffn, hidden, bias=False)

    def forward(self, x):                                    # (B, T, C)
        b, t, c = x.shape
        h = self.norm1(x)
        q = self.q(h).view(b, t, self.heads, self.head_dim).transpose(1, 2)             # (B, H, T, D)
        k, v = self.kv(h).view(b, t, 2 * self.kv_heads, self.head_dim).transpose(1, 2).chunk(2, dim=1)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)    # (B, H, T, D)
        x = x + self.o(y.transpose(1, 2).reshape(b, t, c))
        gate, up = self.gate_up(self.norm2(x)).chunk(2, dim=-1)
        return x + self.down(F.silu(gate) * up)


class LlamaLike(nn.Module):
    """Token embedding, `layers` LlamaBlocks, a final RMSNorm and an untied LM head."""

    def __init__(self, vocab=32000, layers=32, hidden=4096, heads=32, kv_heads=32, ffn=11008):
        super().__init__()
        self.embed = nn.Embedding(vocab, hidden)
        self.layers = nn.ModuleList(LlamaBlock(hidden, heads, kv_heads, ffn) for _ in range(layers))
        self.norm = nn.RMSNorm(hidden)
        self.head = nn.Linear(hidden, vocab, bias=False)

    def forward(self, idx):                                  # (B, T) token ids
        x = self.embed(idx)
        for layer in self.layers:
            x = layer(x)
        return self.head(self.norm(x))                       # (B, T, vocab)


# Llama 2 (Touvron et al. 2023, Table 1; the released config.json): 6.74 B and 68.98 B parameters here
LLAMA_CONFIGS = {
    "Llama-7B": {"vocab": 32000, "layers": 32, "hidden": 4096, "heads": 32, "kv_heads": 32, "ffn": 11008},
    "Llama-70B": {"vocab": 32000, "layers": 80, "hidden": 8192, "heads": 64, "kv_heads": 8, "ffn": 28672},
}


def build_llama(name, layers=None, device="meta"):
    """A LlamaLike of LLAMA_CONFIGS[name] on `device` (meta: no memory), optionally with fewer layers."""
    config = {**LLAMA_CONFIGS[name], **({"layers": layers} if layers else {})}
    with torch.device(device):
        return LlamaLike(**config)


# --- the stage: one small model measured on 2 ranks, a large one simulated ----------------------------

DEVICE_MEMORY_BYTES = 80 * 10 ** 9  # an 80 GB accelerator (NVIDIA A100/H100 80GB data sheets): the line to fit under
ZERO_WORLDS = tuple(2 ** k for k in range(11))  # 1 .. 1024 ranks


PER_LAYER_FROM = 3  # the first layers differ (the root's parameters, prefetching): from layer 3 on each adds the same


def simulate_per_layer(name, world_size, *, strategy="fsdp", tokens=256, layers=None):
    """Rank 0's peak for LLAMA_CONFIGS[name] on `world_size` ranks, cheaply: the model simulated with
    3 and with 4 layers (estimate_distributed, batch 1 x `tokens` per rank), and each further layer
    adding what the fourth added: peak(L) = peak(4) + (L - 4) x (peak(4) - peak(3)).  Checked against
    all 80 layers of Llama-70B at 8, 64 and 512 ranks (benchmarks/bench.py: equal to the byte shown,
    143.35, 41.39 and 30.83 GiB), where simulating them all takes ~10 s a world size.  `layers`
    simulates that many layers whole instead."""
    inputs = torch.zeros(world_size, tokens, dtype=torch.long, device="meta")
    if layers:
        e = estimate_distributed(build_llama(name, layers), inputs, world_size=world_size, strategy=strategy)
        return {"total": e["total"], "method": f"all {layers} layers simulated"}
    full, first = LLAMA_CONFIGS[name]["layers"], PER_LAYER_FROM
    lower, upper = (estimate_distributed(build_llama(name, n), inputs, world_size=world_size, strategy=strategy)
                    ["total"] for n in (first, first + 1))
    return {"total": upper + (full - first - 1) * (upper - lower), "per_layer_bytes": upper - lower,
            "method": f"{first} and {first + 1} layers simulated; each further layer adds the difference"}


def _zero_curves(name):
    parameters = sum(p.numel() for p in build_llama(name).parameters())
    per_world = [zero_memory_per_device(parameters, n) for n in ZERO_WORLDS]
    return parameters, {stage: [w[stage] for w in per_world] for stage in per_world[0]}


def _measured_part(model, inputs, world_size, run):
    """The three strategies measured in one spawn of `world_size` ranks, or why not."""
    if run.profile.distributed_measure_s is None:
        return None, ("not measured with --quick: two spawned processes that import torch take ~5 s quiet, "
                      "~12 s busy, more than the quick run's budget")
    if run.budget.left() < run.profile.distributed_measure_s:
        return None, f"{run.budget.left():.1f} s left of the budget, {run.profile.distributed_measure_s:.0f} s needed"
    return measure_distributed(model, inputs, world_size=world_size, strategy=DISTRIBUTED_STRATEGIES,
                               device="cpu"), None


def simulate_worlds(name, worlds):
    """simulate_per_layer(name, n) for each world size n of `worlds`."""
    return [simulate_per_layer(name, n) for n in worlds]


@stage("distributed")
def run_distributed_analysis(run, *, world_size=2, simulated=None):
    """Per-rank memory, communication and gradient parity of ddp, zero2 and fsdp for a small MLP on
    `world_size` ranks, measured in spawned processes (gloo on CPU) beside the estimate; a Llama-70B
    simulated per rank (one layer scaled) beside the ZeRO paper's formula (`simulated`: those
    simulations, simulate_worlds of the profile's, worked out beside the counting stages)."""
    p = run.profile
    model, batch = mlp(p.distributed_width, in_features=256), p.distributed_batch
    inputs = (batch, 256)
    data = {"device": "cpu (gloo)", "model": f"MLP-{p.distributed_width}", "batch": batch, "world_size": world_size,
            "parameters": sum(q.numel() for q in model.parameters()), "optimizer": "adam", "dtype": "fp32",
            "single": {"measured": measure_memory(model, inputs, loss_fn=_mean_loss),
                       "estimate": estimate_memory(model, inputs, loss_fn=_mean_loss)}}
    run.report(1, 4, "single process")
    data["estimated"] = {s: estimate_distributed(model, inputs, world_size=world_size, strategy=s)
                         for s in DISTRIBUTED_STRATEGIES}
    data["fsdp_arithmetic"] = fsdp_shard_bytes(model, world_size)
    run.report(2, 4, "estimated")
    data["measured"], data["measured_skipped"] = _measured_part(model, inputs, world_size, run)
    run.report(3, 4, "measured")
    large, (parameters, zero) = p.distributed_large, _zero_curves(p.distributed_large)
    data["large"] = {"name": large, "parameters": parameters, "worlds": list(ZERO_WORLDS), "zero": zero,
                     "tokens": 256, "simulated_worlds": list(p.distributed_worlds),
                     "simulated": simulated or simulate_worlds(large, p.distributed_worlds),
                     "zero_7b": _zero_curves("Llama-7B")[1]["ZeRO-3"],
                     "device_memory_bytes": DEVICE_MEMORY_BYTES}
    run.report(4, 4, large)
    return data


def own_distributed(run, model, inputs, world_size):
    """Your model data-parallel, `inputs` being one rank's batch: a list for 2 and for `world_size`
    ranks, each in run_distributed_analysis's shape (single, estimated, measured, measured_skipped).  On 2 ranks
    measured (gloo, CPU; a model on meta is not) beside the estimate; on `world_size` ranks simulated,
    with one process on one rank's batch as the "single" bar."""
    _check_distributed_options(world_size, DISTRIBUTED_STRATEGIES, "adam", "fp32")
    local = Replica.map(Replica.inputs(inputs, model), Replica.meta_like)

    def global_batch(n):  # n ranks' batches, as one input
        args, kwargs = Replica.map(local, lambda t: t.repeat(n, *[1] * (t.dim() - 1)) if t.dim() else t)
        return kwargs or args
    out, rank_batch = [], tree_flatten(local)[0][0].shape[0]
    single = {"measured": None, "estimate": estimate_memory(model, local[1] or local[0], loss_fn=_mean_loss)}
    for n in dict.fromkeys((2, int(world_size))):
        data = {"world_size": n, "rank_batch": rank_batch, "global_batch": n * rank_batch, "single": single,
                "estimated": {s: estimate_distributed(model, global_batch(n), world_size=n, strategy=s)
                              for s in DISTRIBUTED_STRATEGIES}}
        data["measured"], data["measured_skipped"] = None, f"simulated only: this machine runs 2 ranks, not {n}"
        if n == 2 and Replica.device(model).type == "meta":
            data["measured_skipped"] = "the model is on the meta device: no weights to train"
        elif n == 2:
            data["measured"], data["measured_skipped"] = _measured_part(model, global_batch(2), 2, run)
        out.append(data)
    return out


# %% =============================================================================================
# 10. The lecture, claim by claim
# ================================================================================================
# The lecture guide's formulas and optimisation table (its "核心概念速览"), each beside what this
# lab counts or measures here.  Earlier stages' numbers are reused (results.json `stages`); only
# what no stage measures is measured here: a few TinyGPT sizes, fusion, and torch.compile on request.


def lecture_memory_terms(parameters, *, batch, seq, hidden, layers, bytes_per_element=BYTES_PER_ELEMENT[torch.float32]):
    """The lecture's training memory: weights, gradients = weights, Adam = 2 x weights, and
    activations = batch x sequence x hidden x layers x bytes."""
    weights = parameters * bytes_per_element
    return {"parameter_bytes": weights, "gradient_bytes": weights, "optimizer_bytes": 2 * weights,
            "activation_bytes": batch * seq * hidden * layers * bytes_per_element}


LECTURE_MEMORY_PARTS = ("parameter_bytes", "gradient_bytes", "optimizer_bytes", "activation_bytes")


def _gpt_memory_row(layers, hidden, batch, seq, measured):
    """One TinyGPT size: the lecture's terms beside the measured parts, and the totals' error."""
    parameters = measured["parameters"]
    lecture = lecture_memory_terms(parameters, batch=batch, seq=seq, hidden=hidden, layers=layers)
    lecture_total = sum(lecture.values())
    return {"layers": layers, "hidden": hidden, "batch": batch, "seq": seq, "parameters": parameters,
            "lecture": lecture, "lecture_total": lecture_total,
            "measured": {k: measured[k] for k in LECTURE_MEMORY_PARTS},  # each part's full size
            "at_peak": measured["at_peak"],  # what of each part was alive at the peak: these sum to it
            "measured_total": measured["total"], "method": measured["method"],
            "error": (lecture_total - measured["total"]) / measured["total"]}


def lecture_memory_check(sizes, *, batch, seq=64, known=None, device=None):
    """Measure one Adam training step of TinyGPT at each (layers, hidden) in `sizes` and put the
    lecture's memory formula beside it.  `known` maps (layers, hidden) to a measure_memory result
    at this batch already taken (the memory stage's TinyGPT), reused."""
    device, rows = resolve_device(device), []
    for layers, hidden in sizes:
        measured = (known or {}).get((layers, hidden))
        if measured is None:
            with torch.device(device):
                model = TinyGPT(n_layer=layers, n_embd=hidden, n_head=max(hidden // 64, 1))
            measured = measure_memory(model, torch.zeros(batch, seq, dtype=torch.long, device=device))
            measured["parameters"] = sum(p.numel() for p in model.parameters())
        rows.append(_gpt_memory_row(layers, hidden, batch, seq, measured))
    return rows


def lecture_flop_check(record, *, layers, hidden, vocab):
    """The lecture's FLOP formulas beside FLOPCalculator's counts of TinyGPT (a FLOP record of the
    zoo's TinyGPT, as run_flop_analysis makes) and of one matmul.  Each row: the lecture's value,
    the counted one, the error and, where the lecture is off, the expression that matches."""
    batch, seq = record["input_shape"][:2]
    tokens = batch * seq
    m, k, n = tokens, hidden, 4 * hidden  # the MLP's first matmul of this very model
    counted_mm = FLOPCalculator().analyze_model(nn.Linear(k, n, bias=False, device="meta"), (m, k),
                                                training=False)["flops"]
    params = record["parameters"]
    per_token = record["flops"] / tokens
    rows = [
        {"name": "matmul", "lecture_expr": "2·m·k·n", "lecture": 2 * m * k * n, "counted": counted_mm,
         "shape": f"({m},{k})×({k},{n})", "correct_expr": None},
        {"name": "attention", "lecture_expr": "4·B·T²·H", "lecture": 4 * batch * seq ** 2 * hidden,
         "counted": record["by_class"]["attention"] / layers, "shape": f"B={batch}, T={seq}, H={hidden}, per layer",
         # Q·Kᵀ and P·V: B·T·T·H multiply-adds each; causal kernels skip about half of it
         "correct_expr": None},
        {"name": "per_token", "lecture_expr": "2·L·H·(H+4H)", "lecture": 2 * layers * hidden * 5 * hidden,
         "counted": per_token, "shape": f"L={layers}, H={hidden}, T={seq}, V={vocab}",
         # Kaplan et al. 2020, Table 1 (forward, per token): 2 x the matmul weights (qkv 3H², proj H²,
         # MLP 8H² per layer: 24·L·H² FLOPs) + attention 4·L·T·H (counted in full, no causal halving)
         # + the LM head 2·H·V; plus the elementwise "other" FLOPs this counter reports separately
         "correct_expr": "24·L·H² + 4·L·T·H + 2·H·V",
         "correct": 24 * layers * hidden ** 2 + 4 * layers * seq * hidden + 2 * hidden * vocab},
        {"name": "training_6n", "lecture_expr": "6·N·tokens", "lecture": 6 * params * tokens,
         "counted": record["training_flops"], "shape": f"N={params:,}, tokens={tokens}",
         # Kaplan et al. 2020, Sec. 2.1: C ≈ 6N per token, N the non-embedding parameters; backward
         # is 2x forward.  Embedding lookups do no FLOPs, attention adds 3·4·L·T·H per token
         "correct_expr": "3 × (24·L·H² + 4·L·T·H + 2·H·V) · tokens",
         "correct": 3 * (24 * layers * hidden ** 2 + 4 * layers * seq * hidden + 2 * hidden * vocab) * tokens},
    ]
    for row in rows:
        row["error"] = (row["lecture"] - row["counted"]) / row["counted"]
        row["correct_error"] = ((row["correct"] - row["counted"]) / row["counted"]) if row.get("correct") else None
    return rows


# --- fusion: the same math as a chain of elementwise ops, and as PyTorch's one kernel ----------------

class Fusion:
    """Each case (CASES): the op written out elementwise (each op a kernel and a temporary), and
    PyTorch's fused kernel for the same math."""

    @staticmethod
    def gelu_composed(x):
        c = math.sqrt(2 / math.pi)  # the tanh approximation of GELU (Hendrycks & Gimpel 2016, Sec. 2)
        return 0.5 * x * (1 + torch.tanh(c * (x + 0.044715 * x ** 3)))

    @staticmethod
    def gelu_fused(x):
        return F.gelu(x, approximate="tanh")

    @staticmethod
    def layer_norm_composed(x, eps=1e-5):
        mean = x.mean(-1, keepdim=True)
        var = ((x - mean) ** 2).mean(-1, keepdim=True)
        return (x - mean) / torch.sqrt(var + eps)

    @staticmethod
    def layer_norm_fused(x, eps=1e-5):
        return F.layer_norm(x, x.shape[-1:], eps=eps)

    CASES = {"GELU (tanh)": ("gelu_composed", "gelu_fused"), "LayerNorm": ("layer_norm_composed", "layer_norm_fused")}


def measure_fusion(*, device=None, shape=DEFAULT.fusion_shape, time_budget_s=DEFAULT.fusion_s):
    """Time (measure) and peak memory (_PeakMemory) of each Fusion case on one fp32 tensor of
    `shape`.  Returns {case: {"composed": time_stats + peak_bytes, "fused": ..., "speedup",
    "memory_saving", "max_abs_diff"}}; speedup > 1 means the fused kernel is faster."""
    device = resolve_device(device)
    budget = Budget(time_budget_s)
    x = torch.randn(shape, generator=torch.Generator().manual_seed(0)).to(device)
    out = {"shape": list(shape), "dtype": "fp32", "device": _device_name(device), "cases": {}}
    with torch.inference_mode(), Load.fitted_threads():
        for i, (name, pair) in enumerate(Fusion.CASES.items()):
            case = {}
            for j, (key, fn) in enumerate(zip(("composed", "fused"), (getattr(Fusion, f) for f in pair))):
                share = budget.share(2 * (len(Fusion.CASES) - i) - j)  # what is left, shared by the calls to time
                case[key] = measure(fn, x, device=device, budget_s=share, always=True, what="call")
                with _PeakMemory(device) as peak:  # bytes the call allocates at most beyond its input
                    fn(x)
                case[key]["peak_bytes"] = peak.peak_bytes
            case["speedup"] = case["composed"]["median_s"] / case["fused"]["median_s"]
            peaks = case["composed"]["peak_bytes"], case["fused"]["peak_bytes"]
            case["memory_saving"] = None if None in peaks else 1 - peaks[1] / peaks[0]
            composed, fused = (getattr(Fusion, f) for f in pair)
            case["max_abs_diff"] = float((composed(x) - fused(x)).abs().max())
            out["cases"][name] = case
    out["conditions"] = None
    return out


# --- torch.compile on the training model, in a child process so that a slow compile is bounded ------
def _compile_child(width, depth, batch, steps):
    """Run in a child by measure_compile: eager and compiled Adam steps of ResMLPClassifier; JSON out."""
    torch.manual_seed(0)
    model = ResMLPClassifier(width=width, depth=depth)
    x, y = torch.randn(batch, 784), torch.randint(0, 10, (batch,))
    cpu = torch.device("cpu")

    def timed_steps(net, optimizer):
        def step():
            F.cross_entropy(net(x), y).backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        first = _timed(cpu, step)[1]  # the compiled model compiles here
        return first, time_stats([_timed(cpu, step)[1] for _ in range(steps)])

    eager = timed_steps(model, torch.optim.Adam(model.parameters()))
    compiled_model = torch.compile(model)
    compiled = timed_steps(compiled_model, torch.optim.Adam(model.parameters()))
    print(json.dumps({"eager": eager[1], "compiled": compiled[1], "compile_s": compiled[0] - eager[1]["median_s"],
                      "first_compiled_step_s": compiled[0]}))


def measure_compile(*, time_budget_s=90.0, width=128, depth=8, batch=256, steps=20):
    """torch.compile on the training comparison's model: the first call's compile time, reported
    apart from the step time, and eager vs compiled step time.  Runs in a child process killed
    after `time_budget_s`, so a slow compile (inductor builds C++ on CPU) cannot stall the lab;
    then `skipped` says why."""
    base = {"width": width, "depth": depth, "batch": batch, "steps": steps, "budget_s": time_budget_s}
    if sys.platform == "win32" or not hasattr(torch, "compile"):
        return {**base, "skipped": "torch.compile is not supported on this platform"}
    code = (f"import sys; sys.path.insert(0, {str(_HERE)!r}); import pytorch_practice_demo as lab; "
            f"lab._compile_child({width}, {depth}, {batch}, {steps})")
    start = _now()
    try:
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=time_budget_s)
    except subprocess.TimeoutExpired:
        return {**base, "skipped": f"compiling and timing took longer than its {time_budget_s:.0f} s budget here "
                                   "(inductor generates and builds C++ for the CPU); stopped"}
    if proc.returncode != 0:
        last = [line for line in proc.stderr.strip().splitlines() if line.strip()][-1:] or ["no message"]
        return {**base, "skipped": f"torch.compile failed here: {last[0][:200]}"}
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result["speedup"] = result["eager"]["median_s"] / result["compiled"]["median_s"]
    return {**base, **result, "wall_s": _now() - start, "skipped": None}


recommendation_verdicts, recommend_models = Scenarios.verdicts, Scenarios.recommend  # public names


class LectureClaims:
    """The lecture's optimisation table, cell by cell (rows), each beside this machine's measured
    value from the training comparison or the fusion measurement, and a verdict with its spread.

    TABLE: (technique, aspect, the lecture's words, the range read as agreeing).  Speed is a
    speed-up (baseline time / technique time: > 1 faster); memory a saving (1 - technique / baseline).
    "~" is read as about +-15 points: ~50 % as 35-65 %, ~2-3x as 1.7-3.5x, ~20 % recompute as
    11-33 % slower (speed-up 0.75-0.9), ~10-30 % as 1.05-1.45x; "slight" as at most 25 %.
    """
    TABLE = (
        ("mixed_precision", "memory", "~50%", (0.35, 0.65)),
        ("mixed_precision", "speed", "~2-3x", (1.7, 3.5)),
        ("gradient_accumulation", "memory", "virtual", None),
        ("gradient_accumulation", "speed", "slight", (0.85, 1.0)),
        ("gradient_checkpointing", "memory", "~50%act", (0.35, 0.65)),
        ("gradient_checkpointing", "speed", "~20%", (0.75, 0.9)),
        ("fusion", "memory", "slight", (0.0, 0.25)),
        ("fusion", "speed", "~10-30%", (1.05, 1.45)),
    )

    @staticmethod
    def measured(value=None, spread=None, source=None, reason=None, basis=None, missing=None):
        """One table cell's measurement.  basis: what a saving is of ("peak", "activations");
        missing: why there is no value ("stage": the stage did not run, "skipped": its plan skipped it)."""
        return {"value": value, "range": spread, "source": source, "reason": reason, "basis": basis, "missing": missing}

    @staticmethod
    def training(training, strategy, aspect, basis=None):
        """One strategy against the baseline in the training comparison: a speed-up (with the range its
        throughput spreads give) or a saving (of the peak for mixed precision, of the activations
        otherwise, unless `basis` says which)."""
        runs = (training or {}).get("runs") or {}
        if not training or "runs" not in training:
            return LectureClaims.measured(reason="the training comparison did not run", missing="stage")
        if strategy not in runs or "baseline" not in runs:
            missing = strategy if strategy not in runs else "baseline"
            return LectureClaims.measured(reason=(training.get("skipped") or {}).get(missing, f"{missing} was not run"),
                             missing="skipped")
        base, run = runs["baseline"], runs[strategy]
        source = f"training comparison: {training['model']}, batch {training['batch']}, {run['precision']}"
        if aspect == "speed":
            spread = None
            if run.get("samples_per_s_range") and base.get("samples_per_s_range"):
                (r_lo, r_hi), (b_lo, b_hi) = run["samples_per_s_range"], base["samples_per_s_range"]
                spread = (r_lo / b_hi, r_hi / b_lo)
            return LectureClaims.measured(run["samples_per_s"] / base["samples_per_s"], spread, source)
        basis = basis or ("peak" if strategy == "mixed_precision" else "activations")  # the lecture's claim is of each
        key = "peak_memory_bytes" if basis == "peak" else "activation_bytes"
        return LectureClaims.measured(1 - run[key] / base[key], None, f"{source} ({basis})", basis=basis)

    @staticmethod
    def fusion(fusion, aspect):
        """Each fusion case's speed-up (with the range the two spreads give) or memory saving."""
        cases = (fusion or {}).get("cases") or {}
        if not cases:
            return LectureClaims.measured(reason="fusion was not measured", missing="stage")
        key = "speedup" if aspect == "speed" else "memory_saving"
        values = {name: case[key] for name, case in cases.items() if case[key] is not None}
        if not values:
            return LectureClaims.measured(reason="no allocator reading on this device", missing="skipped")
        spread = None
        if aspect == "speed":
            timed = {name: (c["composed"], c["fused"]) for name, c in cases.items()
                     if "spread_lo_s" in c.get("composed", {}) and "spread_lo_s" in c.get("fused", {})}
            spread = {name: (a["spread_lo_s"] / b["spread_hi_s"], a["spread_hi_s"] / b["spread_lo_s"])
                      for name, (a, b) in timed.items()}
            spread = spread or None
        return LectureClaims.measured(values, spread,
                         f"fusion: {', '.join(values)} on {fusion['shape'][0]}x{fusion['shape'][1]} {fusion['dtype']}")

    @staticmethod
    def verdict(value, agree, spread=None):
        """agree / disagree with the lecture's range; "uncertain" where the measured spread reaches
        across the range's edge (a busy machine's timings); "partly" where cases differ."""
        if value is None:
            return "not_measured"
        if agree is None:
            return "info"
        values = value if isinstance(value, dict) else {"": value}
        spreads = spread if isinstance(spread, dict) else {"": spread} if spread else {}
        kinds = set()
        for name, v in values.items():
            lo, hi = spreads.get(name) or (v, v)
            lo, hi = min(lo, v), max(hi, v)
            kinds.add("agree" if agree[0] <= lo and hi <= agree[1] else
                      "disagree" if hi < agree[0] or lo > agree[1] else "uncertain")
        if len(kinds) == 1:
            return kinds.pop()
        return "partly" if {"agree", "disagree"} <= kinds else "uncertain"

    @staticmethod
    def rows(training=None, fusion=None):
        """The lecture's optimisation table, cell by cell, with this machine's measured value from the
        training comparison (`training`, run_training_comparison's data) and the fusion measurement.
        `cases` gives one verdict per measured case (fusion's ops; mixed precision's saving of the peak
        and of the activations), "disagree" told apart as "better" or "worse" than claimed."""
        rows = []
        for technique, aspect, claim, agree in LectureClaims.TABLE:
            m = (LectureClaims.fusion(fusion, aspect) if technique == "fusion" else
                 LectureClaims.training(training, technique, aspect))
            row = {"technique": technique, "aspect": aspect, "claim": claim, "agree_range": agree,
                   "measured": m["value"], "measured_range": m["range"], "source": m["source"],
                   "reason": m["reason"], "basis": m["basis"], "missing": m["missing"],
                   "verdict": LectureClaims.verdict(m["value"], agree, m["range"])}
            row["cases"] = LectureClaims.cases(m, agree)
            if technique == "mixed_precision" and aspect == "memory" and m["value"] is not None:
                act = LectureClaims.training(training, technique, aspect, basis="activations")
                row["cases"] = [dict(c, name="peak") for c in row["cases"]] + \
                    [dict(c, name="activations") for c in LectureClaims.cases(act, agree)]
            rows.append(row)
        return rows

    @staticmethod
    def cases(measured, agree):
        """[{name, measured, verdict}] for each case of one measurement ("" for a single value); a
        verdict outside the lecture's range is "better" above it (a larger saving or speed-up) or
        "worse" below it."""
        value, spread = measured["value"], measured["range"]
        if value is None:
            return [{"name": "", "measured": None, "verdict": "not_measured"}]
        values = value if isinstance(value, dict) else {"": value}
        spreads = spread if isinstance(spread, dict) else {"": spread}
        cases = []
        for name, v in values.items():
            verdict = LectureClaims.verdict(v, agree, spreads.get(name))
            if verdict == "disagree":
                verdict = "better" if v > agree[1] else "worse"
            cases.append({"name": name, "measured": v, "verdict": verdict})
        return cases


lecture_claims = LectureClaims.rows  # public name


def format_lecture_table(data):
    """The optimisation table (the same cells as 讲义对照.png, in its language) and the formula
    checks as text (Markdown)."""
    header, cells, _ = _claim_cells(data["claims"])
    lines = ["| " + " | ".join(header) + " |", "|---" * len(header) + "|"]
    lines += ["| " + " | ".join(str(c).replace("\n", " ") for c in row) + " |" for row in cells]
    lines += ["", "| formula | lecture | counted | error | corrected |", "|---|---|---|---|---|"]
    for r in data["flops"]:
        fixed = f"{r['correct_expr']} ({r['correct_error']:+.1%})" if r.get("correct_expr") else "-"
        lines.append(f"| {r['lecture_expr']} ({r['shape']}) | {r['lecture']:,.0f} | {r['counted']:,.0f} | "
                     f"{r['error']:+.1%} | {fixed} |")
    lines += ["", "| TinyGPT | lecture memory | measured peak | error |", "|---|---|---|---|"]
    for r in data["memory"]:
        lines.append(f"| L={r['layers']} H={r['hidden']} B={r['batch']} T={r['seq']} | "
                     f"{r['lecture_total'] / 2 ** 20:.1f} MiB | {r['measured_total'] / 2 ** 20:.1f} MiB | "
                     f"{r['error']:+.1%} |")
    kv = data["kv_cache"]
    if kv:
        lines.append(f"\nKV cache at {kv['tokens'][-1]} tokens: lecture {kv['formula_bytes'][-1] / 2 ** 20:.2f} MiB, "
                     f"measured held {kv['held_bytes'][-1] / 2 ** 20:.2f} MiB ({kv['method']})")
    return "\n".join(lines)


def _lecture_known_memory(memory):
    """The memory stage's TinyGPT training measurement, keyed as lecture_memory_check takes it."""
    if not isinstance(memory, dict) or "TinyGPT (T=64)" not in memory.get("models", {}):
        return {}, None
    measured = dict(memory["models"]["TinyGPT (T=64)"]["training"]["measured"],
                    parameters=memory["gpt_parameters"])
    return {(4, 256): measured}, memory["batch"]


@stage("lecture")
def run_lecture_comparison(run, *, flop_records=None, memory=None, training=None, compile=False):
    """The lecture's claims beside this machine's numbers; returns plain data for 讲义对照.png.

    Earlier stages' data is reused so that nothing is measured twice: `flop_records` (the FLOP
    stage's), `memory` (the memory stage's data) and `training` (the training comparison's); a
    missing one is counted or measured here instead (the optimisation table's training cells then
    say "not measured").  `compile=True` adds torch.compile."""
    p, device = run.profile, run.device
    data = {"device": _device_name(device), "profile": p.name}
    steps = 5 if compile else 4
    known, batch = _lecture_known_memory(memory)
    data["memory"] = lecture_memory_check(p.gpt_sizes, batch=batch or p.lecture_batch, known=known, device=device)
    run.report(1, steps, "memory formulas")
    data["kv_cache"] = (memory or {}).get("kv_cache") or measure_kv_cache(build_model("TinyGPT", device),
                                                                         **p.kv_sizes())
    run.report(2, steps, "KV cache")
    record = next((r for r in flop_records or () if r["name"] == "TinyGPT"), None)
    record = record or run_flop_analysis(models=["TinyGPT"])["records"][0]
    data["flops"] = lecture_flop_check(record, layers=4, hidden=256, vocab=1024)  # the zoo's TinyGPT
    run.report(3, steps, "FLOP formulas")
    data["fusion"] = measure_fusion(device=device, shape=p.fusion_shape, time_budget_s=p.fusion_s)
    run.report(4, steps, "fusion")
    data["compile"] = measure_compile(time_budget_s=p.compile_s) if compile else None
    if compile:
        run.report(5, steps, "torch.compile")
    data["claims"] = LectureClaims.rows(training, data["fusion"])
    data["training_conditions"] = training.get("conditions") if training else None
    data["training_batch"] = training.get("batch") if training else None
    return data


# %% =============================================================================================
# 11. Your own model: the zoo's treatment for a model you bring
# ================================================================================================
# `python pytorch_practice_demo.py --model SPEC --input-shape 8,3,224,224` and `analyze(model,
# inputs)` run the counting, memory, mixed-precision and latency stages on one model of yours, on a
# copy (yours is never changed), and report per top-level module as fvcore/ptflops/torchinfo do,
# plus what only this machine can tell.


def load_model(spec):
    """An nn.Module from SPEC: `torchvision:resnet50` (weights=None), `path/to/file.py:build_fn` or
    `package.module:attr`; a class or function is called without arguments."""
    import importlib
    import importlib.util
    where, sep, attr = spec.rpartition(":")
    if not sep or not where or not attr:
        raise ValueError(f"--model takes torchvision:NAME, path/to/file.py:ATTR or package.module:ATTR, got {spec!r}")
    try:
        if where == "torchvision":  # any torchvision model: classification, detection, segmentation, video
            import inspect

            import torchvision
            if attr not in torchvision.models.list_models():
                raise ValueError(f"torchvision has no model {attr!r}; see torchvision.models.list_models()")
            builder = torchvision.models.get_model_builder(attr)
            offline = {"weights": None}  # no download: random weights, as the zoo's
            if "weights_backbone" in inspect.signature(builder).parameters:
                offline["weights_backbone"] = None
            return _as_module(builder(**offline), spec)
        if where.endswith(".py"):
            found = importlib.util.spec_from_file_location(Path(where).stem, Path(where).expanduser())
            if found is None or not Path(where).expanduser().is_file():
                raise ValueError(f"no Python file at {where!r}")
            module = importlib.util.module_from_spec(found)
            found.loader.exec_module(module)
        else:
            module = importlib.import_module(where)
        obj = getattr(module, attr)
    except (ImportError, AttributeError, OSError, SyntaxError) as err:
        raise ValueError(f"cannot load --model {spec!r}: {type(err).__name__}: {_first_line(err)}") from None
    return _as_module(obj if isinstance(obj, nn.Module) else obj(), spec)


def _as_module(obj, spec):
    if not isinstance(obj, nn.Module):
        raise ValueError(f"--model {spec!r} gave a {type(obj).__name__}, not a torch.nn.Module")
    return obj


def _top_level_activations(model, inputs):
    """Output bytes of each top-level module in one forward on meta (no data, no memory)."""
    args, kwargs = Replica.inputs(inputs, model)
    replica = Replica.of(model, Replica.meta_like)
    out_bytes = {}
    handles = [child.register_forward_hook(
        lambda m, a, o, name=name: out_bytes.__setitem__(name, out_bytes.get(name, 0) + sum(
            t.numel() * t.element_size() for t in tree_flatten(o)[0] if isinstance(t, torch.Tensor))))
        for name, child in replica.named_children()]
    run_args, run_kwargs = Replica.map((args, kwargs), Replica.meta_like)
    try:
        with torch.no_grad():
            replica(*run_args, **run_kwargs)
    finally:
        for h in handles:
            h.remove()
    return out_bytes


def _per_module_rows(model, flops, activations):
    """One row per top-level module: parameters, forward FLOPs and MACs, output bytes (None when
    the model cannot run on meta tensors to tell)."""
    rows = []
    for name, child in model.named_children():
        rows.append({"module": name, "type": type(child).__name__,
                     "parameters": sum(p.numel() for p in child.parameters()),
                     "parameter_bytes": sum(p.numel() * p.element_size() for p in child.parameters()),
                     "flops": flops["by_module"].get(name, 0), "macs": flops["by_module"].get(name, 0) // FLOPS_PER_MAC,
                     "activation_bytes": None if activations is None else activations.get(name, 0)})
    return rows


@stage("model")
def analyze(run, model, inputs, *, loss_fn=None, targets=None, world_size=None):
    """The whole lab on one model of yours: counted FLOPs per top-level module and by op class,
    estimated and measured training memory, mixed-precision step time and memory, and latency at
    your batch.  Measured parts run within the profile's model_* budgets; anything that cannot run
    on this model is None with the reason (`skipped`).  Your model is never changed.
    Call it as analyze(model, inputs, device=None, profile=DEFAULT, progress=None, loss_fn=None,
    targets=None, world_size=None): `loss_fn` and `targets` are the loss your training step uses, as
    in estimate_memory (the memory results say which loss was used); the mixed-precision step uses
    the default rule.  `world_size` N adds data-parallel training with `inputs` as each rank's batch
    (own_distributed): measured on 2 ranks beside the estimate, and simulated on N."""
    Replica.check(model)
    StepLoss.takes_batch_of(loss_fn)  # a loss_fn that cannot be called is refused before any work
    device, p, skipped = run.device, run.profile, {}
    try:
        flops = FLOPCalculator().analyze_model(model, inputs)
    except ModelRunError as err:  # e.g. a detection model wants targets in training mode
        flops = FLOPCalculator().analyze_model(model, inputs, training=False)
        skipped["training_flops"] = f"a training pass could not run on these inputs: {_first_line(err)}"
    data = {"model": type(model).__name__, "device": _device_name(device), "input_shape": flops["input_shape"],
            "flops": {k: v for k, v in flops.items() if k not in ("by_module",)}, "skipped": skipped,
            "modules": _per_module_rows(model, flops, _safe(lambda: _top_level_activations(model, inputs), None))}
    loss = {"loss_fn": loss_fn, "targets": targets}
    steps = (("memory_estimate", lambda: estimate_memory(model, inputs, device=device, **loss)),
             ("memory_measured", lambda: measure_memory(model, inputs, device=device, **loss)),
             ("amp", lambda: [{k: v for k, v in r.items() if k not in ("outputs", "hardware")} for r in
                              benchmark_mixed_precision(model, inputs, device=device, time_budget_s=p.model_amp_s)]),
             ("latency", lambda: measure_latency(model, inputs, device=device, time_budget_s=p.model_latency_s)),
             ("roofline", lambda: roofline(model, inputs, device=device, time_budget_s=p.roofline_step_s)),
             *((("distributed", lambda: own_distributed(run, model, inputs, world_size)),) if world_size else ()))
    for i, (key, measure_it) in enumerate(steps):
        try:
            data[key] = measure_it()
        except ValueError as err:  # e.g. nothing to train: say so, go on with the rest
            data[key], data["skipped"][key] = None, _first_line(err)
        run.report(i + 1, len(steps), key)
    return data


def _safe(fn, default):
    try:
        return fn()
    except Exception:  # NB: activations per module are a bonus; the FLOP count above already ran
        return default


def format_model_table(data):
    """The per-module table printed in the terminal (FLOPs = 2 x MACs)."""
    lines = [f"{data['model']}  input {data['input_shape']}  on {data['device']}",
             f"{'module':<20} {'type':<18} {'parameters':>12} {'FLOPs':>12} {'MACs':>12} {'activations':>12}"]
    for r in data["modules"]:
        lines.append(f"{r['module'][:20]:<20} {r['type'][:18]:<18} {readable(r['parameters']):>12} "
                     f"{readable(r['flops']):>12} {readable(r['macs']):>12} "
                     f"{'n/a' if r['activation_bytes'] is None else readable(r['activation_bytes'], 'B'):>12}")
    f = data["flops"]
    lines.append(f"{'total':<20} {'':<18} {readable(f['parameters']):>12} {readable(f['flops']):>12} "
                 f"{readable(f['macs']):>12}")
    train = readable(f["training_flops"], "FLOPs") if f["training_flops"] is not None else "not counted"
    lines.append(f"FLOPs = 2 x multiply-adds (MACs); forward, batch as given.  Training step: {train}.")
    if f.get("data_dependent"):
        lines.append(f"NB: {f['note']} ({f['data_dependent']})")
    if f.get("unsupported_ops"):
        lines.append(f"not priced: {', '.join(sorted(f['unsupported_ops']))}")
    for key, why in data["skipped"].items():
        lines.append(f"{key}: not measured: {why}")
    return "\n".join(lines)


# %% =============================================================================================
# 12. Figures: labels, fonts, palette, then one block per figure
# ================================================================================================
# Each plot_* function turns a stage's data into a Figure and computes nothing a figure shows
# (the numbers are in results.json); visualize_* (and the two older names) draw and save.


# Beside the script in a checkout; in the current folder when installed (pip install .)
_HERE = Path(__file__).resolve().parent
DEFAULT_OUTPUT_DIR = _HERE / "生成的图片" if (_HERE / "生成的图片").is_dir() else Path("生成的图片")
FIGURE_FILES = {
    "flop": "FLOP分析可视化.png",
    "memory": "内存分析可视化.png",
    "training": "训练性能可视化.png",
    "amp": "混合精度效益对比.png",
    "dashboard": "综合性能仪表板.png",
    "roofline": "性能屋顶线.png",
    "lecture": "讲义对照.png",
    "timeline": "内存时间线.png",  # drawn by the memory stage: memory over one training step
    "model": "你的模型分析.png",  # --model SPEC: your own model
}


# Families that ship CJK glyphs, in order of preference, looked up among installed fonts.
CJK_FONT_FAMILIES = ["Noto Sans CJK SC", "Noto Sans SC", "Source Han Sans SC", "WenQuanYi Zen Hei",
                     "WenQuanYi Micro Hei", "SimHei", "Microsoft YaHei", "PingFang SC",
                     "Heiti SC", "Arial Unicode MS"]

# Every label of every figure, Chinese and English side by side: one table, one lookup (_t).
LABELS = {
    # FLOP figure
    "flop_title": ("FLOP 分析：模型规模与计算量", "FLOP analysis: model size and compute"),
    "flop_sub": ("每个数字均由 FLOPCalculator 在 fake 张量上计数（无真实计算）；batch={batch}；FLOPs = 2 × 乘加",
                 "Every number counted by FLOPCalculator on fake tensors (no real compute); "
                 "batch={batch}; FLOPs = 2 × multiply-adds"),
    "flop_bars": ("前向 FLOPs（对数轴）", "Forward FLOPs (log scale)"),
    "matmul_flops": ("矩阵乘类（线性/卷积/注意力/RNN）", "matmul-class (linear/conv/attention/RNN)"),
    "other_flops": ("其他（逐元素/归一化/softmax/池化）", "other (elementwise/norm/softmax/pool)"),
    "params_bars": ("参数数量（对数轴）", "Parameter count (log scale)"),
    "parameters": ("参数量", "parameters"),
    "flops_vs_params": ("FLOPs 与参数量不成正比", "FLOPs are not proportional to parameters"),
    "flops_per_param": ("每个参数的前向 FLOPs = 2 × 复用次数", "Forward FLOPs per parameter = 2 × reuse"),
    "train_ratio": ("训练/前向 FLOP 比（反向实际运行的算子）", "Training/forward FLOP ratio (backward ops that ran)"),
    "reuse_note": ("卷积核在每个空间位置、权重在每个 token 上被复用",
                   "conv kernels reused at every position, weights at every token"),
    "ratio_2x": ("FLOPs = 2 × 参数：每个权重每个样本只用一次",
                 "FLOPs = 2 × parameters: each weight used once per sample"),
    "ratio_3x": ("常用的 3× 估计", "the common 3× rule"),
    "fwd_flops_axis": ("前向 FLOPs", "forward FLOPs"),
    "kind_mlp": ("MLP", "MLP"), "kind_cnn": ("CNN", "CNN"), "kind_transformer": ("Transformer", "Transformer"),
    "kind_rnn": ("RNN", "RNN"),
    "flop_composition": ("前向矩阵乘类 FLOPs 的去向（%）", "Where forward matmul-class FLOPs go (%)"),
    "cls_linear": ("线性层/矩阵乘", "linear/matmul"),
    "cls_conv": ("卷积", "convolution"),
    "cls_attention": ("注意力（QKᵀ 与 加权 V）", "attention (QKᵀ and weighted V)"),
    "cls_RNN": ("RNN 单元", "RNN cells"),
    # memory figure
    "mem_title": ("内存分析：训练一步中内存去了哪里", "Memory analysis: where one training step's memory goes"),
    "mem_sub": ("设备 {device}；fp32；batch={batch}；Adam；"
                "估计 = fake 张量（无真实计算），实测 = 真实一步中分配器记录的峰值",
                "device {device}; fp32; batch={batch}; Adam; estimate = fake tensors (no real compute), "
                "measured = the allocator's peak in one real step"),
    "mem_composition": ("训练峰值时刻的内存组成（每对柱：左 = 公式，右 = 估计）",
                        "Memory at the training peak (each pair: left napkin, right estimate)"),
    "parameter_bytes_part": ("参数", "parameters"), "gradient_bytes_part": ("梯度", "gradients"),
    "optimizer_bytes_part": ("优化器状态", "optimizer state"), "activation_bytes_part": ("激活", "activations"),
    "temporary_bytes_part": ("临时张量", "temporaries"), "buffer_bytes_part": ("缓冲区+输入", "buffers + inputs"),
    "weight_copy_bytes_part": ("autocast 低精度权重副本", "autocast low-precision weight copies"),
    "measured_peak": ("实测峰值", "measured peak"),
    "train_vs_infer": ("训练 vs 推理（峰值）", "Training vs inference (peak)"),
    "training": ("训练（fwd+bwd+Adam）", "training (fwd+bwd+Adam)"),
    "inference": ("推理（inference_mode）", "inference (inference_mode)"),
    "mem_growth": ("{model}：内存随 batch 增长", "{model}: memory growth with batch size"),
    "estimated_total": ("估计峰值", "estimated peak"),
    "fixed_part": ("固定部分：参数+梯度+优化器状态", "fixed part: params + grads + optimizer state"),
    "measured_points": ("实测峰值", "measured peak"),
    "batch_size": ("batch 大小", "batch size"),
    "mem_variants_precision": ("{model}：精度（估计，batch={batch}）", "{model}: precision (estimated, batch={batch})"),
    "mem_variants": ("{model}：精度与梯度检查点（估计，batch={batch}）",
                     "{model}: precision and checkpointing (estimated, batch={batch})"),
    "bytes_per_param": ("每参数字节数（峰值 / 参数量）", "bytes per parameter (peak / parameters)"),
    "zero_title": ("纸面计算：7B 模型在 {n} 卡上的每卡模型状态",
                   "On paper: per-device model states, 7B model on {n} GPUs"),
    "zero_note": ("混合精度 Adam 每参数 16 字节（ZeRO 论文 §3）；不含激活\n实测与模拟见 分布式训练内存.png",
                  "mixed-precision Adam, 16 bytes/param (ZeRO paper, §3); activations excluded\n"
                  "measured and simulated: 分布式训练内存.png"),
    "gpu_80gb": ("80 GiB 显卡", "80 GiB GPU"),
    "mem_error": ("与实测峰值的相对误差", "Relative error vs measured peak"),
    "mem_source": ("比较对象：估计 = fake 张量上的存储跟踪 + CPU 内核工作内存规则；\n实测 = {method}。"
                   "两者不共用代码，\n但 CPU 规则是对照本机分配器写的：0% 说明规则对这几个模型成立，不是第三方验证",
                   "compared: estimate = storage tracking on fake tensors + the CPU kernels' scratch rules; measured = "
                   "{method}.\nNo shared code, but the CPU rules were written against this allocator: 0 % says "
                   "they hold for these models, not an independent check"),
    "napkin": ("公式（参数×4 + 梯度 + Adam 2× + 各层输出之和）",
               "napkin (params×4 + grads + 2× Adam + sum of layer outputs)"),
    "estimate": ("估计（fake 张量）", "estimate (fake tensors)"),
    "mib": ("MiB", "MiB"), "gib": ("GiB", "GiB"),
    # training figure
    "train_title": ("训练策略对比：同一模型、同一初始权重、同一批次顺序，真实训练",
                    "Training strategies: same model, same initial weights, same batches, real runs"),
    "train_sub": ("设备 {device}；{model}（{params} 参数）；batch={batch}；{steps} 步；数据集 {dataset}；Adam lr={lr}",
                  "device {device}; {model} ({params} parameters); batch={batch}; {steps} steps; "
                  "dataset {dataset}; Adam lr={lr}"),
    "strat_baseline": ("基线（fp32）", "baseline (fp32)"),
    "strat_mixed_precision": ("混合精度（{precision}）", "mixed precision ({precision})"),
    "strat_gradient_accumulation": ("梯度累积（{k} × {micro}）", "gradient accumulation ({k} × {micro})"),
    "strat_gradient_checkpointing": ("梯度检查点（{blocks} 个块）", "gradient checkpointing ({blocks} blocks)"),
    "plan": ("计划：{steps} 步 × batch {batch}，宽 {width}（校准后预测 {pred:.1f} s，测量预算 {budget:.0f} s）",
             "plan: {steps} steps × batch {batch}, width {width} (predicted {pred:.1f} s after calibration, "
             "measuring budget {budget:.0f} s)"),
    "shrunk": ("；本机较慢，已缩小：{what}", "; this machine is slow, shrunk: {what}"),
    "size_steps": ("步数", "steps"), "size_batch": ("batch", "batch"), "size_width": ("宽度", "width"),
    "not_fit": ("；指定的规模超出预算", "; the requested size does not fit the budget"),
    "strategy_skipped": ("跳过 {name}：缩到最小规模仍放不下预算（每步 {ms:.0f} ms，原因全文见 results.json）",
                         "skipped {name}: does not fit the budget even at the smallest size ({ms:.0f} ms per step; "
                         "results.json has the reason)"),
    "busy": ("⚠ 机器繁忙：其他进程占用约 {others} 核（共 {cores} 核），1 分钟负载 {load}；计时偏慢、波动更大",
             "⚠ busy machine: other processes used ~{others} of {cores} cores, 1-min load {load}; "
             "times are slower and noisier"),
    "invalid": ("无效", "invalid"),
    "mfu_invalid": ("无效：实测速率高于重测后的峰值", "invalid: achieved rate above the re-measured peak"),
    "train_loss": ("训练损失（每个优化步）", "Training loss (every optimizer step)"),
    "val_loss": ("验证损失（{n} 个留出样本）", "Validation loss ({n} held-out samples)"),
    "opt_step": ("优化步", "optimizer step"), "cross_entropy": ("交叉熵", "cross-entropy"),
    "throughput": ("训练吞吐（计时步的中位数，误差棒 = IQR）",
                   "Training throughput (median of timed steps, bar = IQR)"),
    "samples_per_s": ("样本/秒", "samples/s"),
    "train_memory": ("一步训练的峰值内存（实测）及峰值时刻的组成", "Peak memory of one step (measured), by part"),
    "mfu": ("MFU：模型 FLOPs / 步时间 / 实测矩阵乘峰值", "MFU: model FLOPs / step time / measured matmul peak"),
    "grad_norm_title": ("每步的全局梯度范数（优化器更新之前）：检查点与累积应与基线重合",
                        "Global gradient norm per step (before the optimizer): checkpointing and accumulation "
                        "should lie on the baseline"),
    "grad_norm_axis": ("梯度 L2 范数", "gradient L2 norm"),
    "grad_no_scaler": ("CPU 上没有 GradScaler（bf16 不需要损失缩放），也没有非有限梯度",
                       "no GradScaler on CPU (bf16 needs no loss scaling), and no non-finite gradients"),
    "grad_scale_note": ("{strategy}：最后的损失缩放 {scale:g}，跳过 {skipped} 步",
                        "{strategy}: loss scale {scale:g} at the end, {skipped} steps skipped"),
    "grad_nonfinite": ("{strategy}：{steps} 步出现 inf/NaN 梯度", "{strategy}: inf/NaN gradients in {steps} steps"),
    "grad_groups_title": ("基线每个顶层模块的梯度范数：第一步 vs 最后一步",
                          "Baseline gradient norm per top-level module: first vs last step"),
    "grad_first": ("第一步", "first step"), "grad_last": ("最后一步", "last step"),
    "pipeline_title": ("数据管道：DataLoader 每秒交付的样本（batch {batch}）",
                       "Input pipeline: samples/s a DataLoader delivers (batch {batch})"),
    "pipeline_data": ("每个样本在 __getitem__ 里解码并归一化（28×28 合成图像）",
                      "each sample decoded and normalised in __getitem__ (28x28 synthetic images)"),
    "pipeline_workers": ("num_workers={n}", "num_workers={n}"),
    "pipeline_step": ("基线训练一步的速率 {rate:,.0f} 样本/秒", "the baseline step's rate, {rate:,.0f} samples/s"),
    "pipeline_bound": ("最快的设置也低于训练速率：这一步在等数据（受输入限制）",
                       "even the fastest setting is below the step's rate: the step waits for its data"),
    "pipeline_not_bound": ("数据比训练快：这一步不受输入限制",
                           "data arrives faster than the step trains: not input-bound"),
    "pipeline_no_pin": ("没有加速器：pin_memory 不起作用，未测",
                        "no accelerator: pin_memory does nothing, not measured"),
    "mfu_peaks": ("峰值：{peaks}", "peaks: {peaks}"),
    "mfu_note": ("检查点重算的前向不计入模型 FLOPs；峰值：{peaks}",
                 "checkpointing's recomputed forward is not model FLOPs; peaks: {peaks}"),
    # mixed-precision figure
    "amp_title": ("混合精度：在这台机器上实测", "Mixed precision, measured on this machine"),
    "amp_sub": ("设备 {device}；训练一步（前向+反向+Adam）；batch={batch}；硬件：{support}",
                "device {device}; one training step (fwd+bwd+Adam); batch={batch}; hardware: {support}"),
    "amp_time": ("每步时间（点 = 中位数，竖线 = 重复计时的四分位距；对数轴）",
                 "Step time (dot = median, line = IQR of the repeated timings; log axis)"),
    "seconds": ("秒", "seconds"),
    "amp_memory": ("一步中的峰值内存", "Peak memory in one step"),
    "amp_speedup": ("相对 fp32 的速度（对数轴，1× 居中；向下 = 变慢）",
                    "Speed vs fp32 (log axis centred on 1×; down = slower)"),
    "amp_saving": ("激活内存相对 fp32 的节省（峰值见中上图）", "Activation memory saved vs fp32 (peaks: top middle)"),
    "amp_ranges": ("为什么 fp16 需要损失缩放：可表示范围", "Why fp16 needs loss scaling: representable ranges"),
    "skipped": ("跳过", "skipped"),
    "skip_budget": ("未测：预算不够", "not measured: budget"),
    "skip_unsupported": ("未测：不支持", "not measured: unsupported"),
    "skip_failed": ("未测：出错", "not measured: failed"),
    "skip_notes": ("未测的原因（\"探针预测\"是一次矩阵乘计时推出的预测，不是实测）：",
                   "Why not measured (a \"probe prediction\" comes from one timed matmul, it is not a measurement):"),
    "lit_mark": ("文献参考值 2-3×（非实测）", "literature 2-3× (reference, not measured)"),
    "underflow": ("1e-8 → {fp16}（fp16 下溢）；bf16 → {bf16:.3g}；× 损失缩放 {scale} 后 fp16 → {scaled:.3g}",
                  "1e-8 → {fp16} in fp16 (underflow); bf16 → {bf16:.3g}; × loss scale {scale} → fp16 {scaled:.3g}"),
    # dashboard
    "dash_title": ("综合性能仪表板：选模型看的是资源", "Dashboard: choosing a model by its resources"),
    "dash_sub": ("设备 {device}；fp32；FLOPs 取自 FLOP 分析（batch=1）；"
                 "延迟实测于 batch={batches}（inference_mode）；训练内存为 batch={tb} + Adam 的估计（fake 张量）",
                 "device {device}; fp32; FLOPs from the FLOP analysis (batch=1); latency measured at batch={batches} "
                 "(inference_mode); training memory estimated at batch={tb} with Adam (fake tensors)"),
    "bubble": ("复杂度：FLOPs 与参数量（颜色 = 模型类别，气泡面积 = 训练峰值内存）",
               "Complexity: FLOPs vs parameters (colour = kind, bubble area = training peak memory)"),
    "relation": ("FLOPs 与实测延迟：离虚线越远，算力用得越少",
                 "FLOPs vs measured latency: far from the line = poorly used"),
    "per_sample_ms": ("每样本时间（ms；误差棒 = 波动范围）", "time per sample (ms; bar = spread)"),
    "peak_line": ("以实测峰值 {peak} 运行时的时间", "time at the measured peak {peak}"),
    "batch_n": ("batch={n}（每样本）", "batch={n} (per sample)"),
    "ranking": ("效率排行（都在 batch=1）：推理达到的 FLOP/s 占实测矩阵乘峰值",
                "Efficiency ranking (all at batch 1): inference FLOP/s as % of the matmul peak"),
    "train_mem_bars": ("训练峰值内存（batch={tb}，Adam，估计）与 8 GiB 显卡",
                       "Training peak (batch={tb}, Adam, estimated) vs an 8 GiB GPU"),
    "gpu_8gb": ("8 GiB 显卡", "8 GiB GPU"),
    "recommend": ("推荐矩阵：满足限制吗？余量多少？（颜色 = 余量，对数；灰 = 未测及原因）",
                  "Model selection: within the limit, and by how much? "
                  "(colour = margin, log; grey = not measured, why)"),
    "not_measured": ("未测", "n/m"),
    "not_measured_long": ("（未测）", "(not measured)"),
    "sc_edge": ("边缘推理", "edge inference"), "sc_serving": ("批量服务", "batch serving"),
    "sc_training": ("单卡 8 GB 训练", "training on one 8 GB GPU"),
    "rule": ("规则：先看硬限制。边缘：参数 ≤ {edge_params} 且 batch-1 延迟 ≤ {edge_ms:g} ms；\n"
             "服务：batch={big} 吞吐 ≥ {serve} 样本/s；训练：估计峰值 ≤ 8 GiB。\n"
             "余量 = 限制 ÷ 实测（边缘取两项中较紧的一项）；只比较资源，不比较精度（各模型任务不同）。",
             "Rule: first the limits. Edge: ≤ {edge_params} parameters and batch-1 latency ≤ {edge_ms:g} ms;\n"
             "serving: ≥ {serve} samples/s at batch {big}; training: estimated peak ≤ 8 GiB.\n"
             "Margin = limit ÷ measured (edge: the tighter of its two); resources only, the models solve "
             "different tasks."),
    # lecture figure
    "lec_title": ("讲义对照：讲义里的公式与表格 vs 这台机器", "The lecture's formulas and table vs this machine"),
    "lec_sub": ("设备 {device}；fp32；内存与 KV 缓存为实测（{source}），FLOPs 为 FLOPCalculator 计数\n"
                "优化表取自训练对比（{training}）与融合实测",
                "device {device}; fp32; memory and KV cache measured ({source}); FLOPs counted by FLOPCalculator\n"
                "table from the training comparison ({training}) and the fusion measurement"),
    "lec_training": ("batch={batch}", "batch={batch}"), "lec_no_training": ("未运行", "not run"),
    "lec_memory": ("训练内存：讲义公式 vs 实测峰值时刻的各部分（TinyGPT，batch={batch}，T={seq}，Adam）",
                   "Training memory: lecture formula vs parts alive at the measured peak\n"
                   "(TinyGPT, batch={batch}, T={seq}, Adam)"),
    "lec_formula": ("讲义", "lecture"), "lec_measured": ("实测", "measured"),
    "lec_hatch": ("斜线柱：讲义公式", "hatched: the lecture's formula"),
    "lec_solid": ("实心柱：实测峰值时刻的各部分", "solid: parts alive at the measured peak"),
    "lec_total_error": ("讲义总和误差 {err:+.0%}", "formula total {err:+.0%}"),
    "lec_act_note": ("讲义激活 = B·T·H·L·4 字节，只算每层一个隐藏向量；\n"
                     "实际每层保存约 20 个以上（注意力、MLP 4H、LayerNorm…）",
                     "lecture activations = B·T·H·L·4 bytes: one hidden vector per layer;\n"
                     "a layer really saves 20+ (attention, the 4H MLP, LayerNorms…)"),
    "lec_kv": ("KV 缓存：逐 token 生成（TinyGPT {layers}×{hidden}，batch={batch}）",
               "KV cache while generating (TinyGPT {layers}×{hidden}, batch={batch})"),
    "kv_formula": ("讲义：B·T·L·H·2·字节", "lecture: B·T·L·H·2·bytes"),
    "kv_held": ("实测：每个 token 后仍占用", "measured: held after each token"),
    "kv_peak": ("实测：该 token 内的峰值（torch.cat 复制）", "measured: peak within the token (torch.cat copies)"),
    "tokens": ("序列长度（token）", "sequence length (tokens)"),
    "kv_prefill": ("第一个 token：整段提示（{prompt} 个 token）一次算完，\n它的 logits 还在内存里",
                   "first token: the whole prompt ({prompt} tokens) in one pass,\nits logits still held"),
    "lec_flops": ("FLOP 公式 vs 计数（TinyGPT 4×256，T=256）", "FLOP formulas vs counting (TinyGPT 4×256, T=256)"),
    "lec_flop_error": ("讲义公式相对计数的误差", "lecture formula vs counted"),
    "lec_flop_fixed": ("修正后的表达式", "corrected expression"),
    "lec_flop_exact": ("讲义公式与计数一致", "lecture formula matches the count"),
    "lec_flop_notes": ("修正：每 token 前向 ≈ 24·L·H² + 4·L·T·H + 2·H·V（Kaplan et al. 2020 表 1）；"
                       "训练 ≈ 3 × 前向（6N 忽略注意力与 LM 头的使用方式）",
                       "corrected: forward per token ≈ 24·L·H² + 4·L·T·H + 2·H·V (Kaplan et al. 2020, Table 1); "
                       "training ≈ 3 × forward (6N leaves out attention and how the LM head is used)"),
    "flop_matmul": ("矩阵乘 2·m·k·n", "matmul 2·m·k·n"),
    "flop_attention": ("注意力 4·B·T²·H（每层）", "attention 4·B·T²·H (per layer)"),
    "flop_per_token": ("每 token 2·L·H·(H+4H)", "per token 2·L·H·(H+4H)"),
    "flop_training_6n": ("训练 6·N·tokens", "training 6·N·tokens"),
    "lec_fusion": ("算子融合实测：逐元素写法 vs 融合内核（{shape}，fp32）",
                   "Fusion measured: op by op vs fused kernel ({shape}, fp32)"),
    "composed": ("逐算子组合", "op by op"), "fused": ("融合内核", "fused kernel"),
    "fusion_note": ("{speed}；峰值 {a} → {b}", "{speed}; peak {a} → {b}"),
    "faster": ("快 {x:.1f}×", "{x:.1f}× faster"), "slower": ("慢 {x:.1f}×", "{x:.1f}× slower"),
    "as_fast": ("持平（相差 10% 以内）", "as fast (within 10%)"),
    "ms": ("毫秒", "ms"),
    "compile_note": ("torch.compile（训练对比的 ResMLP {depth}×{width}，batch={batch}，Adam 一步）：\n"
                     "编译 {c:.1f} s（另计）；之后每步 {e:.1f} → {k:.1f} ms，{speed}",
                     "torch.compile (the training comparison's ResMLP {depth}×{width}, batch={batch}, one Adam step):\n"
                     "compile {c:.1f} s (apart); then each step {e:.1f} → {k:.1f} ms, {speed}"),
    "compile_skipped": ("torch.compile：{why}", "torch.compile: {why}"),
    "lec_table": ("讲义的优化技巧表，逐格对照本机实测",
                  "The lecture's optimisation table, cell by cell, against this machine"),
    "col_technique": ("技术", "technique"), "col_aspect": ("方面", "aspect"), "col_claim": ("讲义", "lecture"),
    "col_measured": ("本机实测", "measured here"), "col_verdict": ("判定", "verdict"), "col_source": ("来源", "source"),
    "tech_mixed_precision": ("混合精度", "mixed precision"),
    "tech_gradient_accumulation": ("梯度累积", "gradient accumulation"),
    "tech_gradient_checkpointing": ("梯度检查点", "gradient checkpointing"),
    "tech_fusion": ("算子融合", "operator fusion"),
    "aspect_memory": ("内存节省", "memory saved"), "aspect_speed": ("速度", "speed"),
    "claim_~50%": ("~50%", "~50%"), "claim_~2-3x": ("~2-3×", "~2-3×"),
    "claim_virtual": ("虚拟大批次", "virtual large batch"),
    "claim_slight": ("轻微", "slight"), "claim_~50%act": ("~50% 激活内存", "~50% of activations"),
    "claim_~20%": ("~20% 重计算", "~20% recompute"), "claim_~10-30%": ("~10-30%", "~10-30%"),
    "verdict_agree": ("相符", "agrees"), "verdict_disagree": ("不符", "disagrees"),
    "verdict_partly": ("部分相符", "partly"),
    "verdict_info": ("—", "—"), "verdict_not_measured": ("未测", "not measured"),
    "saved": ("省 {p:.0%}", "{p:.0%} saved"), "more_memory": ("多用 {p:.0%}", "{p:.0%} more"),
    "src_training": ("训练对比", "training comparison"), "src_fusion": ("融合实测", "fusion"),
    "src_no_training": ("训练对比未运行（--only 加上 training）", "training comparison not run (add it to --only)"),
    "src_skipped": ("训练对比跳过了它（原因见 results.json）", "skipped by the training plan (see results.json)"),
    "src_no_fusion": ("此设备读不到分配器", "no allocator reading on this device"),
    "verdict_uncertain": ("不确定 *", "uncertain *"),
    "verdict_better": ("好于讲义", "better than claimed"), "verdict_worse": ("差于讲义", "worse than claimed"),
    "uncertain_note": ("* 不确定：测量的波动范围（IQR）跨过了讲义区间的边界，这台机器上分不出相符与否",
                       "* uncertain: the measured spread (IQR) crosses the edge of the lecture's range"),
    "act_suffix": ("（激活）", " (activations)"), "peak_suffix": ("（峰值）", " (peak)"),
    # shared by the figures (issue 20): reasons said in the figure's language (REASON_PHRASES), ratios, phases
    "why_probe_slower": ("矩阵乘探针预测比 fp32 慢 {0}×", "a matmul probe predicts {0}x slower than fp32"),
    "why_probe_faster": ("矩阵乘探针预测比 fp32 快 {0}×", "a matmul probe predicts {0}x faster than fp32"),
    "why_probe_same": ("矩阵乘探针预测与 fp32 持平", "a matmul probe predicts as fast as fp32"),
    "why_predicted_budget": ("预测每{1} {0} ms：预热加 {2} 次计时约需 {3} s，超过分到的 {4} s",
                             "predicted {0} ms per {1}: a warm-up and {2} timed runs need ~{3} s, more than its {4} s"),
    "why_warmup_budget": ("预热一{0}用了 {1} ms：{2} 次计时约需 {3} s，超过剩下的 {4} s",
                          "the warm-up {0} took {1} ms: {2} timed runs need ~{3} s, more than what is left of "
                          "its {4} s"),
    "why_no_fp16": ("本 CPU 没有原生 fp16 矩阵乘（AMX-FP16），fp16 运算在软件里转换",
                    "this CPU has no native fp16 matmul (AMX-FP16): fp16 math is converted in software"),
    "why_no_bf16": ("本 CPU 既无 AVX512-BF16 也无 AMX，bf16 运算在软件里转成 fp32",
                    "this CPU has neither AVX512-BF16 nor AMX: bf16 math is converted to fp32 in software"),
    "why_unsupported": ("{1} 不支持 autocast {0}", "autocast {0} is not supported on {1}"),
    "why_not_fp32": ("autocast 只转换 float32 运算，此模型用 {0} 计算：不会有变化",
                     "autocast casts float32 ops only; this model computes in {0}: nothing would change"),
    "why_no_reference": ("没有 fp32 参照：它没放进预算", "no fp32 reference: it did not fit the budget"),
    "why_planned_skip": ("计划跳过：batch {0} 预测每次 {1} ms，预热加 {2} 次放不进延迟预算剩下的 {3} s",
                         "planned skip: batch {0} predicted {1} ms per run; with a warm-up and {2} runs it did not "
                         "fit the {3} s left"),
    "why_planned_total": ("计划跳过：batch {1} 预测约 {0} s（乘 {2} 的余量为 {3} s），超过延迟预算剩下的 {4} s",
                          "planned skip: predicted ~{0} s for batch {1} (x{2} margin: {3} s), "
                          "more than the {4} s left"),
    "why_latency_not_measured": ("batch-{0} 延迟未测", "batch-{0} latency not measured"),
    "why_failed": ("出错：{0}", "failed: {0}"),
    "why_budget_spent": ("阶段的预算已用完", "the stage's budget is spent"),
    "loss_gap_nothing": ("除基线外没有别的策略运行", "no strategy but the baseline ran"),
    "variant_pure bf16": ("纯 bf16（权重本身 bf16）", "pure bf16"),
    "variant_AMP bf16 + checkpoint": ("AMP bf16 + 检查点", "AMP bf16 + checkpoint"),
    "variant_fp32 + checkpoint": ("fp32 + 检查点", "fp32 + checkpoint"),
    "why_no_autocast": ("这里没有 autocast 低精度", "no autocast precision here"),
    "bound_compute": ("受算力限制", "compute-bound"), "bound_memory": ("受带宽限制", "memory-bound"),
    "bound_none": ("没有 FLOPs 也没有字节：只有开销", "no FLOPs, no bytes: overhead only"),
    "why_bound": ("{bound}：{intensity:.3g} FLOP/字节（脊点 {ridge:.3g}）",
                  "{bound}: {intensity:.3g} FLOP/byte (ridge {ridge:.3g})"),
    "roof_peak_method": ("{n}×{n} 矩阵乘 {runs} 次中最快", "fastest of {runs} runs of a {n}x{n} matmul"),
    "hw_support": ("torch {torch}，{threads} 线程，TF32 {tf32}", "torch {torch}, {threads} threads, TF32 {tf32}"),
    "word_step": ("步", "step"), "word_run": ("次", "run"),
    "amp_predicted": ("探针预测（未实测）", "probe's prediction (not measured)"),
    "yes": ("有", "yes"), "no": ("无", "no"), "on": ("开", "on"), "off": ("关", "off"),
    "phase_setup": ("步前", "before the step"), "phase_forward": ("前向", "forward"),
    "phase_backward": ("反向", "backward"), "phase_optimizer": ("优化器", "optimizer"),
    # mixed-precision figure (issue 20)
    "amp_predicted_cell": ("预测：{speed}\n（探针，未实测）", "predicted: {speed}\n(probe, not measured)"),
    "amp_probe_mark": ("探针的预测（方向也可能错）", "the probe's prediction (it can point the wrong way)"),
    "amp_measured_bar": ("实测", "measured"),
    "skip_predicted": ("未测：预测{speed}", "not measured: predicted {speed}"),
    "amp_error_linear": ("输出与 fp32 的最大相对误差（线性轴）", "Max relative error of outputs vs fp32 (linear axis)"),
    "amp_times": ("每次计时", "each timed run"),
    # memory figure (issue 20)
    "bytes_per_param_v": ("{v:.1f} 字节/参数", "{v:.1f} bytes/param"),
    "hatch_formula": ("斜线柱：公式", "hatched: napkin formula"),
    "solid_estimate": ("实心柱：估计（fake 张量）", "solid: estimate (fake tensors)"),
    "peak_in": ("峰值在{phase}", "peak in {phase}"),
    "no_grad_note": ("{models} 的峰值落在反向刚开始：激活都还在，梯度还没生成，\n"
                     "所以这些柱里几乎没有梯度（一步的过程见 内存时间线.png）",
                     "{models} peak as backward starts: activations all alive, gradients not made yet,\n"
                     "so these bars hold almost no gradients (the whole step: the memory timeline figure)"),
    "small_parts": ("未列出：不到最高柱 1% 的部分（{parts}）",
                    "not listed: parts under 1 % of the tallest bar ({parts})"),
    # memory timeline (issue 20)
    "tl_title": ("内存时间线：一个稳态训练步里内存怎样涨落（{model}，batch={batch}，fp32，Adam）",
                 "Memory over one steady-state training step ({model}, batch={batch}, fp32, Adam)"),
    "tracker": ("张量存储追踪器：分发层记录每个存储的分配与释放", "live tensor storages (dispatch-mode tracker)"),
    "tl_sub": ("设备 {device}；真实运行一步，每次分配与释放按发生顺序记录（{method}），按类别堆叠；"
               "Adam 状态在步前已存在（第一步之后的稳态）",
               "device {device}; one real step, every allocation and free in order ({method}), stacked by "
               "category; Adam's state exists before the step (steady state after the first step)"),
    "tl_event": ("事件序号（分配或释放，按发生顺序）", "event number (an allocation or a free, in order)"),
    "tl_peak": ("峰值 {mib:.1f} MiB（{phase}）", "peak {mib:.1f} MiB ({phase})"),
    "tl_notes": ("怎么看：① 基线的峰值在反向开始处：激活全在，梯度还没有；反向中激活释放、梯度长出。"
                 "② 检查点：前向只留块的输入，反向里逐块重算（重算的激活算作临时张量，呈锯齿）。"
                 "③ 累积：每个微批只有 1/{k} 的激活，梯度在第一个微批后常驻。"
                 "④ Adam 状态整步常驻，优化器阶段的临时张量是它的更新。",
                 "How to read: (1) the baseline peaks as backward starts: all activations alive, no gradients yet; "
                 "in backward activations go and gradients appear. (2) Checkpointing keeps only each block's input "
                 "and recomputes block by block in backward (recomputed activations count as temporaries: a "
                 "sawtooth). (3) Accumulation holds 1/{k} of the activations per micro-batch; gradients stay after "
                 "the first. (4) Adam's state lives all step; the optimizer phase's temporaries are its update."),
    # training figure (issue 20)
    "train_loss_one": ("损失：基线（线）与验证（点）；其他策略几乎重合，差异见右图",
                       "Loss: baseline (line) and validation (dots); the others coincide, gaps on the right"),
    "val_dots": ("验证损失（{n} 个留出样本）", "validation loss ({n} held-out samples)"),
    "loss_gap": ("每步训练损失与基线之差 |Δ|（对数轴）", "|Δ| of each step's training loss vs the baseline (log axis)"),
    "bitwise_same": ("{name}：每步都与基线逐位相同（Δ = 0）",
                     "{name}: bit-identical to the baseline at every step (Δ = 0)"),
    "gap_axis": ("|损失 − 基线损失|", "|loss − baseline loss|"),
    "tradeoff": ("相对基线（对数轴，1× 居中；向右 = 更好，向左 = 更差）",
                 "Relative to the baseline (log axis centred on 1×; right = better, left = worse)"),
    "t_speed": ("速度（样本/秒之比）", "speed (samples/s ratio)"),
    "t_memory": ("内存（基线峰值 ÷ 峰值）", "memory (baseline peak ÷ peak)"),
    "t_loss": ("最终验证损失（基线 ÷ 该策略）", "final val loss (baseline ÷ strategy)"),
    "mfu_mp_note": ("混合精度的 MFU 以 {p} 的实测峰值为分母，它是 fp32 峰值的 {r:.1f}×：步再快，MFU 也可能更低",
                    "mixed precision's MFU divides by the {p} peak, {r:.1f}× fp32's: a faster step can still "
                    "show a lower MFU"),
    # dashboard (issue 20)
    "bubble_key": ("气泡 = 训练峰值内存", "bubble = training peak"),
    "not_measured_at": ("batch={n} 未测（×：画在其 FLOPs 处）", "batch={n} not measured (× at its FLOPs)"),
    "batching": ("批处理的收益：batch={n} 每样本比 batch=1 快多少（对数轴，1× 居中）",
                 "What batching buys: per-sample speed at batch {n} vs batch 1 (log axis centred on 1×)"),
    "batching_axis": ("batch=1 每样本时间 ÷ batch={n} 每样本时间", "per-sample time at batch 1 ÷ at batch {n}"),
    "dash_tinygpt": ("此图的 TinyGPT：{layers} 层 × {hidden}，T={seq}（内存与混合精度图里的 TinyGPT 是 T=64）",
                     "TinyGPT here: {layers} layers × {hidden}, T={seq} "
                     "(the memory and mixed-precision figures use T=64)"),
    "margin_pass": ("✓ {value}\n余量 {m}×", "✓ {value}\n{m}× headroom"),
    "margin_fail": ("✗ {value}\n超限 {m}×", "✗ {value}\n{m}× over"),
    "samples_s": ("{v:,.0f} 样本/s", "{v:,.0f} samples/s"),
    "params_v": ("{v} 参数", "{v} params"),
    "margin_axis": ("余量（限制 ÷ 实测，对数）", "margin (limit ÷ measured, log)"),
    # lecture figure (issue 20)
    "mp_weights_note": ("为什么混合精度省得少：autocast 只在算矩阵乘时临时做一份 bf16 权重副本，"
                        "fp32 主权重、梯度和 Adam 状态都保持 fp32（bf16 只有 8 位尾数，小的更新加到大权重上会被舍掉）。"
                        "所以只有激活变小，峰值里固定的部分不变。",
                        "Why mixed precision saves little: autocast makes bf16 weight copies only for the matmuls; "
                        "fp32 master weights, gradients and Adam's state stay fp32 (bf16's 8-bit mantissa would round "
                        "small updates away). Only the activations shrink; the fixed part of the peak does not."),
    # your own model
    "own_title": ("你的模型：{model}", "Your model: {model}"),
    "own_sub": ("设备 {device}；输入 {shape}；FLOPs 在 fake 张量上计数（2 × 乘加），内存、混合精度与延迟在本机实测",
                "device {device}; input {shape}; FLOPs counted on fake tensors (2 x multiply-adds), memory, mixed "
                "precision and latency measured here"),
    "own_flops": ("每个顶层模块的前向 FLOPs", "Forward FLOPs per top-level module"),
    "own_sizes": ("每个顶层模块的参数与输出字节", "Parameter and output bytes per top-level module"),
    "own_param_mib": ("参数（MiB）", "parameters (MiB)"),
    "own_act_mib": ("输出激活（MiB）", "output activations (MiB)"),
    "own_classes": ("工作量按算子类别", "Where the work goes, by op class"),
    "own_memory": ("训练一步的峰值内存（Adam，fp32）", "Peak memory of one training step (Adam, fp32)"),
    "own_memory_estimate": ("估计（fake 张量）", "estimated (fake tensors)"),
    "own_memory_measured": ("实测", "measured"),
    "own_data_dependent": ("⚠ 这个模型要真实数值才能跑（数据相关的控制流或输出形状）：FLOPs 按这一次输入的"
                           "真实运行计数，换输入可能不同",
                           "⚠ this model needs real values (data-dependent control flow or shapes): FLOPs were "
                           "counted on one real run, another input can give another count"),
    "own_amp": ("混合精度：每步时间", "Mixed precision: step time"),
    "own_latency": ("推理延迟（中位数，误差棒 = 波动范围）", "Inference latency (median, bar = spread)"),
    "own_latency_text": ("{ms:.2f} ms，{sps:,.0f} 样本/s（{runs} 次）",
                         "{ms:.2f} ms, {sps:,.0f} samples/s ({runs} runs)"),
    # roofline figure
    "roof_title": ("性能屋顶线：一步训练的时间花在哪里，为什么",
                   "The roofline: where the time of a training step goes, and why"),
    "roof_sub": ("设备 {device}，1 分钟负载 {load}；屋顶均为本机实测：峰值 {peak}（{peak_method}），带宽 {bw}"
                 "（STREAM {kernel}，中位数 {bw_med}，波动 {bw_lo}–{bw_hi}）；每个点 = 一个模型的一类算子在一步训练"
                 "（前向+反向+Adam）中的 FLOPs/字节与实测自身时间（torch.profiler）",
                 "device {device}, load {load} (1 min); both roofs measured here: peak {peak} ({peak_method}), "
                 "bandwidth "
                 "{bw} (STREAM {kernel}, median {bw_med}, spread {bw_lo}–{bw_hi}); a point = one op class of one "
                 "model in a training step (forward + backward + Adam): counted FLOPs/bytes, measured self time "
                 "(torch.profiler)"),
    "roof_panel": ("屋顶线：算术强度 vs 实际 FLOP/s（颜色 = 算子类别，形状 = 模型）",
                   "Roofline: arithmetic intensity vs achieved FLOP/s (colour = op class, marker = model)"),
    "roof_x": ("算术强度（FLOP/字节，计数）", "Arithmetic intensity (FLOP/byte, counted)"),
    "roof_y": ("实际 FLOP/s（计数的 FLOPs / 实测时间）", "Achieved FLOP/s (counted FLOPs / measured time)"),
    "roof_compute": ("计算屋顶 {v}", "compute roof {v}"),
    "roof_memory": ("带宽屋顶 {v}", "bandwidth roof {v}"),
    "roof_ridge": ("脊点 {v:.3g} FLOP/字节", "ridge {v:.3g} FLOP/byte"),
    "roof_nopoint": ("不在图上（没有 FLOPs）：拷贝类与优化器中无计算的部分", "not on the plot (no FLOPs): copies"),
    "roof_in_cache": ("高于带宽屋顶的点：部分数据在缓存里（屋顶是内存带宽），或带宽测在慢的时刻",
                      "points above the bandwidth roof: part of their data in cache (the roof is DRAM's), or a roof "
                      "measured in a slow moment"),
    "roof_share": ("{model}：FLOPs 占比 vs 时间占比（一步训练）",
                   "{model}: share of FLOPs vs share of time (one step)"),
    "roof_share_flops": ("FLOPs 占比", "share of FLOPs"),
    "roof_share_time": ("实测时间占比", "share of measured time"),
    "roof_step": ("每步时间：屋顶线预测 vs 实测（其余 = 开销）",
                  "Step time: roofline prediction vs measured (rest = overhead)"),
    "roof_pred": ("屋顶线预测 max(FLOPs/峰值, 字节/带宽)", "roofline: max(FLOPs/peak, bytes/bandwidth)"),
    "roof_dispatch": ("每次算子调用的开销 × 调用次数（实测 {us:.1f} µs/次）",
                      "per-call overhead x calls ({us:.1f} µs/call, measured)"),
    "roof_faults": ("缺页：首次触碰新分配的内存（实测次数 × {us:.2f} µs/次）",
                    "page faults: first touch of fresh memory (counted x {us:.2f} µs each)"),
    "roof_faults_none": ("缺页：本机未计数", "page faults: not counted here"),
    "roof_faults_zero": ("缺页：这次各模型每步 0 次（每次 {us:.2f} µs；新进程里的大张量才会缺页）",
                         "page faults: none per step this run ({us:.2f} µs each; big fresh tensors in a new process "
                         "take them)"),
    "roof_overhead": ("其余开销（调度、Python、小算子达不到屋顶）",
                      "rest: overhead (dispatch, Python, small ops below the roof)"),
    "roof_pred_share": ("屋顶线解释 {v:.0%}", "roofline explains {v:.0%}"),
    "roof_measured": ("实测（中位数，误差棒 = 波动范围）", "measured (median, bar = spread)"),
    "roof_time_ms": ("每步时间（ms）", "step time (ms)"),
    "roof_low": ("{model}：fp32 vs {precision}，每类算子的实测时间",
                 "{model}: fp32 vs {precision}, measured time per op class"),
    "roof_low_none": ("低精度", "low precision"),
    "roof_low_x": ("实测自身时间（ms，一步）", "measured self time (ms, one step)"),
    "class_linear/matmul": ("线性层/矩阵乘", "linear/matmul"),
    "class_conv": ("卷积", "conv"),
    "class_attention": ("注意力", "attention"),
    "class_RNN": ("RNN", "RNN"),
    "class_elementwise/other": ("逐元素/其他", "elementwise/other"),
    "class_copies": ("拷贝", "copies"),
    "class_optimizer": ("优化器", "optimizer"),
}


_LANG = None  # "zh" or "en"; resolved on first use by _lang()
_CJK_FONT = None  # family name registered with matplotlib, or "" when none is usable


def _find_cjk_font():
    """Return a CJK font family usable by matplotlib, registering mplfonts' file if needed."""
    from matplotlib import font_manager
    installed = {f.name for f in font_manager.fontManager.ttflist}
    for family in CJK_FONT_FAMILIES:
        if family in installed:
            return family
    try:
        import mplfonts
    except ImportError:
        return ""
    path = Path(mplfonts.__file__).parent / "fonts" / "NotoSansCJKsc-Regular.otf"
    if not path.exists():
        return ""
    font_manager.fontManager.addfont(str(path))  # registers for this process only
    return font_manager.FontProperties(fname=str(path)).get_name()


def set_language(lang="auto"):
    """Choose figure labels: "zh", "en" or "auto" (Chinese when a CJK font can be used)."""
    global _LANG, _CJK_FONT
    if lang not in ("auto", "zh", "en"):
        raise ValueError(f"lang must be 'auto', 'zh' or 'en', got {lang!r}")
    if _CJK_FONT is None:
        _CJK_FONT = _find_cjk_font()
    if lang == "en":
        _LANG = "en"
    elif _CJK_FONT:
        _LANG = "zh"
    else:
        _LANG = "en"
        warnings.warn("No CJK font found, figure labels are in English. For Chinese labels: "
                      "pip install mplfonts (or install a font such as Noto Sans CJK SC).",
                      stacklevel=2)
    return _LANG


def _lang():
    return _LANG or set_language("auto")


def _t(key, **fmt):
    """The label for `key` in the current language, formatted with `fmt`."""
    zh, en = LABELS[key]
    text = zh if _lang() == "zh" else en
    return text.format(**fmt) if fmt else text


@contextlib.contextmanager
def _figure_style(style="whitegrid"):
    """Seaborn's theme as matplotlib ships it (no seaborn/pandas import: ~0.4 s, ~1.5 s on a busy
    machine) and a concrete CJK-capable font family, applied only inside the block."""
    import matplotlib.pyplot as plt
    families = ([_CJK_FONT] if _lang() == "zh" else []) + ["DejaVu Sans"]
    with plt.style.context(f"seaborn-v0_8-{style}"), plt.rc_context({"font.family": families,
                                                                     "axes.unicode_minus": False}):
        yield


def _atomic_write(path, write):
    """Call write(file) on a temp file beside `path`, then os.replace it: never a half-written file."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=path.suffix, dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; give the mode a plain open() would
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return path


DPI = 100  # PNG resolution: 2000 x 1200 px for the 20 x 12 in figures; a screen fits them the same at any dpi


def save_figure(fig, path, dpi=DPI):
    """Write `fig` to `path` atomically and close it; return the path."""
    import matplotlib.pyplot as plt
    path = Path(path)
    try:
        return _atomic_write(path, lambda f: fig.savefig(f, format=path.suffix.lstrip(".") or "png", dpi=dpi))
    finally:
        plt.close(fig)


def write_json_atomic(data, path):
    """Write `data` as JSON to `path` atomically."""
    text = json.dumps(data, ensure_ascii=False, indent=1, default=str)
    return _atomic_write(path, lambda f: f.write(text.encode("utf-8")))


def _save_into(fig, output_dir, key, dpi):
    """Save `fig` as FIGURE_FILES[key] into `output_dir` (None: don't save); return the Figure."""
    if output_dir is not None:
        Path(output_dir).mkdir(parents=True, exist_ok=True)
        save_figure(fig, Path(output_dir) / FIGURE_FILES[key], dpi=dpi)
    return fig


# One palette for every figure: seaborn's "deep" colours (matplotlib ships them as the
# seaborn-v0_8 styles), then the greys of notes and tables, then the verdict backgrounds.
PALETTE = SimpleNamespace(
    blue="#4C72B0", orange="#DD8452", green="#55A868", red="#C44E52", purple="#8172B2", brown="#937860",
    cyan="#64B5CD", olive="#CCB974",
    warning="#B22222",  # red text: errors of a formula, skips
    ink="#333333", dark="#444444", note="#555555", muted="#777777", faint="#999999", rule="#BBBBBB",
    header="#DDDDDD", unmeasured="#E0E0E0", pale="#EEEEEE",
    agree="#D8EFD8", disagree="#F6D5D5", partly="#FBEBC8", better="#D6E4F5",
)
KIND_COLORS = {"mlp": PALETTE.blue, "cnn": PALETTE.green, "transformer": PALETTE.red, "rnn": PALETTE.purple}

def _suptitle(fig, title, subtitle, conditions=None):
    """Title on the first line, the conditions of the numbers (device, dtype, batch) below it, and
    a warning line when the measured times come from a busy machine; every panel title is wrapped
    to its panel's width (an English title runs longer than its Chinese one)."""
    busy = _busy_note(conditions)
    fig.suptitle(f"{title}\n{subtitle}" + (f"\n{busy}" if busy else ""), fontsize=14, linespacing=1.6)
    for ax in fig.axes:
        for text in (ax.title, ax.xaxis.label):
            _fit_text(text, ax.get_position().width * fig.get_figwidth())


def _fit_text(text, width_in):
    """Wrap a panel's title or axis label, line by line, to `width_in` inches of its font."""
    import unicodedata
    fits = int(width_in * 72 / (text.get_fontsize() * 0.55))  # half-width characters per line
    lines = []
    for line in text.get_text().split("\n"):
        wide = sum(2 if unicodedata.east_asian_width(ch) in "WF" else 1 for ch in line)
        lines.append(_wrap(line, int(fits * len(line) / wide)) if wide > fits > 10 else line)
    text.set_text("\n".join(lines))


def _busy_note(conditions):
    """The warning line for a busy machine (empty when the stage ran on a quiet one)."""
    if not conditions or not conditions.get("busy"):
        return ""
    others = conditions.get("others_busy_cores")
    load = conditions.get("load_end", {}).get("load_avg_1m")
    return _t("busy", others="?" if others is None else f"{others:.1f}", cores=conditions.get("cores"),
              load="?" if load is None else f"{load:.1f}")


def _kind_color(kind):
    """The colour of a model kind (mlp, cnn, transformer, rnn); grey for any other."""
    return KIND_COLORS.get(kind, PALETTE.muted)


def _barh(ax, names, values, colors, *, log=False, fmt=None, inside=False, label_at=None):
    """Horizontal bars with their value printed at the end of each bar (or just inside it, or at
    `label_at`, e.g. past an error bar)."""
    y = np.arange(len(names))
    ax.barh(y, values, color=colors)
    ax.set_yticks(y, names)
    ax.invert_yaxis()
    if log:
        ax.set_xscale("log")
    for yi, value, at in zip(y, values, label_at or values):
        if fmt:
            ax.annotate(fmt(value), (at, yi), xytext=(-3 if inside else 3, 0), textcoords="offset points",
                        va="center", ha="right" if inside else "left", fontsize=8,
                        color="white" if inside else "black")
    ax.margins(x=0.25 if not log else 0.05)
    if log:
        lo, hi = min(v for v in values if v > 0), max(values)
        ax.set_xlim(lo / 3, hi * 30)


def _kind_legend(ax, kinds, loc="lower right"):
    """A legend of the model kinds present, one coloured patch each."""
    from matplotlib.patches import Patch
    handles = [Patch(color=_kind_color(k), label=_t(f"kind_{k}")) for k in dict.fromkeys(kinds)]
    ax.legend(handles=handles, loc=loc, fontsize=8)


def _not_measured(ax, why):
    """An empty panel that says it was not measured, and why (wrapped inside the panel)."""
    import textwrap
    why = _localized_reason(why)  # said in the figure's language
    why = textwrap.fill(textwrap.shorten(why, 220, placeholder=" …"), 48 if _lang() == "en" else 30) if why else ""
    ax.text(0.5, 0.5, _t("not_measured_long") + ("\n" + why if why else ""), ha="center", va="center",
            fontsize=9, color=PALETTE.muted, transform=ax.transAxes, clip_on=True)
    ax.set_xticks([])
    ax.set_yticks([])


def _wrap(text, width):
    import textwrap
    return textwrap.fill(text, width)


def _speed_words(speedup):
    if 1 / 1.1 <= speedup <= 1.1:
        return _t("as_fast")
    return _t("faster", x=speedup) if speedup >= 1 else _t("slower", x=1 / speedup)


# ---- Shared by every figure: reasons in the figure's language, ratios around 1×, labels that do not collide

# English reasons the stages write into results.json (kept there as written), each clause matched
# here and said in the figure's language at draw time: (pattern, LABELS key formatted with its groups)
REASON_PHRASES = (
    (r"a matmul probe predicts ([\d.]+)x slower than fp32", "why_probe_slower"),
    (r"a matmul probe predicts ([\d.]+)x faster than fp32", "why_probe_faster"),
    (r"a matmul probe predicts as fast as fp32", "why_probe_same"),
    (r"predicted (\d+) ms per (\w+): a warm-up and (\d+) timed runs need ~([\d.]+) s, more than its ([\d.]+) s",
     "why_predicted_budget"),
    (r"the warm-up (\w+) took (\d+) ms: (\d+) timed runs need ~([\d.]+) s, more than what is left of its ([\d.]+) s",
     "why_warmup_budget"),
    (r"this CPU has no native fp16 matmul", "why_no_fp16"),
    (r"this CPU has neither AVX512-BF16 nor AMX", "why_no_bf16"),
    (r"autocast (\S+) is not supported on (\w+)", "why_unsupported"),
    (r"autocast casts float32 ops only; this model computes in (\w+)", "why_not_fp32"),
    (r"no fp32 reference", "why_no_reference"),
    (r"planned skip: batch (\d+) predicted (\d+) ms per run; with a warm-up and (\d+) runs it did not fit the "
     r"([\d.]+) s left", "why_planned_skip"),
    (r"planned skip: predicted ~([\d.]+) s for batch (\d+) \(x([\d.]+) margin: ([\d.]+) s\), more than the "
     r"([\d.]+) s left", "why_planned_total"),
    (r"batch-(\d+) latency not measured", "why_latency_not_measured"),
    (r"failed: (.*)", "why_failed"),
    (r"the stage's budget is spent", "why_budget_spent"),
    (r"no autocast precision here", "why_no_autocast"),
)


def _localized_reason(reason):
    """`reason` (an English string from results.json) in the figure's language: each '; '-clause
    a known pattern matches is said with its LABELS phrase, any other clause stays as written."""
    if not reason or _lang() == "en":
        return reason or ""
    parts, said = reason.split("; "), []
    while parts:
        for joined in (2, 1):  # a pattern may span two clauses ("...per run; with a warm-up...")
            text = "; ".join(parts[:joined])
            match = next((m for m in (re.match(p, text) for p, _ in REASON_PHRASES) if m), None)
            if match and (joined == 1 or match.end() > len(parts[0])):
                key = next(k for p, k in REASON_PHRASES if re.match(p, text))
                words = [_t(f"word_{g}") if f"word_{g}" in LABELS else g for g in match.groups()]
                said.append(_t(key).format(*words))  # a word among the groups ("step", "run") said too
                parts = parts[joined:]
                break
        else:
            said.append(parts.pop(0))
    return "；".join(said)


def _ratio_limits(ratios, floor=1.5, room=1.6):
    """Symmetric log limits around 1×: every ratio times `room` (for its label), at least [1/floor, floor]."""
    top = max([floor] + [max(r, 1 / r) for r in ratios if r]) * room
    return 1 / top, top


def _ratio_axis(ax, ratios, axis="y", floor=1.5, room=1.6):
    """A log axis centred on 1× (symmetric limits, ticks written 1/2×, 1×, 2×) with the 1× line."""
    from matplotlib.ticker import FixedLocator, FuncFormatter, NullLocator
    lo, hi = _ratio_limits(ratios, floor, room)
    ticks = [t for t in (1 / 100, 1 / 30, 1 / 10, 1 / 3, 1 / 2, 1, 2, 3, 10, 30, 100) if lo <= t <= hi]
    which = ax.yaxis if axis == "y" else ax.xaxis
    (ax.set_yscale if axis == "y" else ax.set_xscale)("log")
    (ax.set_ylim if axis == "y" else ax.set_xlim)(lo, hi)
    which.set_major_locator(FixedLocator(ticks))
    which.set_minor_locator(NullLocator())
    which.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}×" if v >= 1 else f"1/{1 / v:.3g}×"))
    (ax.axhline if axis == "y" else ax.axvline)(1, color="black", lw=1.2, zorder=2)


def _ratio_bars(ax, positions, ratios, colors, *, width=0.6, horizontal=False, **bar_kw):
    """Bars that start at 1× and grow up (or right) for a gain, down (or left) for a loss: on a
    log axis centred on 1×, a 0.6× slowdown is drawn as one."""
    heights = [r - 1 if r else 0 for r in ratios]
    if colors is not None:
        bar_kw["color"] = colors
    if horizontal:
        return ax.barh(positions, heights, width, left=1, **bar_kw)
    return ax.bar(positions, heights, width, bottom=1, **bar_kw)


def _place_labels(ax, xs, ys, texts, *, fontsize=8, color="black", avoid=()):
    """Name each point without two names overlapping: try offsets around the point, nearest first,
    and keep the first whose box meets no name already placed (nor the `avoid` boxes, display
    units); a name with no free spot gets the least crowded one."""
    fig = ax.figure
    renderer = fig.canvas.get_renderer()
    offsets = [(5, 3), (5, -10), (-5, 3), (-5, -10), (0, 8), (0, -14), (10, 12), (10, -18), (-10, 12),
               (-10, -18), (16, 0), (-16, 0)]
    placed = list(avoid)
    labels = []
    for x, y, text in sorted(zip(xs, ys, texts), key=lambda p: -p[1]):
        best = None
        for dx, dy in offsets:
            label = ax.annotate(text, (x, y), xytext=(dx, dy), textcoords="offset points", fontsize=fontsize,
                                color=color, ha="left" if dx > 0 else "right" if dx < 0 else "center",
                                va="bottom" if dy >= 0 else "top")
            box = label.get_window_extent(renderer).expanded(1.05, 1.1)
            overlap = sum(box.overlaps(other) for other in placed)
            inside = ax.get_window_extent(renderer).contains(box.x0, box.y0) and \
                ax.get_window_extent(renderer).contains(box.x1, box.y1)
            score = overlap + (0 if inside else 0.5)
            if best is None or score < best[0]:
                if best is not None:
                    best[1].remove()
                best = (score, label, box)
            else:
                label.remove()
            if score == 0:
                break
        placed.append(best[2])
        labels.append(best[1])
    return labels


def _plot_flop_bars(ax, records):
    """Forward FLOPs per model: matmul-class and other, side by side, log scale."""
    names = [r["name"] for r in records]
    y = np.arange(len(records))
    ax.barh(y - 0.2, [r["flops"] for r in records], height=0.4, color=PALETTE.blue, label=_t("matmul_flops"))
    ax.barh(y + 0.2, [max(r["other_flops"], 1) for r in records], height=0.4, color=PALETTE.orange,
            label=_t("other_flops"))
    for yi, r in zip(y, records):
        ax.annotate(readable(r["flops"]), (r["flops"], yi - 0.2), xytext=(3, 0), textcoords="offset points",
                    va="center", fontsize=8)
    ax.set_yticks(y, names)
    ax.invert_yaxis()
    ax.set_xscale("log")
    ax.set_xlim(min(r["other_flops"] for r in records) / 3, max(r["flops"] for r in records) * 40)
    ax.set_title(_t("flop_bars"))
    ax.legend(fontsize=8, loc="upper right")


def _plot_param_bars(ax, records):
    """Parameter count per model, log scale."""
    _barh(ax, [r["name"] for r in records], [r["parameters"] for r in records],
          [_kind_color(r["kind"]) for r in records], log=True, fmt=readable)
    ax.set_title(_t("params_bars"))
    _kind_legend(ax, [r["kind"] for r in records])


def _plot_flops_vs_params(ax, records):
    """FLOPs against parameters, one point per model: compute is not proportional to size."""
    params = np.array([r["parameters"] for r in records], dtype=float)
    flops = np.array([r["flops"] for r in records], dtype=float)
    ax.scatter(params, flops, s=60, c=[_kind_color(r["kind"]) for r in records], zorder=3)
    line = np.array([params.min() / 2, params.max() * 2])
    ax.plot(line, FLOPS_PER_MAC * line * records[0]["batch"], "k--", lw=1, label=_t("ratio_2x"))
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel(_t("parameters"))
    ax.set_ylabel(_t("fwd_flops_axis"))
    ax.set_title(_t("flops_vs_params"))
    ax.legend(fontsize=8, loc="upper left")
    ax.text(0.98, 0.03, _t("reuse_note"), transform=ax.transAxes, ha="right", fontsize=8, style="italic")
    _place_labels(ax, params, flops, [r["name"] for r in records])


def _plot_flops_per_param(ax, records):
    """Forward FLOPs per parameter (2 x how often each weight is reused per sample)."""
    per_param = [r["flops"] / r["batch"] / r["parameters"] for r in records]
    _barh(ax, [r["name"] for r in records], per_param, [_kind_color(r["kind"]) for r in records],
          log=True, fmt=lambda v: f"{v:,.0f}")
    ax.axvline(2, color="k", ls="--", lw=1)
    ax.set_title(_t("flops_per_param"))


def _plot_training_ratio(ax, records):
    """Training / forward FLOPs per model: what the backward ops that ran add."""
    ratios = [r["training_flops"] / r["flops"] for r in records]
    _barh(ax, [r["name"] for r in records], ratios, [_kind_color(r["kind"]) for r in records],
          fmt=lambda v: f"{v:.2f}×", inside=True)
    ax.axvline(3, color="k", ls="--", lw=1, label=_t("ratio_3x"))
    ax.set_xlim(0, 3.6)
    ax.set_title(_t("train_ratio"))
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.05))  # below the axes, off the bars


def _plot_flop_composition(ax, records):
    """Each model's forward matmul-class FLOPs split by work class (registry's `work`)."""
    names = [r["name"] for r in records]
    left = np.zeros(len(records))
    colors = [PALETTE.blue, PALETTE.green, PALETTE.red, PALETTE.purple]
    for cls, color in zip(WORK_CLASSES, colors):
        share = np.array([100 * r["by_class"][cls] / max(r["flops"], 1) for r in records])
        ax.barh(names, share, left=left, color=color, label=_t(f"cls_{cls.split('/')[0]}"))
        left += share
    ax.invert_yaxis()
    ax.set_xlim(0, 100)
    ax.set_title(_t("flop_composition"))
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.07), ncol=4)


def plot_flop_analysis(data):
    """Six panels from run_flop_analysis's data; returns the Figure."""
    records = data["records"]
    import matplotlib.pyplot as plt
    with _figure_style():
        fig, axs = plt.subplots(2, 3, figsize=(19, 11), layout="constrained")
        _plot_flop_bars(axs[0, 0], records)
        _plot_param_bars(axs[0, 1], records)
        _plot_flops_vs_params(axs[0, 2], records)
        _plot_flops_per_param(axs[1, 0], records)
        _plot_training_ratio(axs[1, 1], records)
        _plot_flop_composition(axs[1, 2], records)
        _suptitle(fig, _t("flop_title"), _t("flop_sub", batch=records[0]["batch"]))
    return fig


def visualize_flop_analysis(output_dir=DEFAULT_OUTPUT_DIR, *, data=None, dpi=DPI, **options):
    """Count the model zoo and draw FLOP分析可视化.png into `output_dir` (None: don't save);
    `options` (profile, models, batch, ...) go to run_flop_analysis."""
    return _save_into(plot_flop_analysis(data or run_flop_analysis(**options)), output_dir, "flop", dpi)


MEMORY_COLORS = {"parameter_bytes": PALETTE.blue, "gradient_bytes": PALETTE.orange, "optimizer_bytes": PALETTE.green,
                 "activation_bytes": PALETTE.red, "weight_copy_bytes": PALETTE.cyan, "temporary_bytes": PALETTE.purple,
                 "buffer_bytes": PALETTE.brown}


def _stacked_parts(ax, x, parts_per_bar, width, *, label=True, hatch=None):
    """One bar per dict of part -> bytes, stacked in MiB in MEMORY_COLORS order ("buffer_bytes"
    includes the inputs); parts absent from every dict are left out of the legend."""
    bottom = np.zeros(len(parts_per_bar))
    for part in MEMORY_COLORS:
        values = np.array([(d.get(part, 0) + (d.get("input_bytes", 0) if part == "buffer_bytes" else 0)) / MIB
                           for d in parts_per_bar])
        if values.any():
            ax.bar(x, values, width, bottom=bottom, color=MEMORY_COLORS[part], hatch=hatch,
                   label=_t(f"{part}_part") if label else None, edgecolor="white", linewidth=0.5)
            bottom += values
    return bottom


def _plot_memory_composition(ax, models):
    """The parts alive at the training peak: napkin formula (hatched) beside the estimate, with the
    measured peak, the phase each peak falls in, and why the peak holds almost no gradients."""
    from matplotlib.patches import Patch
    names = list(models)
    x = np.arange(len(names))
    estimates = [models[name]["training"]["estimate"] for name in names]
    _stacked_parts(ax, x - 0.2, [e["formula"] for e in estimates], 0.38, label=False, hatch="//")
    tops = _stacked_parts(ax, x + 0.2, [e["at_peak"] for e in estimates], 0.38)
    measured = [models[n]["training"]["measured"]["total"] / MIB for n in names]
    ax.scatter(x + 0.2, measured, marker="D", s=50, color="black", zorder=3, label=_t("measured_peak"))
    ax.set_ylim(0, 1.3 * max(max(measured), *(models[n]["training"]["estimate"]["formula"]["total"] / MIB
                                               for n in names)))
    phases = [_t("peak_in", phase=_t("phase_" + models[n]["training"]["measured"].get("peak_phase", "setup")))
              for n in names]
    ax.set_xticks(x, [f"{n}\n{p}" for n, p in zip(names, phases)], fontsize=8)
    ax.set_ylabel(_t("mib"))
    ax.set_title(_t("mem_composition"))
    # a part under 1 % of the tallest bar cannot be seen: named under the legend instead of in it
    tiny = {part for part in MEMORY_COLORS
            if 0 < max((e["at_peak"].get(part, 0) + (e["at_peak"].get("input_bytes", 0) if part == "buffer_bytes"
                                                      else 0)) / MIB for e in estimates) < 0.01 * max(tops)}
    handles = [h for h, label in zip(*ax.get_legend_handles_labels())
               if label not in {_t(f"{p}_part") for p in tiny}]
    handles += [Patch(facecolor="white", edgecolor=PALETTE.dark, hatch="//", label=_t("hatch_formula")),
                Patch(facecolor=PALETTE.dark, label=_t("solid_estimate"))]
    ax.legend(handles=handles, fontsize=8, loc="upper left", ncol=2)
    in_backward = [n for n in names if models[n]["training"]["measured"].get("peak_phase") == "backward"]
    notes = [_t("no_grad_note", models="、".join(in_backward) if _lang() == "zh" else ", ".join(in_backward))
             ] if in_backward else []
    if tiny:
        notes.append(_t("small_parts", parts="、".join(_t(f"{p}_part") for p in tiny)))
    ax.set_xlabel("\n".join(notes), fontsize=8, color=PALETTE.note)


def _plot_train_vs_inference(ax, models):
    """Peak memory of a training step against an inference forward, per model."""
    names = list(models)
    x = np.arange(len(names))
    train = [models[n]["training"]["measured"]["total"] / MIB for n in names]
    infer = [models[n]["inference"]["measured"]["total"] / MIB for n in names]
    ax.bar(x - 0.2, train, 0.4, color=PALETTE.red, label=_t("training"))
    ax.bar(x + 0.2, infer, 0.4, color=PALETTE.blue, label=_t("inference"))
    for xi, t, i in zip(x, train, infer):
        ax.annotate(f"{t / i:.1f}×", (xi - 0.2, t), xytext=(0, 2), textcoords="offset points", ha="center",
                    fontsize=8)
    ax.set_xticks(x, names, fontsize=8)
    ax.set_ylabel(_t("mib"))
    ax.set_title(_t("train_vs_infer"))
    ax.legend(fontsize=8)


def _plot_memory_growth(ax, growth, model_name):
    """Estimated training peak as the batch grows (fixed part dashed), measured points on it."""
    ax.plot(growth["batches"], np.array(growth["estimated_total"]) / MIB, "o-", color=PALETTE.red,
            label=_t("estimated_total"))
    ax.plot(growth["batches"], np.array(growth["fixed"]) / MIB, "--", color=PALETTE.blue, label=_t("fixed_part"))
    ax.scatter(growth["measured_batches"], np.array(growth["measured_total"]) / MIB, marker="D", s=60,
               color="black", zorder=3, label=_t("measured_points"))
    ax.set_xlabel(_t("batch_size"))
    ax.set_ylabel(_t("mib"))
    ax.set_ylim(bottom=0)
    ax.set_title(_t("mem_growth", model=model_name))
    ax.legend(fontsize=8, loc="upper left")


def _plot_memory_variants(ax, variants, parameters, model_name, batch):
    """Bytes per parameter at the peak for each precision / checkpointing variant (estimates)."""
    labels = list(variants)
    per_param = [variants[label] / parameters for label in labels]
    _barh(ax, [_t("variant_" + label) if "variant_" + label in LABELS else label for label in labels], per_param,
          [PALETTE.blue, PALETTE.green, PALETTE.cyan, PALETTE.purple, PALETTE.red, PALETTE.orange],
          fmt=lambda v: _t("bytes_per_param_v", v=v))
    ax.set_xlabel(_t("bytes_per_param"))
    key = "mem_variants" if any("checkpoint" in label for label in labels) else "mem_variants_precision"
    ax.set_title(_t(key, model=model_name, batch=batch))


def _plot_zero(ax, zero):
    """Per-device model-state memory of a 7B model on 8 devices: DDP and ZeRO stages 1-3 (arithmetic)."""
    labels = list(zero["per_device"])
    values = [v / GIB for v in zero["per_device"].values()]
    ax.bar(labels, values, color=[PALETTE.muted, PALETTE.blue, PALETTE.green, PALETTE.red])
    for i, v in enumerate(values):
        ax.annotate(f"{v:.1f}", (i, v), xytext=(0, 2), textcoords="offset points", ha="center", fontsize=8)
    ax.axhline(80, color="k", ls="--", lw=1, label=_t("gpu_80gb"))
    ax.set_ylabel(_t("gib"))
    ax.set_title(_t("zero_title", n=zero["devices"]))
    ax.text(0.98, 0.6, _t("zero_note"), transform=ax.transAxes, ha="right", fontsize=8, style="italic",
            wrap=True)
    ax.legend(fontsize=8)


def _plot_memory_error(ax, models):
    """The napkin formula's and the estimate's error against the measured peak, and what each was
    compared with."""
    names = list(models)
    x = np.arange(len(names))
    for offset, key, color in ((-0.2, "napkin", PALETTE.orange), (0.2, "estimate", PALETTE.blue)):
        errors = []
        for name in names:
            pair = models[name]["training"]
            measured = pair["measured"]["total"]
            predicted = pair["estimate"]["formula"]["total"] if key == "napkin" else pair["estimate"]["total"]
            errors.append(100 * (predicted - measured) / measured)
        ax.bar(x + offset, errors, 0.4, color=color, label=_t(key))
        for xi, e in zip(x, errors):
            ax.annotate(f"{round(e, 1) + 0.0:+.1f}%", (xi + offset, e), xytext=(0, 2 if e >= 0 else -10),
                        textcoords="offset points", ha="center", fontsize=8)
    ax.axhline(0, color="k", lw=0.8)
    ax.set_xticks(x, names, fontsize=8)
    ax.set_ylabel("%")
    ax.set_title(_t("mem_error"))
    method = next(iter(models.values()))["training"]["measured"]["method"]
    ax.set_xlabel(_t("mem_source", method=method), fontsize=8, wrap=True)
    ax.margins(y=0.12)
    ax.legend(fontsize=8, loc="lower right")


def plot_memory_analysis(data):
    """Six panels from `run_memory_analysis` data; returns the Figure."""
    import matplotlib.pyplot as plt
    gpt = "TinyGPT (T=64)"
    with _figure_style():
        fig, axs = plt.subplots(2, 3, figsize=(19, 11), layout="constrained")
        _plot_memory_composition(axs[0, 0], data["models"])
        _plot_train_vs_inference(axs[0, 1], data["models"])
        _plot_memory_growth(axs[0, 2], data["growth"], gpt)
        _plot_memory_variants(axs[1, 0], data["variants"], data["gpt_parameters"], gpt, data["batch"])
        _plot_zero(axs[1, 1], data["zero"])
        _plot_memory_error(axs[1, 2], data["models"])
        _suptitle(fig, _t("mem_title"), _t("mem_sub", device=data["device"], batch=data["batch"]))
    return fig


def visualize_memory_analysis(output_dir=DEFAULT_OUTPUT_DIR, *, data=None, dpi=DPI, **options):
    """Estimate and measure memory, and draw 内存分析可视化.png into `output_dir` (None: don't save);
    `options` (profile, device, ...) go to run_memory_analysis."""
    return _save_into(plot_memory_analysis(data or run_memory_analysis(**options)), output_dir, "memory", dpi)


def _timeline_panel(ax, timeline, title):
    """One step's memory over its events, stacked by category (inputs with the buffers), its phases
    shaded and named, its peak marked."""
    index = np.array(timeline["index"])
    parts = dict(timeline["parts"])
    parts["buffer_bytes"] = np.add(parts.get("buffer_bytes", 0), parts.pop("input_bytes", 0))
    order = [_StorageTracker.PART_KEYS[c] for c in _StorageTracker.CATEGORIES if _StorageTracker.PART_KEYS[c] in parts]
    shown = [p for p in order if np.any(parts[p])]
    ax.stackplot(index, [np.array(parts[p]) / MIB for p in shown], colors=[MEMORY_COLORS[p] for p in shown],
                 labels=[_t(f"{p}_part") for p in shown], step="post", linewidth=0)
    shades = {"forward": PALETTE.blue, "backward": PALETTE.orange, "optimizer": PALETTE.green}
    phases = timeline["phases"] + [["end", timeline["events"]]]
    counts = {}
    for (phase, start), (_, end) in zip(phases, phases[1:]):
        if phase not in shades:
            continue
        counts[phase] = counts.get(phase, 0) + 1
        repeats = sum(p == phase for p, _ in timeline["phases"]) > 1
        ax.axvspan(start, end, color=shades[phase], alpha=0.08, lw=0)
        ax.text((start + end) / 2, 0.985, _t("phase_" + phase)[:1 if repeats and _lang() == "zh" else None]
                + (str(counts[phase]) if repeats else ""), transform=ax.get_xaxis_transform(), ha="center",
                va="top", fontsize=8, color=PALETTE.dark)
    peak_mib = timeline["peak_bytes"] / MIB
    ax.axvline(timeline["peak_index"], color="black", ls="--", lw=1)
    ax.plot(timeline["peak_index"], peak_mib, marker="v", color="black", ms=8, zorder=4)
    ax.annotate(_t("tl_peak", mib=peak_mib, phase=_t("phase_" + timeline["peak_phase"])),
                (timeline["peak_index"], peak_mib), xytext=(6, 6), textcoords="offset points", fontsize=9,
                ha="left" if timeline["peak_index"] < 0.6 * timeline["events"] else "right")
    # the state registered before the step (weights, Adam's m and v, the batch) is not drawn as a ramp:
    # the axis starts where the step does
    ax.set_xlim(timeline["phases"][0][1] if timeline["phases"] else 0, timeline["events"])
    ax.set_xlabel(_t("tl_event"))
    ax.set_ylabel(_t("mib"))
    ax.set_title(title)


def plot_memory_timeline(data):
    """Memory over one steady-state training step, baseline / checkpointing / accumulation side by
    side, from the memory stage's `timeline`; returns the Figure."""
    import matplotlib.pyplot as plt
    timeline = data["timeline"]
    runs = timeline["runs"]
    with _figure_style():
        fig, axs = plt.subplots(1, len(runs), figsize=(19, 7.5), layout="constrained", sharey=True)
        for ax, (strategy, run) in zip(np.atleast_1d(axs), runs.items()):
            name = _t(f"strat_{strategy}", precision="fp32", k=run["micro_batches"],
                      micro=timeline["batch"] // run["micro_batches"], blocks=run["checkpointed_blocks"])
            _timeline_panel(ax, run, name)
        top = max(run["peak_bytes"] for run in runs.values()) / MIB
        np.atleast_1d(axs)[0].set_ylim(0, top * 1.18)
        handles, labels = np.atleast_1d(axs)[0].get_legend_handles_labels()
        for ax in np.atleast_1d(axs)[1:]:  # a part only another run has (checkpointing's temporaries)
            for h, label in zip(*ax.get_legend_handles_labels()):
                if label not in labels:
                    handles.append(h)
                    labels.append(label)
        np.atleast_1d(axs)[0].legend(handles[::-1], labels[::-1], loc="upper right", fontsize=9)
        method = next(iter(runs.values()))["method"]  # no timing drawn: a busy machine changes nothing here
        _suptitle(fig, _t("tl_title", model=timeline["model"], batch=timeline["batch"]),
                  _t("tl_sub", device=data["device"], method=_t("tracker") if method == _StorageTracker.SOURCE
                     else method))
        fig.supxlabel(_wrap(_t("tl_notes", k=timeline["micro_batches"]), 120 if _lang() == "zh" else 230),
                      fontsize=9, x=0.01, ha="left", color=PALETTE.ink)
    return fig


def visualize_memory_timeline(output_dir=DEFAULT_OUTPUT_DIR, *, data=None, dpi=DPI, **options):
    """Draw 内存时间线.png (memory over one training step) from the memory stage's data into
    `output_dir` (None: don't save); `options` go to run_memory_analysis when `data` is None."""
    return _save_into(plot_memory_timeline(data or run_memory_analysis(**options)), output_dir, "timeline", dpi)


STRATEGY_STYLES = {  # colour, line style, width: curves that coincide stay visible
    "baseline": (PALETTE.blue, "-", 3.0), "mixed_precision": (PALETTE.green, "-", 1.4),
    "gradient_accumulation": (PALETTE.orange, "--", 1.6), "gradient_checkpointing": (PALETTE.red, ":", 2.0),
}


def _strategy_label(data, strategy):
    """A strategy's name on the figure, with its micro-batches or checkpointed blocks."""
    run = data["runs"][strategy]
    return _t(f"strat_{strategy}", precision=run["precision"], k=run["micro_batches"],
              micro=data["batch"] // run["micro_batches"], blocks=run["checkpointed_blocks"])


def _plot_loss_curves(ax, data):
    """One loss panel: the baseline's training loss per step (line) and validation loss (dots);
    every other strategy drawn thin over it in its colour (they coincide: their gaps are the next panel)."""
    for strategy, run in data["runs"].items():
        color, style, width = STRATEGY_STYLES[strategy]
        steps = np.arange(1, len(run["train_loss"]) + 1)
        base = strategy == "baseline"
        ax.plot(steps, run["train_loss"], ls=style, lw=width if base else 1.2, color=color,
                label=_strategy_label(data, strategy), zorder=3 if base else 4)
        if base:
            ax.plot(run["val_steps"], run["val_loss"], "o", color="black", ms=5, zorder=5,
                    label=_t("val_dots", n=data["val_samples"]))
    ax.set_xlabel(_t("opt_step"))
    ax.set_ylabel(_t("cross_entropy"))
    ax.set_ylim(bottom=0)
    ax.set_title(_t("train_loss_one"))
    ax.legend(fontsize=8, loc="upper right")


def _plot_loss_gap(ax, data):
    """|training loss - the baseline's| per step for each other strategy, on a log axis; a strategy
    bit-identical to the baseline at every step is said in words (0 has no place on a log axis)."""
    base = np.array(data["runs"]["baseline"]["train_loss"]) if "baseline" in data["runs"] else None
    same = []
    for strategy, run in data["runs"].items():
        if strategy == "baseline" or base is None:
            continue
        n = min(len(base), len(run["train_loss"]))
        gap = np.abs(np.array(run["train_loss"][:n]) - base[:n])
        color, style, _ = STRATEGY_STYLES[strategy]
        if not gap.any():
            same.append(_strategy_label(data, strategy))
            continue
        ax.plot(np.arange(1, n + 1), np.where(gap > 0, gap, np.nan), ls=style, lw=1.6, color=color, marker=".",
                label=_strategy_label(data, strategy))
    if ax.lines:
        ax.set_yscale("log")
        ax.legend(fontsize=8, loc="lower right")
    for i, name in enumerate(same):
        ax.text(0.02, 0.97 - 0.07 * i, _t("bitwise_same", name=name), transform=ax.transAxes, va="top", fontsize=9,
                color=PALETTE.dark)
    if not ax.lines and not same:  # only the baseline ran: the others' reasons (the plan's skips)
        _not_measured(ax, "; ".join((data.get("skipped") or {}).values()) or _t("loss_gap_nothing"))
    ax.set_xlabel(_t("opt_step"))
    ax.set_ylabel(_t("gap_axis"))
    ax.set_title(_t("loss_gap"))


def _strategy_bars(ax, data, values, fmt, label_at=None):
    """Horizontal bars, one per strategy in its colour."""
    names = [_strategy_label(data, s) for s in data["runs"]]
    colors = [STRATEGY_STYLES[s][0] for s in data["runs"]]
    _barh(ax, names, values, colors, fmt=fmt, label_at=label_at)


def _plot_grad_norms(ax, data):
    """The global gradient norm of every step per strategy (before the optimizer step, unscaled),
    the GradScaler's loss scale and skipped steps where there is one, non-finite gradients if any."""
    notes = []
    for strategy, run in data["runs"].items():
        color, style, width = STRATEGY_STYLES[strategy]
        norms = run.get("grad_norm") or []
        ax.plot(range(1, len(norms) + 1), norms, color=color, ls=style, lw=width, label=_strategy_label(data, strategy))
        if run.get("loss_scale_per_step"):
            notes.append(_t("grad_scale_note", strategy=_strategy_label(data, strategy),
                            scale=run["loss_scale_per_step"][-1], skipped=run["skipped_steps"]))
        if any(run.get("nonfinite_grads") or ()):
            notes.append(_t("grad_nonfinite", strategy=_strategy_label(data, strategy),
                            steps=sum(1 for n in run["nonfinite_grads"] if n)))
    ax.set_xlabel(_t("opt_step") + "\n" + ("\n".join(notes) if notes else _t("grad_no_scaler")), fontsize=9)
    ax.set_ylabel(_t("grad_norm_axis"))
    ax.legend(fontsize=8)
    ax.set_title(_t("grad_norm_title"))


def _plot_grad_groups(ax, data):
    """The baseline's gradient norm per top-level layer group, at its first and its last step."""
    run = data["runs"].get("baseline") or next(iter(data["runs"].values()))
    groups = run.get("grad_norm_by_group") or {}
    if not groups:
        _not_measured(ax, "")
        ax.set_title(_t("grad_groups_title"))
        return
    names = list(groups["first"])
    y = np.arange(len(names))
    for offset, key, color in ((-0.2, "first", PALETTE.muted), (0.2, "last", PALETTE.blue)):
        values = [groups[key][n] for n in names]
        ax.barh(y + offset, values, 0.4, color=color, label=_t(f"grad_{key}"))
        for yi, v in zip(y + offset, values):
            ax.annotate(f"{v:.3g}", (v, yi), xytext=(3, 0), textcoords="offset points", va="center", fontsize=8)
    ax.set_yticks(y, names)
    ax.invert_yaxis()
    ax.set_xlim(0, max(max(groups[k].values()) for k in ("first", "last")) * 1.25)  # room for the labels
    ax.set_xlabel(_t("grad_norm_axis"))
    ax.legend(fontsize=8, loc="lower right")
    ax.set_title(_t("grad_groups_title"))


def _plot_input_pipeline(ax, pipeline):
    """Samples/s a DataLoader delivers per num_workers (median, bar = its spread), against the
    baseline's training step rate: below the line the step waits for its data."""
    if not pipeline:
        _not_measured(ax, "")
        ax.set_title(_t("pipeline_title"))
        return
    rows = pipeline["rows"]
    y = np.arange(len(rows))
    values = [r["samples_per_s"] for r in rows]
    ax.barh(y, values, 0.6, color=PALETTE.cyan)
    lo = [v - r["samples_per_s_range"][0] for v, r in zip(values, rows)]
    hi = [r["samples_per_s_range"][1] - v for v, r in zip(values, rows)]
    ax.errorbar(values, y, xerr=[lo, hi], fmt="none", ecolor="k", capsize=3, lw=1)
    for yi, v, r in zip(y, values, rows):
        ax.annotate(f"{v:,.0f}", (r["samples_per_s_range"][1], yi), xytext=(4, 0), textcoords="offset points",
                    va="center", fontsize=8)
    step = pipeline.get("step_samples_per_s")
    if step:
        ax.axvline(step, color=PALETTE.red, ls="--", lw=1.5, label=_t("pipeline_step", rate=step))
        ax.legend(fontsize=8, loc="lower right")
    ax.set_yticks(y, [_t("pipeline_workers", n=r["num_workers"]) for r in rows])
    ax.invert_yaxis()
    verdict = _t("pipeline_bound" if pipeline.get("input_bound") else "pipeline_not_bound") if step else ""
    note = _t("pipeline_no_pin") if pipeline.get("pin_memory_note") else ""
    ax.set_xlabel("\n".join(t for t in (_t("samples_per_s"), _t("pipeline_data"), verdict, note) if t), fontsize=9)
    ax.set_title(_t("pipeline_title", batch=pipeline["batch_size"]))


def _plot_throughput(ax, data):
    """Samples per second per strategy (median, bar = its spread)."""
    runs = list(data["runs"].values())
    values = [run["samples_per_s"] for run in runs]
    base = data["runs"].get("baseline", {}).get("samples_per_s")
    _strategy_bars(ax, data, values, lambda v: f"{v:,.0f}" + (f"  ({v / base:.2f}×)" if base else ""),
                   label_at=[run["samples_per_s_range"][1] for run in runs])  # past the error bar
    lo = [v - run["samples_per_s_range"][0] for v, run in zip(values, runs)]
    hi = [run["samples_per_s_range"][1] - v for v, run in zip(values, runs)]
    ax.errorbar(values, range(len(values)), xerr=[lo, hi], fmt="none", ecolor="k", capsize=3, lw=1)
    ax.set_xlabel(_t("samples_per_s"))
    ax.set_title(_t("throughput"))


def _plot_training_memory(ax, data):
    """Each strategy's measured step peak, split into the parts alive at it."""
    runs = list(data["runs"].values())
    x = np.arange(len(runs))
    _stacked_parts(ax, x, [run["at_peak"] for run in runs], 0.6)
    peaks = [run["peak_memory_bytes"] / MIB for run in runs]
    for xi, peak in zip(x, peaks):
        ax.annotate(f"{peak:.1f} MiB", (xi, peak), xytext=(0, 2), textcoords="offset points", ha="center",
                    fontsize=8)
    ax.set_xticks(x, [_strategy_label(data, s).replace("（", "\n（").replace(" (", "\n(") for s in data["runs"]],
                  fontsize=8)
    ax.set_ylabel(_t("mib"))
    ax.set_ylim(0, max(peaks) * 1.25)
    ax.set_title(_t("train_memory"))
    ax.legend(fontsize=8, loc="upper right", ncol=2)


def _plot_mfu(ax, data):
    """Model FLOPs utilisation per strategy against its precision's measured peak ('invalid' above 100 %)."""
    runs = list(data["runs"].values())
    values = [run["mfu"] or 0.0 for run in runs]  # None: invalid, drawn as a word, not a bar
    from matplotlib.ticker import PercentFormatter
    _strategy_bars(ax, data, values, lambda v: f"{v:.1%}" if v else "")
    for i, run in enumerate(runs):
        if run["mfu"] is None:
            ax.text(0.01, i, _t("mfu_invalid"), va="center", fontsize=8, color=PALETTE.warning,
                    transform=ax.get_yaxis_transform())
    ax.set_xlim(0, 1.0 if max(values) > 0.6 else None)  # never beyond 100 %
    ax.xaxis.set_major_formatter(PercentFormatter(1.0))
    peaks = ", ".join(f"{p} {readable(v['flops_per_s'], 'FLOP/s')}" for p, v in data["peak_flops"].items())
    note = _t("mfu_note", peaks=peaks) if "gradient_checkpointing" in data["runs"] else _t("mfu_peaks", peaks=peaks)
    mixed = data["runs"].get("mixed_precision")
    if mixed and mixed["precision"] in data["peak_flops"] and "fp32" in data["peak_flops"]:
        ratio = data["peak_flops"][mixed["precision"]]["flops_per_s"] / data["peak_flops"]["fp32"]["flops_per_s"]
        note += "\n" + _t("mfu_mp_note", p=mixed["precision"], r=ratio)
    ax.set_xlabel(note, fontsize=8)
    ax.set_title(_t("mfu"))


def _plot_training_tradeoff(ax, data):
    """Each strategy against the baseline on three measures, bars from 1× on a log axis (right =
    better): speed (samples/s), memory (the baseline's peak over its peak), final validation loss."""
    runs = data["runs"]
    base = runs.get("baseline")
    others = [s for s in runs if s != "baseline"]
    if not base or not others:
        _not_measured(ax, "")
        ax.set_title(_t("tradeoff"))
        return
    metrics = {"t_speed": lambda r: r["samples_per_s"] / base["samples_per_s"],
               "t_memory": lambda r: base["peak_memory_bytes"] / r["peak_memory_bytes"],
               "t_loss": lambda r: base["val_loss"][-1] / r["val_loss"][-1]}
    height = 0.8 / len(others)
    ratios = []
    for i, key in enumerate(metrics):
        for j, strategy in enumerate(others):
            y = i + (j - (len(others) - 1) / 2) * height
            value = metrics[key](runs[strategy])
            ratios.append(value)
            _ratio_bars(ax, [y], [value], [STRATEGY_STYLES[strategy][0]], width=height * 0.9, horizontal=True,
                        label=_strategy_label(data, strategy) if i == 0 else None)
            ax.annotate(f"{value:.2f}×", (value, y), xytext=(3 if value >= 1 else -3, 0), textcoords="offset points",
                        va="center", ha="left" if value >= 1 else "right", fontsize=8)
    _ratio_axis(ax, ratios, axis="x", floor=2, room=1.8)
    ax.set_yticks(range(len(metrics)), [_t(k) for k in metrics], fontsize=9)
    ax.invert_yaxis()
    ax.set_title(_t("tradeoff"))
    ax.legend(fontsize=8, loc="lower right")


def plot_training_performance(data):
    """Nine panels from `run_training_comparison` data; returns the Figure."""
    import matplotlib.pyplot as plt
    with _figure_style():
        fig = plt.figure(figsize=(19, 17), layout="constrained")
        axs = fig.subplot_mosaic([["loss", "gap", "throughput"], ["memory", "mfu", "tradeoff"],
                                  ["grad_norm", "grad_groups", "pipeline"]])
        _plot_loss_curves(axs["loss"], data)
        _plot_loss_gap(axs["gap"], data)
        _plot_throughput(axs["throughput"], data)
        _plot_training_memory(axs["memory"], data)
        _plot_mfu(axs["mfu"], data)
        _plot_training_tradeoff(axs["tradeoff"], data)
        _plot_grad_norms(axs["grad_norm"], data)
        _plot_grad_groups(axs["grad_groups"], data)
        _plot_input_pipeline(axs["pipeline"], data.get("input_pipeline"))
        _suptitle(fig, _t("train_title"), _t("train_sub", device=data["device"], model=data["model"],
                                             params=readable(data["parameters"]), batch=data["batch"],
                                             steps=data["steps"], dataset=data["dataset"], lr=data["lr"])
                  + "\n" + _plan_note(data), data.get("conditions"))
    return fig


def _plan_note(data):
    """The plan the runs followed, what was shrunk to fit the budget, and any strategy skipped."""
    plan = data["plan"]
    note = _t("plan", steps=plan["steps"], batch=plan["batch"], width=plan["width"], pred=plan["predicted_s"],
              budget=plan["budget_s"])
    if plan["shrunk"]:
        note += _t("shrunk", what=", ".join(f"{_t('size_' + s['size'])} {s['from']}→{s['to']}"
                                            for s in plan["shrunk"]))
    if not plan["fits"]:
        note += _t("not_fit")
    for strategy in plan["skipped"]:
        precision = "amp_bf16" if data["device"].startswith("cpu") else "amp_fp16"
        name = _t(f"strat_{strategy}", precision=precision, k=data["accumulation"],
                  micro=data["batch"] // data["accumulation"], blocks=data["depth"])
        note += "\n" + _t("strategy_skipped", name=name, ms=plan["calibration_skipped_ms"][strategy])
    return note


def visualize_training_performance(output_dir=DEFAULT_OUTPUT_DIR, *, data=None, dpi=DPI, **options):
    """Train under each strategy here and draw 训练性能可视化.png into `output_dir` (None: don't save);
    `options` (profile, device, dataset, ...) go to run_training_comparison."""
    return _save_into(plot_training_performance(data or run_training_comparison(**options)), output_dir, "training",
                      dpi)


PRECISION_COLORS = {"fp32": PALETTE.blue, "amp_bf16": PALETTE.green, "amp_fp16": PALETTE.red}
DTYPE_COLORS = {"fp32": PALETTE.blue, "bf16": PALETTE.green, "fp16": PALETTE.red}  # the dtypes themselves


def _amp_matrix(models, key):
    """{precision: [value per model]} with None where the precision was skipped."""
    precisions = list(AMP_DTYPES)
    return {p: [next((r[key] for r in recs if r["precision"] == p and not r["skipped"]), None)
                for recs in models.values()] for p in precisions}


def _skip_text(record):
    """A skipped cell in words: the probe's predicted speed when that is why, else the kind of skip."""
    predicted = record.get("predicted_speedup")
    if record["skip_kind"] == "budget" and predicted:
        return _t("skip_predicted", speed=_speed_words(predicted))
    return _t(f"skip_{record['skip_kind']}")


def _amp_skips(models):
    """{precision: [skip text or None per model]}: why a bar is missing, in a few words."""
    return {p: [next((_skip_text(r) for r in recs if r["precision"] == p and r["skipped"]), None)
                for recs in models.values()] for p in AMP_DTYPES}


def _grouped_bars(ax, names, matrix, *, log=False, fmt=None, skips=None):
    """Bars per model and precision; a missing value is labelled with why (a few words)."""
    x = np.arange(len(names))
    width = 0.8 / len(matrix)
    for j, (precision, values) in enumerate(matrix.items()):
        xs = x + (j - (len(matrix) - 1) / 2) * width
        heights = [v if v is not None else 0 for v in values]
        ax.bar(xs, heights, width, color=PRECISION_COLORS[precision], label=precision)
        why = (skips or {}).get(precision) or [None] * len(values)
        for xi, v, skip in zip(xs, values, why):
            if v is None:  # at the foot of the axes, whatever its scale
                ax.annotate(skip or _t("skipped"), (xi, 0.02), xycoords=ax.get_xaxis_transform(), ha="center",
                            va="bottom", fontsize=8, rotation=90, color=PALETTE.warning)
            elif fmt:
                ax.annotate(fmt(v), (xi, v), xytext=(0, 2), textcoords="offset points", ha="center", va="bottom",
                            fontsize=8)
    ax.set_xticks(x, names, fontsize=9)
    if log and any(v for values in matrix.values() for v in values):  # all skipped: nothing to scale
        ax.set_yscale("log")
    ax.legend(fontsize=8)


def _plot_amp_time(ax, models):
    """Step time per model and precision from the raw repeated timings (seaborn: the median and
    the interquartile range of `times_s`), every run a small dot; points on a log axis, not bars,
    so the axis's start means nothing; skipped cells say why."""
    import pandas as pd
    import seaborn as sns
    names, order = list(models), list(AMP_DTYPES)
    offsets = dict(zip(order, np.linspace(-0.25, 0.25, len(order))))
    runs = [{"x": names.index(n) + offsets[r["precision"]], "precision": r["precision"], "s": t}
            for n, recs in models.items() for r in recs if not r["skipped"] for t in r["times_s"]]
    if runs:
        frame = pd.DataFrame(runs)
        sns.pointplot(frame, x="x", y="s", hue="precision", hue_order=order, palette=PRECISION_COLORS,
                      native_scale=True, estimator="median", errorbar=("pi", 50), linestyle="none", capsize=0.08,
                      err_kws={"linewidth": 1.2}, ax=ax)
        ax.scatter(frame["x"], frame["s"], s=10, alpha=0.35, color=[PRECISION_COLORS[p] for p in frame["precision"]],
                   zorder=1, label=_t("amp_times"))
        ax.set_yscale("log")
    for i, recs in enumerate(models.values()):
        for r in recs:
            xi = i + offsets[r["precision"]]
            if r["skipped"]:
                ax.annotate(_skip_text(r), (xi, 0.03), xycoords=ax.get_xaxis_transform(), ha="center",
                            va="bottom", fontsize=8, rotation=90, color=PALETTE.warning)
            else:
                ax.annotate(f"{r['median_s'] * 1e3:.1f} ms", (xi, r["median_s"]), xytext=(6, 0),
                            textcoords="offset points", va="center", fontsize=8)
    ax.set_xlim(-0.5, len(names) - 0.5)
    ax.set_xticks(range(len(names)), names, fontsize=9)
    ax.set_xlabel("")
    ax.set_ylabel(_t("seconds"))
    ax.set_title(_t("amp_time"))
    if runs:  # every run skipped: nothing to tell apart
        ax.legend(fontsize=8, title=None)


def _plot_amp_memory(ax, models):
    """Peak memory of one step per model and precision."""
    _grouped_bars(ax, list(models), {p: [v / MIB if v else None for v in vals]
                                     for p, vals in _amp_matrix(models, "peak_memory_bytes").items()},
                  fmt=lambda v: f"{v:.0f}", skips=_amp_skips(models))
    ax.set_ylabel(_t("mib"))
    ax.set_title(_t("amp_memory"))


def _plot_amp_speedup(ax, models, device=""):
    """Speed against fp32 per model and low precision: bars from 1× on a log axis centred on 1×,
    up for faster, down for slower; a cell skipped on the probe's prediction is drawn hollow and
    hatched as that prediction, and a measured cell marks what its probe had predicted."""
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch
    names, lows = list(models), [p for p in AMP_DTYPES if p != "fp32"]
    width = 0.8 / len(lows)
    ratios, handles = [], {}
    for j, p in enumerate(lows):
        color = PRECISION_COLORS[p]
        for i, name in enumerate(names):
            xi = i + (j - (len(lows) - 1) / 2) * width
            r = next((r for r in models[name] if r["precision"] == p), None)
            if r is None:
                continue
            measured, predicted = r["speedup_vs_fp32"], r.get("predicted_speedup")
            value = measured if not r["skipped"] else predicted
            if value is None:
                ax.annotate(_skip_text(r), (xi, 1), xytext=(0, 4), textcoords="offset points", ha="center",
                            va="bottom", fontsize=8, rotation=90, color=PALETTE.warning)
                continue
            ratios.append(value)
            if not r["skipped"]:
                _ratio_bars(ax, [xi], [value], [color], width=width * 0.9)
                handles[p] = Patch(facecolor=color, label=f"{p}（{_t('amp_measured_bar')}）" if _lang() == "zh"
                                   else f"{p} ({_t('amp_measured_bar')})")
                text = _speed_words(value)
                if predicted:
                    ax.plot(xi, predicted, marker="D", ms=6, mfc="white", mec="black", zorder=4)
                    ratios.append(predicted)
                    handles["probe"] = Line2D([], [], marker="D", ls="none", mfc="white", mec="black",
                                              label=_t("amp_probe_mark"))
            else:
                _ratio_bars(ax, [xi], [value], None, width=width * 0.9, facecolor="none", edgecolor=color,
                            hatch="//", linestyle="--", linewidth=1.2)
                handles[f"{p}_predicted"] = Patch(facecolor="none", edgecolor=color, hatch="//", linestyle="--",
                                                  label=f"{p}：{_t('amp_predicted')}" if _lang() == "zh"
                                                  else f"{p}: {_t('amp_predicted')}")
                text = _t("amp_predicted_cell", speed=_speed_words(value))
            ax.annotate(text, (xi, value), xytext=(0, 3 if value >= 1 else -3), textcoords="offset points",
                        ha="center", va="bottom" if value >= 1 else "top", fontsize=8)
    _ratio_axis(ax, ratios, room=4)  # room below a slowdown for its two-line label
    if str(device).startswith("cuda"):  # tensor-core GPUs: the literature's 2-3x, a reference only
        handles["lit"] = ax.axhspan(2, 3, color=PALETTE.faint, alpha=0.2, label=_t("lit_mark"))
    ax.set_xticks(range(len(names)), names, fontsize=9)
    ax.set_xlim(-0.5, len(names) - 0.5)
    ax.set_title(_t("amp_speedup"))
    ax.legend(handles=list(handles.values()), fontsize=8, loc="upper right")


def _plot_amp_saving(ax, models):
    """Activation memory saved against fp32 per model and precision."""
    peaks = _amp_matrix(models, "activation_bytes")
    matrix = {p: [100 * (1 - v / f) if (v and f) else None for v, f in zip(peaks[p], peaks["fp32"])]
              for p in peaks if p != "fp32"}
    _grouped_bars(ax, list(models), matrix, fmt=lambda v: f"{v:+.1f}%", skips=_amp_skips(models))
    ax.axhline(0, color="k", lw=0.8)
    ax.set_ylabel("%")
    ax.set_title(_t("amp_saving"))


def _plot_amp_error(ax, models):
    """The largest relative error of the outputs against fp32 (a linear axis: the bars compare)."""
    matrix = {p: v for p, v in _amp_matrix(models, "max_rel_error_vs_fp32").items() if p != "fp32"}
    _grouped_bars(ax, list(models), matrix, fmt=lambda v: f"{v:.1e}", skips=_amp_skips(models))
    ax.set_title(_t("amp_error_linear"))


def _plot_dtype_ranges(ax, ranges):
    """Representable ranges of fp16, bf16 and fp32, and what a small gradient becomes in each."""
    names = list(ranges["dtypes"])
    for i, name in enumerate(names):
        r = ranges["dtypes"][name]
        lo, hi = math.log10(r["smallest_subnormal"]), math.log10(r["max"])
        ax.barh(i, hi - lo, left=lo, color=DTYPE_COLORS[name], alpha=0.8)
        ax.text(hi, i, f" {r['max']:.2g}", va="center", fontsize=8)
        ax.text(lo, i, f"{r['smallest_subnormal']:.2g} ", va="center", ha="right", fontsize=8)
    ax.axvline(math.log10(ranges["value"]), color="k", ls="--", lw=1)
    ax.set_yticks(range(len(names)), names)
    ax.set_xlim(-52, 46)
    d = ranges["dtypes"]
    ax.set_xlabel("log10 |x|\n" + _t("underflow", fp16=d["fp16"]["value_after_cast"],
                                      bf16=d["bf16"]["value_after_cast"], scale=ranges["loss_scale"],
                                      scaled=ranges["fp16_scaled"]))
    ax.set_title(_t("amp_ranges"))


def _hardware_support(hw):
    """The subtitle's words for what this device supports natively (bf16, fp16, TF32)."""
    flags = [f"{k} {_t('yes') if v else _t('no')}" for k, v in hw.items()
             if k in ("avx512_bf16", "amx_bf16", "bf16_supported") and v is not None]
    words = [_t("hw_support", torch=hw["torch"], threads=hw["threads"],
                tf32=_t("on") if hw["tf32_matmul"] else _t("off"))] + flags
    return ("，" if _lang() == "zh" else ", ").join(words)


def plot_amp_analysis(data):
    """Six panels from `run_amp_analysis` data; returns the Figure."""
    import matplotlib.pyplot as plt
    with _figure_style():
        fig, axs = plt.subplots(2, 3, figsize=(19, 11), layout="constrained")
        _plot_amp_time(axs[0, 0], data["models"])
        _plot_amp_memory(axs[0, 1], data["models"])
        _plot_amp_speedup(axs[0, 2], data["models"], data["device"])
        _plot_amp_saving(axs[1, 0], data["models"])
        _plot_amp_error(axs[1, 1], data["models"])
        _plot_dtype_ranges(axs[1, 2], data["ranges"])
        _suptitle(fig, _t("amp_title"), _t("amp_sub", device=data["device"], batch=data["batch"],
                                           support=_hardware_support(data["hardware"])), data.get("conditions"))
        notes = [f"{name} {r['precision']}: {_localized_reason(r['skipped'])}" for name, recs in data["models"].items()
                 for r in recs if r["skipped"]]
        if notes:
            fig.supxlabel(_t("skip_notes") + "\n" + "\n".join(notes), fontsize=9, x=0.01, ha="left",
                          color=PALETTE.warning)  # inside the constrained layout, below the panels
    return fig


def demonstrate_mixed_precision_benefits(output_dir=DEFAULT_OUTPUT_DIR, *, data=None, dpi=DPI, **options):
    """Measure fp32 vs bf16/fp16 on this machine and draw 混合精度效益对比.png (None: don't save);
    `options` (profile, device, ...) go to run_amp_analysis."""
    return _save_into(plot_amp_analysis(data or run_amp_analysis(**options)), output_dir, "amp", dpi)


def _dash_rows(data):
    """(name, model data) in the zoo's order, with the derived numbers every panel uses."""
    rows = []
    for name, m in data["models"].items():
        spread = {r["batch"]: (r["spread_lo_s"], r["spread_hi_s"]) for r in m["latency"] if not r.get("skipped")}
        skipped = {r["batch"]: r.get("skipped") for r in m["latency"] if r.get("skipped")}
        by_batch = {int(b): u for b, u in m.get("utilisation_by_batch") or ()}
        rows.append({"name": name, "kind": m["kind"], "flops": m["flops"], "parameters": m["parameters"],
                     "memory": m["training_memory_bytes"], "latency_1": Scenarios.latency_of(m, 1),
                     "latency_big": Scenarios.latency_of(m, LATENCY_BATCHES[-1]), "util_batch": m["util_batch"],
                     "utilisation": m["utilisation"], "spread": spread, "skipped": skipped,
                     "util_1": by_batch.get(1)})
    return rows


def _plot_bubbles(ax, rows):
    """Parameters against FLOPs, one bubble per model in its kind's colour, area = training memory,
    with a key of bubble sizes."""
    biggest = max(r["memory"] for r in rows)

    def area(nbytes):
        return 2000 * nbytes / biggest  # area ∝ bytes

    ax.scatter([r["parameters"] for r in rows], [r["flops"] for r in rows], s=[area(r["memory"]) for r in rows],
               c=[_kind_color(r["kind"]) for r in rows], alpha=0.55, edgecolors="black", linewidths=0.5)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.margins(0.2)
    _place_labels(ax, [r["parameters"] for r in rows], [r["flops"] for r in rows], [r["name"] for r in rows])
    ax.set_xlabel(_t("parameters"))
    ax.set_ylabel(_t("fwd_flops_axis"))
    ax.set_title(_t("bubble"), fontsize=11)
    keys = [k * GIB for k in (0.05, 0.5, 4) if k * GIB <= 1.5 * biggest]
    handles = [ax.scatter([], [], s=area(k), color=PALETTE.faint, alpha=0.5, edgecolors="black",
                          label=f"{k / GIB:g} GiB") for k in keys]
    size_key = ax.legend(handles=handles, title=_t("bubble_key"), fontsize=8, title_fontsize=8, loc="lower right",
                         labelspacing=1.6, borderpad=1.0, framealpha=0.9)
    ax.add_artist(size_key)
    _kind_legend(ax, [r["kind"] for r in rows], loc="upper left")


def _plot_latency_vs_flops(ax, rows, peak):
    """Measured latency against FLOPs, with the time the measured peak would take; a batch that was
    not measured is a grey × at its FLOPs on the axis's floor, not a missing point."""
    flops = np.array([r["flops"] for r in rows], dtype=float)
    big = LATENCY_BATCHES[-1]
    for batch, key, marker in ((1, "latency_1", "o"), (big, "latency_big", "s")):
        pts = [(r["flops"], r[key] / batch * 1e3, r) for r in rows if r[key]]
        ax.scatter([p[0] for p in pts], [p[1] for p in pts], marker=marker, s=45,
                   facecolors=[_kind_color(p[2]["kind"]) for p in pts] if batch == 1 else "none",
                   edgecolors=[_kind_color(p[2]["kind"]) for p in pts], zorder=3, label=_t("batch_n", n=batch))
        lo = [y - r["spread"][batch][0] / batch * 1e3 for _, y, r in pts]
        hi = [r["spread"][batch][1] / batch * 1e3 - y for _, y, r in pts]
        ax.errorbar([p[0] for p in pts], [p[1] for p in pts], yerr=[lo, hi], fmt="none", ecolor=PALETTE.dark,
                    capsize=2, lw=0.8, zorder=2)
        missing = [r for r in rows if not r[key]]
        if missing:
            ax.scatter([r["flops"] for r in missing], [0.04] * len(missing), marker="x", s=40, color=PALETTE.muted,
                       transform=ax.get_xaxis_transform(), zorder=3, clip_on=False,
                       label=_t("not_measured_at", n=batch))
    ones = [(r["flops"], r["latency_1"] * 1e3, r["name"]) for r in rows if r["latency_1"]]
    line = np.array([flops.min() / 2, flops.max() * 2])
    ax.plot(line, line / peak["flops_per_s"] * 1e3, "k--", lw=1,
            label=_t("peak_line", peak=readable(peak["flops_per_s"], "FLOP/s")))
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel(_t("fwd_flops_axis"))
    ax.set_ylabel(_t("per_sample_ms"))
    ax.set_title(_t("relation"), fontsize=11)
    ax.legend(fontsize=8, loc="upper left")
    _place_labels(ax, [p[0] for p in ones], [p[1] for p in ones], [p[2] for p in ones])


def _plot_efficiency_ranking(ax, rows):
    """Utilisation of the measured peak at batch 1 per model, ranked (one batch for every row,
    never above 100 %); a model without a batch-1 time says so."""
    ranked = sorted(rows, key=lambda r: r["util_1"] or 0.0, reverse=True)  # None last
    _barh(ax, [r["name"] for r in ranked], [r["util_1"] or 0.0 for r in ranked],
          [_kind_color(r["kind"]) for r in ranked], fmt=lambda v: f"{v:.1%}" if v else "")
    for i, r in enumerate(ranked):
        if r["util_1"] is None:
            invalid = r["latency_1"] is not None
            ax.text(0.01, i, _t("mfu_invalid") if invalid else _t("not_measured_long"), va="center", fontsize=8,
                    color=PALETTE.warning if invalid else PALETTE.muted, transform=ax.get_yaxis_transform())
    from matplotlib.ticker import PercentFormatter
    ax.set_xlim(0, min(1.0, 1.3 * max([r["util_1"] or 0.0 for r in rows] + [0.01])))  # never beyond 100 %
    ax.xaxis.set_major_formatter(PercentFormatter(1.0))
    ax.set_title(_t("ranking"), fontsize=11)
    _kind_legend(ax, [r["kind"] for r in rows])


def _plot_batching_gain(ax, rows):
    """Per-sample speed at the largest latency batch against batch 1, bars from 1× on a log axis
    (a batch that slows a model down is drawn down); a batch not measured says why."""
    big = LATENCY_BATCHES[-1]
    y = np.arange(len(rows))
    gains = [r["latency_1"] / (r["latency_big"] / big) if r["latency_1"] and r["latency_big"] else None
             for r in rows]
    _ratio_bars(ax, y, gains, [_kind_color(r["kind"]) for r in rows], horizontal=True)
    _ratio_axis(ax, [g for g in gains if g], axis="x", floor=3, room=2.5)
    for yi, gain, r in zip(y, gains, rows):
        if gain:
            ax.annotate(f"{gain:.2f}×", (gain, yi), xytext=(3 if gain >= 1 else -3, 0), textcoords="offset points",
                        va="center", ha="left" if gain >= 1 else "right", fontsize=8)
        else:
            why = r["skipped"].get(big) or r["skipped"].get(1) or ""
            short = _t("not_measured_long") + (" " + _t("skip_budget").split("：")[-1] if "budget" in why else "")
            ax.annotate(short, (1, yi), xytext=(4, 0), textcoords="offset points", va="center", fontsize=8,
                        color=PALETTE.muted)
    ax.set_yticks(y, [r["name"] for r in rows], fontsize=9)
    ax.invert_yaxis()
    ax.set_xlabel(_t("batching_axis", n=big))
    ax.set_title(_t("batching", n=big), fontsize=11)


def _plot_training_memory_bars(ax, rows, train_batch):
    """Estimated training peak per model at the scenario's batch, against an 8 GiB card."""
    fits = [r["memory"] <= Scenarios.TRAINING_GPU_BYTES for r in rows]
    _barh(ax, [r["name"] for r in rows], [r["memory"] / GIB for r in rows],
          [_kind_color(r["kind"]) if ok else PALETTE.rule for r, ok in zip(rows, fits)], log=True,
          fmt=lambda v: f"{v:.2f} GiB" if v >= 0.1 else f"{v * 1024:.0f} MiB")
    ax.axvline(Scenarios.TRAINING_GPU_BYTES / GIB, color="k", ls="--", lw=1, label=_t("gpu_8gb"))
    ax.set_xlabel(_t("gib"))
    ax.set_title(_t("train_mem_bars", tb=train_batch), fontsize=11)
    ax.legend(fontsize=8, loc="lower right")


def _recommendation_cell(verdict, footnotes):
    """A matrix cell's words: the measured value and its margin, or "not measured" with a footnote
    number whose reason goes under the matrix."""
    if verdict["verdict"] == "not_measured":
        why = _localized_reason(verdict["why"])
        number = footnotes.setdefault(why, len(footnotes) + 1)
        return f"{_t('not_measured')} ({number})"
    value, unit = verdict["value"], verdict["unit"]
    text = {"s": lambda v: f"{v * 1e3:.1f} ms", "parameters": lambda v: _t("params_v", v=readable(v)),
            "samples/s": lambda v: _t("samples_s", v=v), "bytes": lambda v: f"{v / GIB:.2f} GiB"}[unit](value)
    margin = verdict["margin"]
    key = "margin_pass" if verdict["verdict"] == "pass" else "margin_fail"
    shown = margin if margin >= 1 else 1 / margin
    return _t(key, value=text, m=f"{shown:.2f}" if shown < 2 else f"{shown:.1f}" if shown < 10 else f"{shown:.0f}")


def _plot_recommendations(ax, data):
    """Pass or fail per model and scenario with the measured value and its margin (seaborn's
    annotated heatmap, coloured by the margin on a log scale centred on the limit); a cell not
    measured is grey and hatched, numbered, its reason written under the matrix."""
    import seaborn as sns
    names = list(data["models"])
    verdicts = data["verdicts"]
    footnotes = {}
    cells = [[verdicts[s][n] for s in Scenarios.NAMES] for n in names]
    margins = np.array([[math.log10(c["margin"]) if c["verdict"] != "not_measured" and c.get("margin") else np.nan
                         for c in row] for row in cells])
    text = np.array([[_recommendation_cell(c, footnotes) for c in row] for row in cells])
    sns.heatmap(margins, ax=ax, cmap="RdYlGn", center=0, vmin=-2, vmax=2, annot=text, fmt="",
                annot_kws={"fontsize": 8}, linewidths=0.5, linecolor="white",
                cbar_kws={"label": _t("margin_axis"), "ticks": [-2, -1, 0, 1, 2], "format": "%g"})
    ax.collections[0].colorbar.set_ticklabels(["1/100×", "1/10×", "1×", "10×", "100×"])
    import matplotlib.patches as mpatches
    for i, row in enumerate(cells):
        for j, cell in enumerate(row):
            if cell["verdict"] == "not_measured":  # seaborn leaves a NaN cell empty: grey, hatched, numbered
                ax.add_patch(mpatches.Rectangle((j, i), 1, 1, facecolor=PALETTE.pale, hatch="///",
                                                edgecolor=PALETTE.rule, lw=0, zorder=0.5))
                ax.text(j + 0.5, i + 0.5, text[i, j], ha="center", va="center", fontsize=8, color=PALETTE.dark,
                        bbox={"facecolor": PALETTE.pale, "edgecolor": "none", "pad": 1})
    ax.set_xticks(np.arange(len(Scenarios.NAMES)) + 0.5, [_t(f"sc_{s}") for s in Scenarios.NAMES], fontsize=9,
                  rotation=0)
    ax.set_yticks(np.arange(len(names)) + 0.5, names, fontsize=9, rotation=0)
    ax.set_title(_t("recommend"), fontsize=11)
    notes = [f"({n}) {_wrap(why, 70)}" for why, n in footnotes.items()]
    rule = _t("rule", edge_params=readable(Scenarios.EDGE_MAX_PARAMETERS), edge_ms=Scenarios.EDGE_MAX_LATENCY_S * 1e3,
              serve=Scenarios.SERVING_MIN_SAMPLES_PER_S, big=LATENCY_BATCHES[-1])
    ax.set_xlabel("\n".join([rule] + notes), fontsize=8, loc="left")


def plot_dashboard(data):
    """Six panels from `run_dashboard_analysis` data; returns the Figure."""
    import matplotlib.pyplot as plt
    rows = _dash_rows(data)
    with _figure_style():
        fig = plt.figure(figsize=(20, 12.5), layout="constrained")
        axs = fig.subplot_mosaic([["bubble", "relation", "ranking"], ["batching", "memory", "recommend"]])
        # first: seaborn's heatmap draws the whole figure once to place its labels, cheap while the rest is empty
        _plot_recommendations(axs["recommend"], data)
        _plot_bubbles(axs["bubble"], rows)
        _plot_latency_vs_flops(axs["relation"], rows, data["peak_flops"])
        _plot_efficiency_ranking(axs["ranking"], rows)
        _plot_batching_gain(axs["batching"], rows)
        _plot_training_memory_bars(axs["memory"], rows, data["train_memory_batch"])
        gpt = inspect.signature(TinyGPT).parameters
        sub = _t("dash_sub", device=data["device"], batches="/".join(map(str, data["latency_batches"])),
                 tb=data["train_memory_batch"])
        if "TinyGPT" in data["models"]:
            sub += "\n" + _t("dash_tinygpt", layers=gpt["n_layer"].default, hidden=gpt["n_embd"].default,
                             seq=MODEL_ZOO["TinyGPT"][2](1).shape[1])
        _suptitle(fig, _t("dash_title"), sub, data.get("conditions"))
    return fig


def create_comprehensive_dashboard(output_dir=DEFAULT_OUTPUT_DIR, *, data=None, dpi=DPI, **options):
    """Draw 综合性能仪表板.png into `output_dir` (None: don't save); `options` (profile, device,
    flop_records, peak_flops: earlier stages' data, reused) go to run_dashboard_analysis."""
    return _save_into(plot_dashboard(data or run_dashboard_analysis(**options)), output_dir, "dashboard", dpi)


# --- the roofline figure ---------------------------------------------------------------------
CLASS_COLORS = {"linear/matmul": PALETTE.blue, "conv": PALETTE.green, "attention": PALETTE.red, "RNN": PALETTE.purple,
                "elementwise/other": PALETTE.orange, "copies": PALETTE.brown, "optimizer": PALETTE.cyan}
MODEL_MARKERS = ("o", "s", "^", "D", "v", "P")


def _rate(v, unit):
    return readable(v, unit).replace(" ", "\u2009")


def _plot_roofs(ax, data):
    """The two measured roofs (log-log), the ridge marked, each model's op classes as points."""
    peak, bw = data["peak_flops"]["fp32"]["flops_per_s"], data["bandwidth"]["bytes_per_s"]
    ridge = peak / bw
    points = [(name, c, v) for name, m in data["models"].items() for c, v in m["classes"].items()
              if v["flops"] and v["measured_s"]]
    lo = min([v["intensity"] for _, _, v in points] + [ridge]) / 4
    hi = max([v["intensity"] for _, _, v in points] + [ridge]) * 4
    x = np.geomspace(lo, hi, 200)
    ax.plot(x, np.minimum(peak, bw * x), color=PALETTE.ink, lw=2)
    ax.axvline(ridge, color=PALETTE.faint, ls=":", lw=1)
    ax.annotate(_t("roof_ridge", v=ridge), (ridge, peak), xytext=(4, -14), textcoords="offset points", fontsize=8)
    ax.annotate(_t("roof_compute", v=_rate(peak, "FLOP/s")), (hi, peak), xytext=(-4, 4), textcoords="offset points",
                ha="right", fontsize=8)
    ax.annotate(_t("roof_memory", v=_rate(bw, "B/s")), (lo * 1.5, bw * lo * 1.5), xytext=(2, 6),
                textcoords="offset points", fontsize=8, rotation=30, rotation_mode="anchor")
    markers = dict(zip(data["models"], MODEL_MARKERS))
    for name, c, v in points:
        ax.scatter(v["intensity"], v["achieved_flops_per_s"], marker=markers[name], s=60, color=CLASS_COLORS[c],
                   edgecolor="black", linewidth=0.5, zorder=3)
    ax.set(xscale="log", yscale="log", xlabel=_t("roof_x"), ylabel=_t("roof_y"))
    ax.set_ylim(min([v["achieved_flops_per_s"] for _, _, v in points] + [bw * lo]) / 3, peak * 4)
    ax.set_title(_t("roof_panel"), fontsize=11)
    from matplotlib.lines import Line2D
    handles = [Line2D([], [], ls="", marker=markers[n], color="grey", label=n) for n in data["models"]]
    handles += [Line2D([], [], ls="", marker="o", color=CLASS_COLORS[c], label=_t(f"class_{c}"))
                for c in _CountingMode.OP_CLASSES if any(pc == c for _, pc, _ in points)]
    ax.legend(handles=handles, fontsize=8, loc="lower right", ncol=2)
    note = _t("roof_nopoint") + ("\n" + _t("roof_in_cache") if data.get("above_bandwidth") else "")
    ax.text(0.01, 0.99, note, transform=ax.transAxes, fontsize=8, va="top", color=PALETTE.note)


def _share_model(data):
    """The model whose shares the figure shows: a transformer where there is one."""
    return next((n for n in data["models"] if "GPT" in n), next(iter(data["models"])))


def _plot_shares(ax, data):
    """Share of FLOPs against share of measured time per op class, for one model's training step."""
    name = _share_model(data)
    classes = data["models"][name]["classes"]
    flops = sum(v["flops"] for v in classes.values()) or 1
    seconds = sum(v["measured_s"] for v in classes.values()) or 1
    names = list(classes)
    y, h = np.arange(len(names)), 0.38
    f = [classes[c]["flops"] / flops for c in names]
    t = [classes[c]["measured_s"] / seconds for c in names]
    ax.barh(y - h / 2, f, h, color=[CLASS_COLORS[c] for c in names], alpha=0.45, label=_t("roof_share_flops"),
            hatch="//", edgecolor="white")
    ax.barh(y + h / 2, t, h, color=[CLASS_COLORS[c] for c in names], label=_t("roof_share_time"))
    for yi, fv, tv, c in zip(y, f, t, names):
        ax.annotate(f"{fv:.1%}", (fv, yi - h / 2), xytext=(3, 0), textcoords="offset points", va="center", fontsize=8)
        ax.annotate(f"{tv:.1%}  {_why_words(classes[c], data['ridge_flops_per_byte'])}", (tv, yi + h / 2),
                    xytext=(3, 0), textcoords="offset points", va="center", fontsize=8)
    ax.set_yticks(y, [_t(f"class_{c}") for c in names])
    ax.invert_yaxis()
    ax.set_xlim(0, 1.9)
    from matplotlib.ticker import PercentFormatter
    ax.xaxis.set_major_formatter(PercentFormatter(1.0, decimals=0))
    ax.set_xticks([0, 0.25, 0.5, 0.75, 1.0])
    ax.legend(fontsize=8, loc="lower right")
    ax.set_title(_t("roof_share", model=name), fontsize=11)


def _plot_step_prediction(ax, data):
    """Per model: the roofline's step time, the per-call overhead, the rest of the measured time."""
    names = list(data["models"])
    y, h = np.arange(len(names)), 0.38
    ms = {n: data["models"][n] for n in names}
    pred = np.array([ms[n]["predicted_step_s"] for n in names]) * 1e3
    disp = np.array([ms[n]["predicted_with_dispatch_s"] - ms[n]["predicted_step_s"] for n in names]) * 1e3
    faults = np.array([ms[n].get("page_fault_s") or 0.0 for n in names]) * 1e3
    meas = np.array([ms[n]["measured_step_s"] for n in names]) * 1e3
    rest = np.maximum(meas - pred - disp - faults, 0)
    ax.barh(y - h / 2, pred, h, color=PALETTE.blue, label=_t("roof_pred"))
    ax.barh(y - h / 2, disp, h, left=pred, color=PALETTE.olive,
            label=_t("roof_dispatch", us=data["dispatch"]["s_per_call"] * 1e6))
    cost = (data.get("page_faults") or {}).get("s_per_fault")
    label = (_t("roof_faults_none") if not cost else _t("roof_faults", us=cost * 1e6) if faults.any() else
             _t("roof_faults_zero", us=cost * 1e6))
    ax.barh(y - h / 2, faults, h, left=pred + disp, color=PALETTE.purple, label=label)
    ax.barh(y - h / 2, rest, h, left=pred + disp + faults, color=PALETTE.unmeasured, hatch="xx",
            edgecolor=PALETTE.faint, label=_t("roof_overhead"))
    err = [[(ms[n]["measured"]["median_s"] - ms[n]["measured"]["spread_lo_s"]) * 1e3 for n in names],
           [(ms[n]["measured"]["spread_hi_s"] - ms[n]["measured"]["median_s"]) * 1e3 for n in names]]
    ax.barh(y + h / 2, meas, h, color=PALETTE.dark, xerr=err, capsize=3, label=_t("roof_measured"))
    for yi, p, m, hi in zip(y, pred, meas, err[1]):
        ax.annotate(f"{m:.1f} ms ({_t('roof_pred_share', v=p / m)})", (m + hi, yi + h / 2), xytext=(6, 0),
                    textcoords="offset points",
                    va="center", fontsize=8)
    ax.set_yticks(y, [f"{n} (b={ms[n]['batch']})" for n in names])
    ax.invert_yaxis()
    ax.set_xlim(0, meas.max() * 1.6)
    ax.set_xlabel(_t("roof_time_ms"))
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.12), ncol=2)  # below: never over a bar
    ax.set_title(_t("roof_step"), fontsize=11)


def _plot_low_precision(ax, data):
    """One model's measured time per op class in fp32 and in low precision, each with its bound."""
    low = data.get("low_precision") or {}
    if low.get("skipped") or not low:
        ax.set_title(_t("roof_low", model=next(iter(data["models"])), precision=_t("roof_low_none")), fontsize=11)
        _not_measured(ax, low.get("skipped"))
        return
    fp32 = data["models"][low["model"]]["classes"]
    names = [c for c in _CountingMode.OP_CLASSES if c in fp32 or c in low["classes"]]
    y, h = np.arange(len(names)), 0.38
    a = [fp32.get(c, {}).get("measured_s", 0) * 1e3 for c in names]
    b = [low["classes"].get(c, {}).get("measured_s", 0) * 1e3 for c in names]
    ax.barh(y - h / 2, a, h, color=DTYPE_COLORS["fp32"], label="fp32")
    ax.barh(y + h / 2, b, h, color=DTYPE_COLORS["bf16"], label=low["precision"])
    for yi, va, vb, c in zip(y, a, b, names):
        why = _t("bound_" + low["classes"].get(c, {}).get("bound", "none"))
        ax.annotate(f"{va:.2f} ms", (va, yi - h / 2), xytext=(3, 0), textcoords="offset points", va="center",
                    fontsize=8)
        ratio = (_t("faster", x=va / vb) if va >= vb else _t("slower", x=vb / va)) if va and vb else None
        ax.annotate(f"{vb:.2f} ms ({', '.join(filter(None, (ratio, why)))})" if vb else "", (vb, yi + h / 2),
                    xytext=(3, 0),
                    textcoords="offset points", va="center", fontsize=8)
    ax.set_yticks(y, [_t(f"class_{c}") for c in names])
    ax.invert_yaxis()
    ax.set_xlim(0, max(a + b) * 1.7)
    ax.set_xlabel(_t("roof_low_x"))
    ax.legend(fontsize=8, loc="lower right")
    ax.set_title(_t("roof_low", model=low["model"], precision=low["precision"]), fontsize=11)


def plot_roofline(data):
    """Four panels from `run_roofline_analysis` data; returns the Figure."""
    import matplotlib.pyplot as plt
    bw, peak = data["bandwidth"], data["peak_flops"]["fp32"]
    with _figure_style():
        fig = plt.figure(figsize=(20, 12), layout="constrained")
        axs = fig.subplot_mosaic([["roof", "share"], ["step", "low"]])
        _plot_roofs(axs["roof"], data)
        _plot_shares(axs["share"], data)
        _plot_step_prediction(axs["step"], data)
        _plot_low_precision(axs["low"], data)
        load = ((data.get("conditions") or {}).get("load_end") or {}).get("load_avg_1m")
        _suptitle(fig, _t("roof_title"), _wrap(_t(
            "roof_sub", device=data["device"], load="?" if load is None else f"{load:.1f}",
            peak=_rate(peak["flops_per_s"], "FLOP/s"),
            peak_method=_t("roof_peak_method", runs=peak.get("repeats", "?"), n=peak.get("matmul_size", "?")),
            bw=_rate(bw["bytes_per_s"], "B/s"), kernel=bw["kernel"],
            bw_med=_rate(bw["median_bytes_per_s"], "B/s"), bw_lo=_rate(bw["spread_lo"], "B/s"),
            bw_hi=_rate(bw["spread_hi"], "B/s")), 150), data.get("conditions"))
    return fig


def _why_words(row, ridge):
    """A class's bound in the figure's language: 'memory-bound: 0.25 FLOP/byte (ridge 5)'."""
    if row.get("intensity") is None:
        return _t("bound_none")
    return _t("why_bound", bound=_t("bound_" + row["bound"]), intensity=row["intensity"], ridge=ridge)


def visualize_roofline(output_dir=DEFAULT_OUTPUT_DIR, *, data=None, dpi=DPI, **options):
    """Draw 性能屋顶线.png into `output_dir` (None: don't save); `options` (profile, device,
    peak_flops: the training stage's, reused) go to run_roofline_analysis."""
    return _save_into(plot_roofline(data or run_roofline_analysis(**options)), output_dir, "roofline", dpi)


VERDICT_COLORS = {"agree": PALETTE.agree, "disagree": PALETTE.disagree, "partly": PALETTE.partly,
                  "better": PALETTE.better, "worse": PALETTE.disagree,
                  "uncertain": PALETTE.partly, "info": PALETTE.pale, "not_measured": PALETTE.unmeasured}


# --- 分布式训练内存.png: beyond one device ------------------------------------------------------------

FIGURE_FILES["distributed"] = "分布式训练内存.png"
LABELS.update({
    "dist_title": ("超越单设备：数据并行训练的每卡内存与通信", "Beyond one device: per-rank memory and communication"),
    "dist_sub": ("{model}（{params} 参数），全局 batch={batch}，{n} 个进程（gloo，CPU），Adam，fp32；损失为输出均值；"
                 "实测仅在最小规模（一次启动 {n} 个进程跑三种策略）",
                 "{model} ({params} parameters), global batch {batch}, {n} processes (gloo, CPU), Adam, fp32; "
                 "loss = mean of outputs; measured at the smallest size only (one spawn of {n} ranks, "
                 "three strategies)"),
    "dist_mem": ("每卡内存（峰值时刻的构成）：实测（实心）与估计（斜线）",
                 "Per-rank memory at the peak: measured (solid) vs estimate (hatched)"),
    "dist_mem_note": ("黑线：分配器读数（实测，rank 0 两步中较低的一步）；百分比：估计相对实测",
                      "black tick: the allocator's peak (measured, rank 0's lower of two steps); %: estimate vs "
                      "measured"),
    "dist_single": ("单进程", "single process"),
    "own_dist_two": ("2 个进程的每卡内存（每卡 batch {b}，全局 {g}）：实测（实心）与估计（斜线）",
                     "Per-rank memory on 2 ranks (batch {b} a rank, {g} in all): measured (solid), "
                     "estimated (hatched)"),
    "own_dist_sim": ("{n} 个进程的每卡内存（模拟；每卡 batch {b}，全局 {g}）",
                     "Per-rank memory on {n} ranks (simulated; batch {b} a rank, {g} in all)"),
    "own_dist_sim_note": ("fake 张量 + fake 进程组；单进程：一个进程训练一个 rank 的 batch（估计）",
                          "fake tensors, fake process group; single process: one process on one rank's batch "
                          "(estimated)"),
    "dist_large": ("{name}（{params} 参数）每卡内存 vs 卡数",
                   "{name} ({params} parameters): memory per device vs ranks"),
    "dist_large_note": ("点：fsdp 在 fake 张量 + fake 进程组上模拟（rank 0，每卡 1×{tokens} token，fp32 Adam；"
                        "只模拟 3 层与 4 层，其余每层加上两者之差）；"
                        "线：ZeRO 论文公式（16 字节/参数，不含激活）",
                        "dots: fsdp simulated on fake tensors + fake process group (rank 0, 1×{tokens} tokens a rank, "
                        "fp32 Adam; 3 and 4 layers simulated, each further layer adds their difference); "
                        "lines: ZeRO paper formula (16 bytes/param, no activations)"),
    "dist_simulated": ("fsdp 模拟（{name}）", "fsdp simulated ({name})"),
    "dist_not_simulated": ("未模拟：--quick 只画 ZeRO 公式（模拟约 1 秒）",
                           "not simulated: --quick draws the ZeRO formula only (~1 s to simulate)"),
    "dist_device": ("{gb:.0f} GB 设备", "{gb:.0f} GB device"),
    "dist_ranks": ("卡数（rank）", "ranks"),
    "dist_comm": ("每卡每步发送字节：计数 vs 公式", "Bytes sent per rank per step: counted vs formula"),
    "dist_comm_note": ("计数：调度器看到的集合通信 × 环形算法系数；公式：DDP 2(N−1)/N×梯度（Patarasuk & Yuan 2009），"
                       "FSDP (N−1)/N×(2×参数+梯度)（ZeRO §7.2.2）",
                       "counted: collectives seen at the dispatcher × ring factors; formula: DDP 2(N−1)/N × grads "
                       "(Patarasuk & Yuan 2009), FSDP (N−1)/N × (2 × params + grads) (ZeRO §7.2.2)"),
    "dist_counted": ("计数（实测进程）", "counted (measured ranks)"),
    "dist_estimated": ("计数（模拟）", "counted (simulated)"),
    "dist_formula": ("公式", "formula"),
    "dist_parity": ("梯度一致性：与单进程同一全局 batch 的最大绝对差",
                    "Gradient parity: max |difference| from one process on the same global batch"),
    "dist_grad": ("梯度", "gradients"),
    "dist_param": ("一步后的参数", "parameters after one step"),
    "dist_tol": ("容差 {tol:g}", "tolerance {tol:g}"),
    "dist_pass": ("通过", "passes"),
    "dist_fail": ("不通过", "fails"),
    "dist_ranks_peak": ("各 rank 实测峰值（两步不同时写作 低–高：gloo 线程晚放缓冲）：{peaks}",
                        "measured peak per rank (low–high where two steps differ: gloo's thread freed late): "
                        "{peaks}"),
})
LABELS.update({"dist_comm_buffers": ("通信缓冲", "communication buffers"),
               "dist_gathered": ("聚集的完整参数", "all-gathered parameters"),
               "dist_other": ("其他（输入、临时）", "other (inputs, temporaries)")})
DIST_PARTS = (("parameter_bytes", "parameter_bytes_part", PALETTE.blue),
              ("gradient_bytes", "gradient_bytes_part", PALETTE.orange),
              ("optimizer_bytes", "optimizer_bytes_part", PALETTE.green),
              ("activation_bytes", "activation_bytes_part", PALETTE.red),
              ("gathered_parameter_bytes", "dist_gathered", PALETTE.cyan),
              ("communication_bytes", "dist_comm_buffers", PALETTE.purple), (None, "dist_other", PALETTE.faint))


def _dist_parts(result):
    """MiB of each part at the peak (DIST_PARTS order; 'other' is the rest of the tracked peak)."""
    at = result["at_peak"]
    named = [at.get(key, 0) for key, _, _ in DIST_PARTS[:-1]]
    return [v / MIB for v in named] + [max(sum(at.values()) - sum(named), 0) / MIB]


def _plot_dist_memory(ax, data):
    names = ["single", *DISTRIBUTED_STRATEGIES]
    measured = data.get("measured") or {}
    rows = {"single": (data["single"]["measured"], data["single"]["estimate"])}
    rows.update({s: ((measured[s]["ranks"][0] if s in measured else None), data["estimated"][s])
                 for s in DISTRIBUTED_STRATEGIES})
    labelled = set()
    for i, name in enumerate(names):
        meas, est = rows[name]
        for offset, result, hatch in ((-0.2, meas, None), (0.2, est, "//")):
            if result is None:
                continue
            bottom = 0.0
            for value, (_, key, color) in zip(_dist_parts(result), DIST_PARTS):
                ax.bar(i + offset, value, 0.38, bottom=bottom, color=color, hatch=hatch, edgecolor="white",
                       label=None if key in labelled else _t(key))
                labelled.add(key)
                bottom += value
        if meas is not None:
            own = min(meas.get("step_peaks") or [meas["total"]])  # the program's own peak (measure_distributed)
            ax.plot([i - 0.39, i - 0.01], [own / MIB] * 2, color="k", lw=2)
            error = round(100 * (est["total"] - own) / own, 1) + 0.0  # + 0.0: no "-0.0"
            ax.annotate(f"{error:+.1f}%", (i + 0.2, est["total"] / MIB), xytext=(0, 3), textcoords="offset points",
                        ha="center", fontsize=8)
    ax.set_xticks(range(len(names)), [_t("dist_single"), *DISTRIBUTED_STRATEGIES])
    ax.set_ylabel("MiB")
    ax.set_title(_t("dist_mem"))
    note = _t("dist_mem_note")
    if data.get("measured_skipped"):
        note += "\n" + _t("not_measured_long") + ": " + _wrap(data["measured_skipped"], 70)
    elif measured:
        peaks = ", ".join(f"{s} " + "/".join("–".join(dict.fromkeys(f"{v / MIB:.2f}" for v in sorted(
            r.get("step_peaks") or [r["total"]]))) for r in measured[s]["ranks"])
                          for s in DISTRIBUTED_STRATEGIES)
        note += "\n" + _t("dist_ranks_peak", peaks=peaks + " MiB")
    ax.set_xlabel(note, fontsize=8)
    ax.margins(y=0.12)
    ax.legend(fontsize=8, loc="upper right", ncol=2)


def _plot_dist_large(ax, large):
    worlds = large["worlds"]
    styles = {"DDP": (PALETTE.muted, ":"), "ZeRO-2": (PALETTE.orange, "--"), "ZeRO-3": (PALETTE.red, "-")}
    for stage_name, (color, ls) in styles.items():
        ax.plot(worlds, [v / GIB for v in large["zero"][stage_name]], color=color, ls=ls, lw=1.6,
                label=f"{stage_name} ({large['name']})")
    ax.plot(worlds, [v / GIB for v in large["zero_7b"]], color=PALETTE.cyan, ls="-", lw=1.2, label="ZeRO-3 (Llama-7B)")
    sims = [s["total"] / GIB for s in large["simulated"]]
    ax.plot(large["simulated_worlds"], sims, "o", color=PALETTE.blue, ms=8,
            label=_t("dist_simulated", name=large["name"]) if sims else _t("dist_not_simulated"))
    for n, v in zip(large["simulated_worlds"], sims):
        ax.annotate(f"{v:.1f} GiB", (n, v), xytext=(6, 4), textcoords="offset points", fontsize=8)
    ax.axhline(large["device_memory_bytes"] / GIB, color="k", ls="--", lw=1,
               label=_t("dist_device", gb=large["device_memory_bytes"] / 1e9))
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel(_t("dist_ranks") + "\n" + _wrap(_t("dist_large_note", tokens=large["tokens"]), 95), fontsize=8)
    ax.set_ylabel(_t("gib"))
    ax.set_title(_t("dist_large", name=large["name"], params=readable(large["parameters"])))
    ax.legend(fontsize=8, loc="lower left")


def _plot_dist_comm(ax, data):
    measured = data.get("measured") or {}
    x = np.arange(len(DISTRIBUTED_STRATEGIES))
    series = [(-0.27, _t("dist_counted"), PALETTE.blue,
               [measured[s]["sent_bytes"] / MIB if s in measured else np.nan for s in DISTRIBUTED_STRATEGIES]),
              (0.0, _t("dist_estimated"), PALETTE.cyan, [data["estimated"][s]["sent_bytes"] / MIB
                                                         for s in DISTRIBUTED_STRATEGIES]),
              (0.27, _t("dist_formula"), PALETTE.muted, [data["estimated"][s]["formula_sent_bytes"] / MIB
                                                          for s in DISTRIBUTED_STRATEGIES])]
    for offset, label, color, values in series:
        ax.bar(x + offset, values, 0.26, color=color, label=label)
        for xi, v in zip(x, values):
            if not np.isnan(v):
                ax.annotate(f"{v:.2f}", (xi + offset, v), xytext=(0, 2), textcoords="offset points", ha="center",
                            fontsize=8)
    ax.set_xticks(x, DISTRIBUTED_STRATEGIES)
    ax.set_ylabel("MiB")
    ax.set_title(_t("dist_comm"))
    ax.set_xlabel(_wrap(_t("dist_comm_note"), 95), fontsize=8)
    ax.margins(y=0.15)
    ax.legend(fontsize=8, loc="upper left")


def _plot_dist_parity(ax, data):
    measured = data.get("measured")
    if not measured:
        _not_measured(ax, data.get("measured_skipped"))
        ax.set_title(_t("dist_parity"))
        return
    x = np.arange(len(DISTRIBUTED_STRATEGIES))
    floor = 1e-12  # an exact match drawn at the bottom of the log axis
    parities = [measured[s]["parity"] for s in DISTRIBUTED_STRATEGIES]
    for offset, key, label, color in ((-0.2, "grad_max_abs_diff", "dist_grad", PALETTE.blue),
                                      (0.2, "param_max_abs_diff", "dist_param", PALETTE.green)):
        values = [max(p[key], floor) for p in parities]
        ax.bar(x + offset, values, 0.38, color=color, label=_t(label))
        for xi, v in zip(x, values):
            ax.annotate(f"{v:.1e}", (xi + offset, v), xytext=(0, 2), textcoords="offset points", ha="center",
                        fontsize=8)
    tol = parities[0]["tolerance"]
    ax.axhline(tol, color=PALETTE.warning, ls="--", lw=1, label=_t("dist_tol", tol=tol))
    labels = [f"{s}\n{_t('dist_pass') if p['passes'] else _t('dist_fail')}" + (f"\n{_wrap(p['note'], 30)}"
                                                                                 if p["note"] else "")
              for s, p in zip(DISTRIBUTED_STRATEGIES, parities)]
    ax.set_xticks(x, labels, fontsize=8)
    ax.set_yscale("log")
    ax.set_ylim(floor / 2, max(tol * 100, max(max(p["grad_max_abs_diff"], p["param_max_abs_diff"])
                                                 for p in parities) * 100))
    ax.set_title(_t("dist_parity"))
    ax.legend(fontsize=8, loc="upper left")


def plot_distributed(data):
    """Four panels from `run_distributed_analysis` data; returns the Figure."""
    import matplotlib.pyplot as plt
    with _figure_style():
        fig, axs = plt.subplots(2, 2, figsize=(17, 12), layout="constrained")
        _plot_dist_memory(axs[0, 0], data)
        _plot_dist_large(axs[0, 1], data["large"])
        _plot_dist_comm(axs[1, 0], data)
        _plot_dist_parity(axs[1, 1], data)
        _suptitle(fig, _t("dist_title"), _t("dist_sub", model=data["model"], params=readable(data["parameters"]),
                                            batch=data["batch"], n=data["world_size"]))  # bytes only: no busy note
    return fig


def visualize_distributed(output_dir=DEFAULT_OUTPUT_DIR, *, data=None, dpi=DPI, **options):
    """Measure and simulate data-parallel training, and draw 分布式训练内存.png into `output_dir`
    (None: don't save); `options` (profile, device, ...) go to run_distributed_analysis."""
    return _save_into(plot_distributed(data or run_distributed_analysis(**options)), output_dir, "distributed", dpi)


def _plot_lecture_memory(ax, rows):
    """Per TinyGPT size: the lecture's four terms stacked beside the measured parts, with the
    formula total's error against the measured (allocator) peak."""
    x = np.arange(len(rows))
    width = 0.36
    parts = {"lecture": LECTURE_MEMORY_PARTS, "at_peak": LECTURE_MEMORY_PARTS + ("temporary_bytes", "input_bytes")}
    for offset, key, hatch in ((-width / 2, "lecture", "//"), (width / 2, "at_peak", None)):
        bottom = np.zeros(len(rows))
        for part in parts[key]:
            values = np.array([r[key].get(part, 0) / MIB for r in rows])
            ax.bar(x + offset, values, width, bottom=bottom, color=MEMORY_COLORS.get(part, PALETTE.brown), hatch=hatch,
                   edgecolor="white", label=_t(part + "_part") if key == "at_peak" and part != "input_bytes" else None)
            bottom += values
    ax.scatter(x + width / 2, [r["measured_total"] / MIB for r in rows], marker="_", s=400, color="k", zorder=3,
               label=_t("measured_peak"))
    for xi, r in zip(x, rows):
        top = max(r["lecture_total"], r["measured_total"]) / MIB
        ax.annotate(_t("lec_total_error", err=r["error"]), (xi, top), xytext=(0, 4), textcoords="offset points",
                    ha="center", fontsize=8, color=PALETTE.warning)
    ax.set_xticks(x, [f"L={r['layers']} H={r['hidden']}\n{_t('lec_formula')} | {_t('lec_measured')}" for r in rows],
                  fontsize=8)
    ax.set_ylabel("MiB")
    ax.set_title(_t("lec_memory", batch=rows[0]["batch"], seq=rows[0]["seq"]), fontsize=10)
    from matplotlib.patches import Patch
    handles, _ = ax.get_legend_handles_labels()
    hatch_key = [Patch(facecolor="white", edgecolor=PALETTE.dark, hatch="//", label=_t("lec_hatch")),
                 Patch(facecolor=PALETTE.dark, label=_t("lec_solid"))]
    ax.legend(handles=handles + hatch_key, fontsize=8, loc="upper left")
    ax.text(0.98, 0.97, _t("lec_act_note"), transform=ax.transAxes, ha="right", va="top", fontsize=8,
            color=PALETTE.note)
    ax.margins(y=0.25)


def _plot_kv_cache(ax, kv):
    """Held bytes after each generated token and the peak within it, against the lecture's formula."""
    tokens = kv["tokens"]
    ax.plot(tokens, np.array(kv["formula_bytes"]) / MIB, "--", color="k", lw=1.5, label=_t("kv_formula"))
    ax.plot(tokens, np.array(kv["held_bytes"]) / MIB, color=PALETTE.blue, lw=2, label=_t("kv_held"))
    if kv.get("step_peak_bytes"):
        ax.plot(tokens, np.array(kv["step_peak_bytes"]) / MIB, ":", color=PALETTE.red, lw=1.5, label=_t("kv_peak"))
    top = max(kv["held_bytes"] + kv["formula_bytes"]) / MIB
    ax.annotate(_t("kv_prefill", prompt=kv["prompt"]), (tokens[0], kv["held_bytes"][0] / MIB),
                xytext=(tokens[0] + 0.25 * (tokens[-1] - tokens[0]), 0.12 * top), fontsize=8, color=PALETTE.note,
                arrowprops={"arrowstyle": "->", "color": PALETTE.note})
    ax.set_xlabel(_t("tokens"))
    ax.set_ylabel("MiB")
    ax.set_title(_t("lec_kv", layers=kv["layers"], hidden=kv["hidden"], batch=kv["batch"]), fontsize=10)
    ax.legend(fontsize=8, loc="upper left")
    ax.set_ylim(bottom=0)


def _plot_flop_formulas(ax, rows):
    """Each lecture FLOP formula's error against FLOPCalculator's count; the corrected expression's
    error beside it where the lecture's is off."""
    names = [_t("flop_" + r["name"]) for r in rows]
    y = np.arange(len(rows))
    errors = np.array([100 * r["error"] for r in rows])
    ax.barh(y, errors, 0.5, color=[PALETTE.green if abs(e) < 1 else PALETTE.red for e in errors])
    exact = [yi for yi, e in zip(y, errors) if abs(e) < 1]  # a 0 % bar has no width: a mark shows it
    ax.scatter([0] * len(exact), exact, marker="o", s=60, color=PALETTE.green, zorder=3, label=_t("lec_flop_exact"))
    from matplotlib.patches import Patch
    key = [Patch(facecolor=PALETTE.red, label=_t("lec_flop_error"))]  # the off bars' own colour
    fixed = [(yi, 100 * r["correct_error"]) for yi, r in zip(y, rows) if r.get("correct_error") is not None]
    if fixed:
        ax.scatter([e for _, e in fixed], [yi for yi, _ in fixed], marker="D", color=PALETTE.blue, zorder=3,
                   label=_t("lec_flop_fixed"))
    for yi, e, r in zip(y, errors, rows):
        ax.annotate(f"{e:+.1f}%\n{readable(r['lecture'])} / {readable(r['counted'])}", (e, yi),
                    xytext=(4 if e >= 0 else -4, 0), textcoords="offset points", va="center",
                    ha="left" if e >= 0 else "right", fontsize=8)
    ax.axvline(0, color="k", lw=0.8)
    ax.set_yticks(y, names, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlim(min(errors.min(), 0) * 1.9 - 5, max(errors.max(), 0) * 1.9 + 45)  # room for the labels
    ax.set_xlabel("%")
    ax.set_title(_t("lec_flops"), fontsize=10)
    handles, _ = ax.get_legend_handles_labels()
    ax.legend(handles=handles + key, fontsize=8, loc="lower left")


def _plot_fusion(ax, fusion, compiled=None):
    """Median time (bars: IQR or min-max) of each op written out and as one fused kernel; the
    speed-up and the allocator peaks written under each pair; torch.compile's step when run."""
    cases = fusion["cases"]
    groups = list(cases)
    x = np.arange(len(groups))
    for offset, key, color in ((-0.2, "composed", PALETTE.orange), (0.2, "fused", PALETTE.blue)):
        med = np.array([cases[g][key]["median_s"] * 1e3 for g in groups])
        lo = med - np.array([cases[g][key]["spread_lo_s"] * 1e3 for g in groups])
        hi = np.array([cases[g][key]["spread_hi_s"] * 1e3 for g in groups]) - med
        ax.bar(x + offset, med, 0.4, yerr=[lo, hi], capsize=3, color=color, label=_t(key))
    labels = []
    for g in groups:
        c = cases[g]
        peaks = c["composed"]["peak_bytes"], c["fused"]["peak_bytes"]
        speed = _speed_words(c["speedup"])
        labels.append(f"{g}\n" + (_t("fusion_note", speed=speed, a=f"{peaks[0] / MIB:.0f} MiB",
                                     b=f"{peaks[1] / MIB:.0f} MiB")
                                  if None not in peaks else speed))
    ax.set_xticks(x, labels, fontsize=8)
    ax.set_ylabel(_t("ms"))
    title = _t("lec_fusion", shape="×".join(map(str, fusion["shape"])))
    if compiled:
        note = (_t("compile_skipped", why=compiled["skipped"]) if compiled.get("skipped") else
                _t("compile_note", c=compiled["compile_s"], speed=_speed_words(compiled["speedup"]),
                   depth=compiled["depth"], width=compiled["width"], batch=compiled["batch"],
                   e=compiled["eager"]["median_s"] * 1e3, k=compiled["compiled"]["median_s"] * 1e3))
        ax.text(0.02, 0.97, note if not compiled.get("skipped") else _wrap(note, 60), transform=ax.transAxes,
                va="top", fontsize=8, color=PALETTE.note)
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8, loc="upper right")
    ax.margins(y=0.2)


def _claim_text(row, case=None):
    """This machine's value in a table cell, in words: a saving or a speed-up (a slowdown as such);
    with `case`, that case's value alone."""
    value = row["measured"] if case is None else case["measured"]
    if value is None:
        return _t("verdict_not_measured")
    values = value if isinstance(value, dict) else {"": value}
    words = []
    for name, v in values.items():
        if row["aspect"] == "speed":
            text = _speed_words(v)
        else:
            text = _t("saved", p=v) if v >= 0 else _t("more_memory", p=-v)
        words.append(f"{name} {text}".strip())
    return "；".join(words) if _lang() == "zh" else "; ".join(words)


def _claim_source(row):
    """The table's source cell, short: the stage the value came from, or why there is none."""
    missing = row.get("missing")
    if row["technique"] == "fusion":
        return {None: _t("src_fusion"), "skipped": _t("src_no_fusion")}.get(missing, _t("verdict_not_measured"))
    if missing is not None:
        return _t("src_no_training") if missing == "stage" else _t("src_skipped")
    return _t("src_training") + {"peak": _t("peak_suffix"), "activations": _t("act_suffix")}.get(row.get("basis"), "")


def _claim_cells(rows):
    """The optimisation table's header, its cells (one line per measured case) and each line's
    verdict, in the figure's language: what 讲义对照.png draws and the terminal prints."""
    header = [_t("col_technique"), _t("col_aspect"), _t("col_claim"), _t("col_measured"), _t("col_source"),
              _t("col_verdict")]
    cells, verdicts = [], []
    for r in rows:
        for case in r.get("cases") or [{"name": "", "measured": r["measured"], "verdict": r["verdict"]}]:
            name = {"peak": _t("peak_suffix"), "activations": _t("act_suffix")}.get(case["name"], case["name"])
            source = _claim_source(r) if case["name"] not in ("peak", "activations") else _t("src_training") + name
            measured = _claim_text(r, case)
            if case["name"] and case["name"] not in ("peak", "activations"):
                measured = f"{case['name']}：{measured}" if _lang() == "zh" else f"{case['name']}: {measured}"
            cells.append([_t("tech_" + r["technique"]), _t("aspect_" + r["aspect"]), _t("claim_" + r["claim"]),
                          measured, source, _t("verdict_" + case["verdict"])])
            verdicts.append(case["verdict"])
    return header, cells, verdicts


def _plot_claims_table(ax, rows):
    """The lecture's optimisation table with this machine's value in every cell, one line per
    measured case, coloured by its verdict (better and worse than claimed told apart)."""
    ax.axis("off")
    header, cells, verdicts = _claim_cells(rows)
    table = ax.table(cellText=cells, colLabels=header, loc="upper center", cellLoc="center",
                     colWidths=[0.13, 0.1, 0.13, 0.26, 0.26, 0.12])
    table.auto_set_font_size(False)
    table.set_fontsize(9)
    table.scale(1, 1.55)
    for (i, j), cell in table.get_celld().items():
        if i == 0:
            cell.set_facecolor(PALETTE.header)
        elif j in (3, 5):
            cell.set_facecolor(VERDICT_COLORS[verdicts[i - 1]])
    notes = [_wrap(_t("mp_weights_note"), 95 if _lang() == "zh" else 170)]
    if "uncertain" in verdicts:
        notes.append(_t("uncertain_note"))
    ax.text(0.0, 0.0, "\n".join(notes), transform=ax.transAxes, fontsize=8, color=PALETTE.note, va="bottom")
    ax.set_title(_t("lec_table"), fontsize=11)


def plot_lecture_claims(data):
    """Five panels from `run_lecture_comparison` data; returns the Figure."""
    import matplotlib.pyplot as plt
    with _figure_style():
        fig = plt.figure(figsize=(20, 12), layout="constrained")
        grid = fig.add_gridspec(2, 3)
        _plot_lecture_memory(fig.add_subplot(grid[0, 0]), data["memory"])
        _plot_kv_cache(fig.add_subplot(grid[0, 1]), data["kv_cache"])
        _plot_flop_formulas(fig.add_subplot(grid[0, 2]), data["flops"])
        _plot_fusion(fig.add_subplot(grid[1, 0]), data["fusion"], data.get("compile"))
        _plot_claims_table(fig.add_subplot(grid[1, 1:]), data["claims"])
        method = data["memory"][0]["method"]
        source = "torch.profiler" if method == _AllocatorPeak.SOURCE else method.split(" (")[0]
        batch = data.get("training_batch")
        training = _t("lec_training", batch=batch) if batch else _t("lec_no_training")
        _suptitle(fig, _t("lec_title"), _t("lec_sub", device=data["device"], source=source, training=training),
                  data.get("training_conditions") or data.get("conditions"))
        fig.supxlabel(_t("lec_flop_notes"), fontsize=9, x=0.01, ha="left", color=PALETTE.ink)
    return fig


def visualize_lecture_claims(output_dir=DEFAULT_OUTPUT_DIR, *, data=None, dpi=DPI, **options):
    """The lecture's claims against this machine: draw 讲义对照.png into `output_dir` (None: don't
    save); `options` (profile, device, flop_records, memory, training: earlier stages' data to
    reuse) go to run_lecture_comparison."""
    return _save_into(plot_lecture_claims(data or run_lecture_comparison(**options)), output_dir, "lecture", dpi)


def _plot_module_flops(ax, data):
    """Forward FLOPs per top-level module."""
    rows = data["modules"]
    _barh(ax, [f"{r['module']} ({r['type']})" for r in rows], [r["flops"] for r in rows], [PALETTE.blue] * len(rows),
          fmt=lambda v: readable(v))
    ax.set_xlabel(_t("fwd_flops_axis"))
    ax.set_title(_t("own_flops"))


def _plot_module_sizes(ax, data):
    """Parameters and output bytes per top-level module, side by side."""
    rows = data["modules"]
    y = np.arange(len(rows))
    ax.barh(y - 0.2, [r["parameter_bytes"] / MIB for r in rows], 0.4, color=PALETTE.green, label=_t("own_param_mib"))
    ax.barh(y + 0.2, [(r["activation_bytes"] or 0) / MIB for r in rows], 0.4, color=PALETTE.red,
            label=_t("own_act_mib") + ("" if rows and rows[0]["activation_bytes"] is not None
                                       else _t("not_measured_long")))
    ax.set_yticks(y, [f"{r['module']} ({r['type']})" for r in rows])
    ax.invert_yaxis()
    ax.set_xlabel(_t("mib"))
    ax.legend(fontsize=8)
    ax.set_title(_t("own_sizes"))


def _plot_own_memory(ax, data):
    """The training step's peak by part: estimated (fake tensors) and measured."""
    pairs = [(k, data[k]) for k in ("memory_estimate", "memory_measured") if data.get(k)]
    if not pairs:
        _not_measured(ax, data["skipped"].get("memory_estimate", ""))
    else:
        x = np.arange(len(pairs))
        tops = _stacked_parts(ax, x, [p["at_peak"] for _, p in pairs], 0.5)
        for xi, top, (_, p) in zip(x, tops, pairs):
            ax.annotate(f"{p['total'] / MIB:.1f} MiB", (xi, top), xytext=(0, 2), textcoords="offset points",
                        ha="center", fontsize=8)
        ax.set_xticks(x, [_t(f"own_{k}") for k, _ in pairs])
        ax.set_xlim(-0.6, len(pairs) - 0.4)
        ax.set_ylim(0, max(tops) * 1.45)  # room for the legend above the bars
        ax.set_ylabel(_t("mib"))
        ax.legend(fontsize=8, ncol=3, loc="upper center")
    ax.set_title(_t("own_memory"))


def _plot_own_amp(ax, data):
    """Mixed-precision step time per precision (skips drawn with their reason word)."""
    if not data.get("amp"):
        _not_measured(ax, data["skipped"].get("amp", ""))
    else:
        _plot_amp_time(ax, {data["model"]: data["amp"]})
    ax.set_title(_t("own_amp"))


def _plot_own_latency(ax, data):
    """Latency at the batch given, with its spread, and the throughput it means."""
    lat = data.get("latency")
    if not lat:
        _not_measured(ax, data["skipped"].get("latency", ""))
    else:
        ms = lat["median_s"] * 1e3
        ax.bar([0], [ms], color=PALETTE.purple, yerr=[[ms - lat["spread_lo_s"] * 1e3], [lat["spread_hi_s"] * 1e3 - ms]],
               capsize=4)
        ax.text(0.5, 0.95, _t("own_latency_text", ms=ms, sps=lat["samples_per_s"], runs=lat["runs"]),
                ha="center", va="top", fontsize=10, transform=ax.transAxes)
        ax.set_xticks([0], [_t("batch_n", n=lat["batch"])])
        ax.set_ylabel("ms")
        ax.set_ylim(0, lat["spread_hi_s"] * 1e3 * 1.4)
    ax.set_title(_t("own_latency"))


def _plot_own_classes(ax, data):
    """Where the forward's matmul-class work goes, by op class."""
    by_class = {k: v for k, v in data["flops"]["by_class"].items() if v}
    if not by_class:
        _not_measured(ax, "")
    else:
        _barh(ax, list(by_class), list(by_class.values()),
              [PALETTE.blue, PALETTE.green, PALETTE.red, PALETTE.purple][:len(by_class)],
              fmt=lambda v: readable(v))
        ax.set_xlabel(_t("fwd_flops_axis"))
    ax.set_title(_t("own_classes"))


def _plot_own_distributed(axs, runs):
    """Per-rank memory on 2 ranks (measured beside the estimate), then on N ranks (simulated), or
    the 2 ranks' communication when N is 2."""
    _plot_dist_memory(axs[0], runs[0])
    axs[0].set_title(_t("own_dist_two", b=runs[0]["rank_batch"], g=runs[0]["global_batch"]))
    if len(runs) == 1:
        _plot_dist_comm(axs[1], runs[0])
        return
    _plot_dist_memory(axs[1], runs[1])
    axs[1].set_title(_t("own_dist_sim", n=runs[1]["world_size"], b=runs[1]["rank_batch"], g=runs[1]["global_batch"]))
    axs[1].set_xlabel(_t("own_dist_sim_note"), fontsize=8)


def plot_own_model(data):
    """Six panels from `analyze` data (eight with data-parallel training); returns the Figure."""
    import matplotlib.pyplot as plt
    columns = 4 if data.get("distributed") else 3
    with _figure_style():
        fig, axs = plt.subplots(2, columns, figsize=(6.3 * columns, 11), layout="constrained")
        _plot_module_flops(axs[0, 0], data)
        _plot_module_sizes(axs[0, 1], data)
        _plot_own_classes(axs[0, 2], data)
        _plot_own_memory(axs[1, 0], data)
        _plot_own_amp(axs[1, 1], data)
        _plot_own_latency(axs[1, 2], data)
        if columns == 4:
            _plot_own_distributed(axs[:, 3], data["distributed"])
        sub = _t("own_sub", device=data["device"], shape=data["input_shape"])
        if data["flops"].get("data_dependent"):
            sub += "\n" + _t("own_data_dependent")
        _suptitle(fig, _t("own_title", model=data["model"]), sub, data.get("conditions"))
    return fig


def visualize_own_model(model, inputs, output_dir=DEFAULT_OUTPUT_DIR, *, data=None, dpi=DPI, **options):
    """analyze() your model and draw 你的模型分析.png into `output_dir` (None: don't save)."""
    return _save_into(plot_own_model(data or analyze(model, inputs, **options)), output_dir, "model", dpi)


# %% =============================================================================================
# 13. The CLI: one STAGES table, main()
# ================================================================================================
# `--quick` picks the QUICK profile (section 1); each stage runs through run_stage (section 3) and
# is drawn by its visualize_* function; the data a stage reuses comes from the stages before it.


# stage -> (its run_* function, its visualize_* function): names, looked up when the stage runs
STAGES = {"flop": ("run_flop_analysis", "visualize_flop_analysis"),
          "memory": ("run_memory_analysis", "visualize_memory_analysis"),
          "training": ("run_training_comparison", "visualize_training_performance"),
          "amp": ("run_amp_analysis", "demonstrate_mixed_precision_benefits"),
          "dashboard": ("run_dashboard_analysis", "create_comprehensive_dashboard"),
          "roofline": ("run_roofline_analysis", "visualize_roofline"),
          "distributed": ("run_distributed_analysis", "visualize_distributed"),
          "lecture": ("run_lecture_comparison", "visualize_lecture_claims")}  # in the order they run
STAGE_OVERRUN = 1.3  # a stage that ends within 1.3x its budget kept it (results.json "timing")


def _reused(stage, done):
    """Earlier stages' data a stage takes instead of redoing it (a stage that failed left an error)."""
    ok = {name: data for name, data in done.items() if isinstance(data, dict) and "error" not in data}
    flop_records = ok.get("flop", {}).get("records")
    if stage == "flop":
        return {"records": BESIDE.pop("flop", None)}
    if stage == "dashboard":
        return {"flop_records": flop_records, "peak_flops": ok.get("training", {}).get("peak_flops", {}).get("fp32"),
                "training_memory": BESIDE.pop("dashboard", None)}
    if stage == "distributed":
        return {"simulated": BESIDE.pop("distributed", None)}
    if stage == "roofline":  # the best fp32 peak so far: the dashboard re-measures one a latency beat
        peaks = [ok.get(s, {}).get("peak_flops", {}) for s in ("training", "dashboard")]
        peaks = [p.get("fp32", p) for p in peaks if p]
        return {"peak_flops": max(peaks, key=lambda p: p["flops_per_s"], default=None)}
    if stage == "lecture":
        return {"flop_records": flop_records, "memory": ok.get("memory"), "training": ok.get("training")}
    return {}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description="PyTorch resource-accounting lab: draws the figures into "
                                                 "--output-dir, every number counted or measured here.")
    parser.add_argument("--output-dir", default=str(DEFAULT_OUTPUT_DIR), help="where PNGs and results.json go")
    parser.add_argument("--only", default=",".join(STAGES),
                        help=f"comma-separated subset of {','.join(STAGES)} (default: all)")
    parser.add_argument("--quick", action="store_true", help="smaller models and budgets for a fast check")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"],
                        help="device for measurements (auto: cuda, then mps, then cpu)")
    parser.add_argument("--lang", default="auto", choices=["auto", "zh", "en"], help="figure labels")
    parser.add_argument("--seed", type=int, default=0, help="seeds torch, numpy and random")
    parser.add_argument("--model", default=None,
                        help="your own model instead of the zoo: torchvision:NAME, path/to/file.py:ATTR or "
                             "package.module:ATTR (a module, or a class/function that builds one); draws "
                             f"{FIGURE_FILES['model']}")
    parser.add_argument("--input-shape", action="append", default=None,
                        help="with --model: an input shape such as 8,3,224,224 (repeat for several inputs)")
    parser.add_argument("--world-size", type=int, default=None, metavar="N",
                        help="with --model: data-parallel training, each rank on --input-shape's batch: "
                             "measured on 2 ranks (CPU, gloo), simulated on N")
    parser.add_argument("--input-dtype", default=None, choices=["float32", "float64", "bfloat16", "float16", "long"],
                        help="with --model: dtype of the inputs (long: token ids); default: the model's own")
    parser.add_argument("--threads", default="auto",
                        help="torch threads: a positive integer, or auto (default): before each stage, the "
                             "cores other programs leave free, at least 1 (a busy machine stalls extra threads)")
    parser.add_argument("--dpi", type=int, default=None, help=f"PNG resolution (default {DPI}; 80 with --quick)")
    parser.add_argument("--dataset", default="synthetic", choices=["synthetic", "mnist"],
                        help="data of the training comparison (mnist: IDX files in --data-dir)")
    parser.add_argument("--data-dir", default=None, help="folder with the MNIST IDX files (optionally .gz)")
    parser.add_argument("--download-mnist", action="store_true",
                        help="allow fetching MNIST into --data-dir if missing (the only network use)")
    parser.add_argument("--compile", action="store_true",
                        help="lecture stage: also time torch.compile on the training model (a child process, "
                             f"stopped after {DEFAULT.compile_s:.0f} s)")
    parser.add_argument("--tensorboard", default=None, metavar="DIR",
                        help="write the training comparison's curves, throughput and hyper-parameters as "
                             "TensorBoard logs into DIR (needs the optional tensorboard package)")
    args = parser.parse_args(argv)
    if args.tensorboard and not _has_tensorboard():
        parser.error("--tensorboard needs the tensorboard package, which is optional and not installed here: "
                     "pip install tensorboard")
    stages = [s.strip() for s in args.only.split(",") if s.strip()]
    unknown = [s for s in stages if s not in STAGES]
    if unknown or not stages:
        parser.error(f"--only takes a comma-separated subset of {','.join(STAGES)}; got {args.only!r}")
    args.only = [s for s in STAGES if s in stages]
    if args.dpi is not None and args.dpi <= 0:
        parser.error("--dpi must be a positive integer")
    args.dpi = args.dpi or (80 if args.quick else DPI)
    args.profile = "quick" if args.quick else "default"
    _check_model_args(parser, args)
    if args.threads != "auto" and not (args.threads.isdigit() and int(args.threads) > 0):
        parser.error(f"--threads takes auto or a positive integer, got {args.threads!r}")
    if args.dataset == "mnist" and "training" in args.only and not args.data_dir:
        parser.error("--dataset mnist needs --data-dir (a folder with the MNIST IDX files)")
    return args


def _check_model_args(parser, args):
    """--model needs --input-shape (comma-separated positive integers); both go together."""
    if args.model:
        if not args.input_shape:
            parser.error("--model needs --input-shape, e.g. --input-shape 8,3,224,224")
        try:
            args.input_shape = [tuple(int(d) for d in s.split(",")) for s in args.input_shape]
        except ValueError:
            parser.error(f"--input-shape takes comma-separated integers such as 8,3,224,224, got {args.input_shape}")
        if any(d <= 0 for s in args.input_shape for d in s):
            parser.error("--input-shape: every dimension must be a positive integer")
        if args.world_size is not None and args.world_size < 1:
            parser.error(f"--world-size takes an integer >= 1, got {args.world_size}")
        args.only = ["model"]
    elif args.input_shape or args.input_dtype or args.world_size:
        parser.error("--input-shape, --input-dtype and --world-size go with --model")


def _check_writable(output_dir):
    path = Path(output_dir)
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".write-test-"):
            pass
    except OSError as err:
        raise ValueError(f"output directory {str(path)!r} is not writable: {err.strerror or err}") from None


def _progress(stage, started):
    def report(done, total, name):
        print(f"  [{stage}] {done}/{total} {name} ({_now() - started:.1f}s)", flush=True)
    return report


PENDING_FIGURES = {}  # stage -> what draws its figure(s), once every stage has measured (_draw_all)


def _write_result(fn, args, path):
    write_json_atomic(fn(*args), Path(path))


class _Beside:
    """`fn(*args)` in a process of the rank server (a clean one, torch imported) while this one runs
    the counting stages: untimed work both, so sharing the CPU changes no number (_start_beside:
    ~15 s of a busy run, about even on a quiet 2-core one)."""

    def __init__(self, fn, *args):
        self._dir = tempfile.TemporaryDirectory(prefix="lab-beside-")
        self._path = Path(self._dir.name) / "result.json"
        self._process = _start_process(_write_result, fn, args, str(self._path))

    def result(self):
        """Its result once it is done (None if it failed: the stage then does the work itself)."""
        self._process.join()
        try:
            return json.loads(self._path.read_text()) if self._path.exists() else None
        finally:
            self._dir.cleanup()

    def stop(self):
        _stop([self._process])
        self._dir.cleanup()


BESIDE = {}  # stage -> its _Beside work while the counting stages run, then that work's result


def _start_beside(args):
    """The zoo's count, the dashboard's memory estimates and the distributed stage's large simulations
    beside the memory stage (run first then) and the FLOP stage."""
    import multiprocessing
    p = PROFILES[args.profile]
    if not p.beside or not {"flop", "memory"} & set(args.only) or (os.cpu_count() or 1) < 2 or \
            "forkserver" not in multiprocessing.get_all_start_methods():  # spawn (Windows): an import of torch each
        return
    if {"flop", "memory"} <= set(args.only):
        BESIDE["flop"] = _Beside(count_zoo, list(p.flop_models or MODEL_ZOO))
    if "dashboard" in args.only:
        BESIDE["dashboard"] = _Beside(zoo_training_memory, list(p.flop_models or MODEL_ZOO))
    if "distributed" in args.only:
        BESIDE["distributed"] = _Beside(simulate_worlds, p.distributed_large, list(p.distributed_worlds))


def _finish_beside(stage):
    """Before `stage`: wait for its work started beside, or for all of it before a stage that times
    something (nothing runs beside one); keep the results."""
    for name, work in list(BESIDE.items()):
        if isinstance(work, _Beside) and (name == stage or stage not in ("flop", "memory")):
            BESIDE[name] = work.result()


def _run_stage(stage, args, device, out, done, budget_s):
    """Run one stage with the run's profile (run_stage) and keep what draws its figure(s) in
    PENDING_FIGURES; its data."""
    options = {"device": device, "profile": PROFILES[args.profile], "seed": args.seed, "budget_s": budget_s,
               "progress": _progress(stage, _now()), "threads": None if args.threads == "auto" else int(args.threads)}
    if stage == "model":
        data = analyze(args.loaded_model, _cli_inputs(args), world_size=args.world_size, **options)
        print(format_model_table(data), flush=True)
        PENDING_FIGURES[stage] = [functools.partial(visualize_own_model, None, None, out, data=data, dpi=args.dpi)]
        return data
    extra = {"training": {"dataset": args.dataset, "data_dir": args.data_dir, "download": args.download_mnist},
             "lecture": {"compile": args.compile}}.get(stage, {})
    run, draw = (globals()[name] for name in STAGES[stage])
    data = run(**options, **extra, **_reused(stage, done))
    if stage == "lecture":
        print(format_lecture_table(data), flush=True)
    PENDING_FIGURES[stage] = [functools.partial(draw, out, data=data, dpi=args.dpi)]
    if stage == "memory" and isinstance(data, dict) and "timeline" in data:  # its second figure: one step over time
        PENDING_FIGURES[stage].append(functools.partial(visualize_memory_timeline, out, data=data, dpi=args.dpi))
    if stage == "training" and args.tensorboard:
        print(f"  TensorBoard logs: {write_tensorboard(data, args.tensorboard)} "
              f"(tensorboard --logdir {args.tensorboard})", flush=True)
    return data


def _draw_stage(stage):
    """Draw and save one stage's pending figures: (seconds, error or None)."""
    started = _now()
    try:
        for draw in PENDING_FIGURES.pop(stage, ()):
            draw()
    except Exception as err:
        return _now() - started, f"{type(err).__name__}: {_first_line(err)}"
    return _now() - started, None


def _draw_all(stages):
    """Draw every finished stage's figures once nothing is being measured any more: on Linux two at a
    time (a forked child draws every other stage while this process draws the rest; matplotlib's
    layout, not the pixels, makes a figure take ~1 s).  Returns {stage: (seconds, error or None)}."""
    if len(stages) < 2 or not sys.platform.startswith("linux") or (os.cpu_count() or 1) < 2:
        return {stage: _draw_stage(stage) for stage in stages}
    mine, theirs = stages[0::2], stages[1::2]
    with tempfile.TemporaryDirectory(prefix="lab-draw-") as tmp:
        path = Path(tmp) / "drawn.json"
        sys.stdout.flush()
        pid = os.fork()
        if pid == 0:  # the child: its half of the figures, then out, without the interpreter's teardown
            code = 1
            try:
                write_json_atomic({stage: _draw_stage(stage) for stage in theirs}, path)
                code = 0
            finally:
                os._exit(code)
        drawn = {stage: _draw_stage(stage) for stage in mine}
        os.waitpid(pid, 0)
        theirs_drawn = json.loads(path.read_text()) if path.exists() else {}
    return {**drawn, **{stage: tuple(theirs_drawn.get(stage, (None, "its drawing process failed")))
                        for stage in theirs}}


def _cli_inputs(args):
    """--input-shape (and --input-dtype) as inputs: a shape that follows the model, or meta tensors."""
    if args.input_dtype is None and len(args.input_shape) == 1:
        return args.input_shape[0]
    dtype = getattr(torch, {"long": "int64"}.get(args.input_dtype, args.input_dtype or "float32"))
    return tuple(torch.empty(s, device="meta", dtype=dtype) for s in args.input_shape)


RELEASE_ABOVE_BYTES = 2 ** 30  # below this resident size a collection (~0.15 s, ~0.6 s busy) buys nothing


def _release_memory():
    """Between stages, once the process holds more than RELEASE_ABOVE_BYTES: collect garbage and
    hand freed heap pages back to the OS (glibc's malloc_trim), so one stage's peak does not add
    to the next one's resident memory."""
    import gc

    import psutil
    if psutil.Process().memory_info().rss < RELEASE_ABOVE_BYTES:
        return
    gc.collect()
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            import ctypes
            ctypes.CDLL("libc.so.6").malloc_trim(0)


def environment(device, seed):
    return {"device": _device_name(device), "torch": torch.__version__, "python": platform.python_version(),
            "threads": torch.get_num_threads(), "cpu": cpu_flags(), "seed": seed,
            "cpu_capability": torch.backends.cpu.get_cpu_capability()}


def _previous_results(path):
    """The results.json a previous run left in the output folder (None if absent or unreadable)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and isinstance(data.get("stages"), dict) else None


def _stage_stamp(args):
    """When a stage's numbers were made and with which options: results.json may hold stages of
    several runs (--only updates its own), each beside the PNG it drew."""
    import datetime
    options = {k: getattr(args, k) for k in ("profile", "device", "seed", "lang", "dpi", "dataset", "data_dir",
                                             "threads")}
    return {"finished_at": datetime.datetime.now().isoformat(timespec="seconds"), "options": options}


def _stage_budget_s(args, stage, done):
    """The stage's budget from the profile.  The lecture's grows by `alone_s` when the FLOP or
    memory stage's data is not there to reuse (it counts and measures them itself), and by
    `compile_s` with --compile."""
    profile = PROFILES[args.profile]
    if stage != "lecture":
        return profile.budget_s(stage)
    alone = any(not isinstance(done.get(s), dict) or "error" in done[s] for s in ("flop", "memory"))
    return profile.lecture_budget_s + (profile.alone_s if alone else 0) + (profile.compile_s if args.compile else 0)


def _stage_timing(data, wall_s, budget_s):
    """results.json "timing": the conditions the stage ran under (run_stage's) and its wall time
    against its budget (_draw_all adds its figures' `draw_s`, part of the stage's budget)."""
    conditions = data.get("conditions") if isinstance(data, dict) else None
    return {**(conditions or {}), "budget_s": budget_s, "wall_s": wall_s,
            "within_budget": wall_s <= STAGE_OVERRUN * budget_s}


def _warn_ineffective(args):
    """Options that do nothing in this run, said rather than silently ignored."""
    training = "training" in args.only
    if args.data_dir and (args.dataset != "mnist" or not training):
        print("warning: --data-dir has no effect without --dataset mnist and the training stage", file=sys.stderr)
    if args.download_mnist and (args.dataset != "mnist" or not training):
        print("warning: --download-mnist has no effect without --dataset mnist and the training stage",
              file=sys.stderr)
    if args.dataset == "mnist" and not training:
        print("warning: --dataset only changes the training stage, which --only leaves out", file=sys.stderr)
    if args.tensorboard and not training:
        print("warning: --tensorboard writes the training stage's logs, which --only leaves out", file=sys.stderr)
    if args.compile and "lecture" not in args.only:
        print("warning: --compile belongs to the lecture stage, which --only leaves out", file=sys.stderr)


def main(argv=None):
    """Run the selected demos in order; write their PNGs and results.json.  Returns an exit code:
    0 all done, 1 a demo failed (the others still ran), 2 bad options or unusable output/device,
    130 interrupted (results.json keeps the stages that finished).

    results.json is updated, not replaced: the stages this run did replace their own entries, and
    the stages of earlier runs stay, each stamped under "runs" with its time and options."""
    args = parse_args(argv)
    try:
        device = resolve_device(args.device)
        _check_writable(args.output_dir)
        if args.dataset == "mnist" and "training" in args.only and not args.download_mnist:
            TrainingData.mnist_paths(args.data_dir)
        args.loaded_model = load_model(args.model) if args.model else None
        set_language(args.lang)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    _warn_ineffective(args)
    seed_everything(args.seed)
    out = Path(args.output_dir)
    results = _previous_results(out / "results.json") or {"stages": {}}
    results.update(environment=environment(device, args.seed), quick=args.quick, profile=args.profile)
    for key in ("timing", "runs"):
        results.setdefault(key, {})
    results.pop("interrupted", None)
    started, failed = _now(), []
    code = _measure_stages(args, device, out, results, failed)
    if code is None:
        code = _draw_stages(args, out, results, failed)
    if code is not None:
        return code
    results["wall_s"] = _now() - started
    write_json_atomic(results, out / "results.json")
    pngs = len(args.only) - len(failed) + ("memory" in args.only and "memory" not in failed)  # + the timeline
    print(f"wrote {pngs} figure(s) and results.json to {out} in {results['wall_s']:.1f}s", flush=True)
    if failed:
        print(f"failed stage(s): {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


def _measure_stages(args, device, out, results, failed):
    """Every stage in order, its data and timing into `results`; 130 on Ctrl-C (the finished
    stages' numbers written and their figures drawn, Ctrl-C again skips that), else None."""
    early = "distributed" in args.only and PROFILES[args.profile].distributed_measure_s is not None
    _start_beside(args)
    try:
        return _each_stage(args, device, out, results, failed, early)
    finally:  # after Ctrl-C or a failure too: no process stays behind
        for work in BESIDE.values():
            if isinstance(work, _Beside):
                work.stop()
        BESIDE.clear()
        stop_rank_server()


def _each_stage(args, device, out, results, failed, early):
    started, done = _now(), 0
    order = list(args.only)
    if "flop" in BESIDE:  # the memory stage first: the zoo is counted beside it
        order.sort(key=lambda s: s != "memory")
    for stage in order:
        if early and stage in ("memory", "distributed"):  # its imports overlap the memory stage, which times
            rank_server()                                  # nothing (allocator readings do not mind a busy CPU)
            early = False
        _finish_beside(stage)
        started_stage, budget_s = _now(), _stage_budget_s(args, stage, results["stages"])
        beside = " (its work ran beside the stages before)" if isinstance(BESIDE.get(stage), (list, dict)) else ""
        print(f"[{stage}] {FIGURE_FILES[stage]} (budget {budget_s:g}s) ...", flush=True)
        try:
            results["stages"][stage] = _run_stage(stage, args, device, out, results["stages"], budget_s)
            print(f"[{stage}] done in {_now() - started_stage:.1f}s{beside}", flush=True)
        except KeyboardInterrupt:  # a PNG being written is dropped, the others stay whole
            if done:
                results.update(interrupted=stage, wall_s=_now() - started)
                write_json_atomic(results, out / "results.json")
                with contextlib.suppress(KeyboardInterrupt):
                    _draw_all([s for s in args.only if s in PENDING_FIGURES])
            print(f"\ninterrupted during [{stage}]; results.json " +
                  (f"keeps the {done} stage(s) that finished" if done else "not written"), file=sys.stderr)
            return 130
        except Exception as err:  # one failing demo must not stop the others
            failed.append(stage)
            results["stages"][stage] = {"error": f"{type(err).__name__}: {_first_line(err)}"}
            print(f"[{stage}] FAILED: {type(err).__name__}: {_first_line(err)}", file=sys.stderr, flush=True)
        results["timing"][stage] = _stage_timing(results["stages"][stage], _now() - started_stage, budget_s)
        results["runs"][stage] = _stage_stamp(args)
        done += 1
        _release_memory()
    return None


def _draw_stages(args, out, results, failed):
    """Every measured stage's figures (_draw_all), their drawing time into each stage's timing
    (part of its budget); 130 on Ctrl-C, results.json kept whole, else None."""
    drawing = _now()
    try:
        drawn = _draw_all([s for s in args.only if s in PENDING_FIGURES])
    except KeyboardInterrupt:  # every number is in: results.json is written; a PNG being written is dropped
        results["interrupted"] = "drawing"
        write_json_atomic(results, out / "results.json")
        print("\ninterrupted while drawing; results.json keeps every stage's numbers", file=sys.stderr)
        return 130
    for stage, (seconds, error) in drawn.items():
        timing = results["timing"][stage]
        timing.update(draw_s=seconds,
                      within_budget=timing["wall_s"] + (seconds or 0) <= STAGE_OVERRUN * timing["budget_s"])
        if error:
            failed.append(stage)
            if isinstance(results["stages"][stage], dict):
                results["stages"][stage]["figure_error"] = error
            print(f"[{stage}] FAILED to draw: {error}", file=sys.stderr, flush=True)
    print(f"drew the figures in {_now() - drawing:.1f}s", flush=True)
    return None

if __name__ == "__main__":
    code = main()
    sys.stdout.flush()
    sys.stderr.flush()
    # NB: every file is written and closed by now; skipping the interpreter's teardown of torch
    # saves ~1 s on a quiet 2-core machine and ~3 s on a busy one.
    os._exit(code)
