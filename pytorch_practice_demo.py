"""PyTorch resource-accounting lab: FLOPs, memory, training strategies, mixed precision.

One command draws five figures, and every number on them is counted or measured on the
machine that runs it:

    python pytorch_practice_demo.py                 # five PNGs + results.json in 生成的图片/
    python pytorch_practice_demo.py --quick         # smaller sizes, a fast check
    python pytorch_practice_demo.py --only flop,amp --lang en

The helpers behind the figures work on your own models:

    from pytorch_practice_demo import FLOPCalculator
    result = FLOPCalculator().analyze_model(model, (32, 1024))
    print(result["flops_readable"], result["parameters_readable"])

Conventions (stated once, used everywhere):
- FLOPs = 2 x multiply-adds (MACs). Bias adds are not counted. ``flops`` holds the matmul-class
  work (linear, matmul, conv, attention, RNN); elementwise/normalisation/softmax/pooling work is
  kept apart in ``other_flops`` so ``flops`` stays comparable with published numbers.
- Memory is the peak of live tensor storage bytes during one steady-state step.

References behind the formulas:
- torch/utils/flop_counter.py (per-op formulas, conv and SDPA backward conventions).
- Kaplan et al. 2020, "Scaling Laws for Neural Language Models", Table 1 (transformer FLOPs).
- Chowdhery et al. 2022, "PaLM", Appendix B (model FLOPs utilisation, MFU).
- Rajbhandari et al. 2020, "ZeRO", Section 3 and Figure 1 (16 bytes/parameter for mixed-precision
  Adam; ZeRO-1/2/3 partitioning).
- Micikevicius et al. 2018, "Mixed Precision Training" (loss scaling).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import functools
import json
import math
import os
import platform
import random
import sys
import tempfile
import time
import warnings
import weakref
from collections import Counter
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten, tree_map


# -----------------------------------------------------------------------------
# Constants, labels and output helpers
# -----------------------------------------------------------------------------

DEFAULT_OUTPUT_DIR = Path(__file__).resolve().parent / "生成的图片"
FIGURE_FILES = {
    "flop": "FLOP分析可视化.png",
    "memory": "内存分析可视化.png",
    "training": "训练性能可视化.png",
    "amp": "混合精度效益对比.png",
    "dashboard": "综合性能仪表板.png",
}

# Bytes per element of each dtype the lab talks about.
BYTES_PER_ELEMENT = {torch.float32: 4, torch.bfloat16: 2, torch.float16: 2}

# Families that ship CJK glyphs, in order of preference, looked up among installed fonts.
CJK_FONT_FAMILIES = ["Noto Sans CJK SC", "Noto Sans SC", "Source Han Sans SC", "WenQuanYi Zen Hei",
                     "WenQuanYi Micro Hei", "SimHei", "Microsoft YaHei", "PingFang SC",
                     "Heiti SC", "Arial Unicode MS"]

# Every label of every figure, Chinese and English side by side: one table, one lookup (_t).
LABELS = {
    # FLOP figure
    "flop_title": ("FLOP 分析：模型规模与计算量", "FLOP analysis: model size and compute"),
    "flop_sub": ("每个数字均由 FLOPCalculator 在 meta 张量上计数（无真实计算）；batch={batch}；FLOPs = 2 × 乘加",
                 "Every number counted by FLOPCalculator on meta tensors (no real compute); "
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
                "估计 = fake 张量（无真实计算），实测 = 真实一步中活跃张量存储的峰值",
                "device {device}; fp32; batch={batch}; Adam; estimate = fake tensors (no real compute), "
                "measured = peak of live tensor storage in one real step"),
    "mem_composition": ("训练峰值时刻的内存组成（左：公式，右：估计）",
                        "Memory at the training peak (left: napkin, right: estimate)"),
    "parameters_part": ("参数", "parameters"), "gradients_part": ("梯度", "gradients"),
    "optimizer_part": ("优化器状态", "optimizer state"), "activations_part": ("激活", "activations"),
    "temporary_part": ("临时张量", "temporaries"), "buffers_part": ("缓冲区+输入", "buffers + inputs"),
    "measured_peak": ("实测峰值", "measured peak"),
    "train_vs_infer": ("训练 vs 推理（峰值）", "Training vs inference (peak)"),
    "training": ("训练（fwd+bwd+Adam）", "training (fwd+bwd+Adam)"),
    "inference": ("推理（inference_mode）", "inference (inference_mode)"),
    "mem_growth": ("{model}：内存随 batch 增长", "{model}: memory growth with batch size"),
    "estimated_total": ("估计峰值", "estimated peak"),
    "fixed_part": ("固定部分：参数+梯度+优化器状态", "fixed part: params + grads + optimizer state"),
    "measured_points": ("实测峰值", "measured peak"),
    "batch_size": ("batch 大小", "batch size"),
    "mem_variants": ("{model}：精度与梯度检查点（估计，batch={batch}）",
                     "{model}: precision and checkpointing (estimated, batch={batch})"),
    "bytes_per_param": ("每参数字节数（峰值 / 参数量）", "bytes per parameter (peak / parameters)"),
    "zero_title": ("纸面计算：7B 模型在 {n} 卡上的每卡模型状态",
                   "On paper: per-device model states, 7B model on {n} GPUs"),
    "zero_note": ("混合精度 Adam 每参数 16 字节（ZeRO 论文 §3）；不含激活",
                  "mixed-precision Adam, 16 bytes/param (ZeRO paper, §3); activations excluded"),
    "gpu_80gb": ("80 GiB 显卡", "80 GiB GPU"),
    "mem_error": ("与实测峰值的相对误差", "Relative error vs measured peak"),
    "napkin": ("公式（参数×4 + 梯度 + Adam 2× + 各层输出之和）",
               "napkin (params×4 + grads + 2× Adam + sum of layer outputs)"),
    "estimate": ("估计（fake 张量）", "estimate (fake tensors)"),
    "mib": ("MiB", "MiB"), "gib": ("GiB", "GiB"),
    # mixed-precision figure
    "amp_title": ("混合精度：在这台机器上实测", "Mixed precision, measured on this machine"),
    "amp_sub": ("设备 {device}；训练一步（前向+反向+Adam）；batch={batch}；硬件：{support}",
                "device {device}; one training step (fwd+bwd+Adam); batch={batch}; hardware: {support}"),
    "amp_time": ("每步时间（中位数，误差棒 = IQR）", "Step time (median, error bar = IQR)"),
    "seconds": ("秒", "seconds"),
    "amp_memory": ("一步中的峰值内存", "Peak memory in one step"),
    "amp_speedup": ("相对 fp32 的加速比（<1 即变慢）", "Speed-up vs fp32 (<1 is a slowdown)"),
    "amp_saving": ("激活内存相对 fp32 的节省（峰值由 fp32 的 Adam 状态决定）",
                   "Activation memory saved vs fp32 (the peak is set by fp32 Adam state)"),
    "amp_error": ("输出与 fp32 的最大相对误差", "Max relative error of outputs vs fp32"),
    "amp_ranges": ("为什么 fp16 需要损失缩放：可表示范围", "Why fp16 needs loss scaling: representable ranges"),
    "range_bar": ("最小次正规数 … 最大值", "smallest subnormal … max"),
    "skipped": ("跳过", "skipped"),
    "lit_mark": ("文献参考值 2-3×（非实测）", "literature 2-3× (reference, not measured)"),
    "underflow": ("1e-8 → {fp16}（fp16 下溢）；bf16 → {bf16:.3g}；× 损失缩放 {scale} 后 fp16 → {scaled:.3g}",
                  "1e-8 → {fp16} in fp16 (underflow); bf16 → {bf16:.3g}; × loss scale {scale} → fp16 {scaled:.3g}"),
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
    """Seaborn theme and a concrete CJK-capable font family, applied only inside the block."""
    import matplotlib.pyplot as plt
    import seaborn as sns
    families = ([_CJK_FONT] if _lang() == "zh" else []) + ["DejaVu Sans"]
    with sns.axes_style(style), plt.rc_context({"font.family": families,
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


def save_figure(fig, path, dpi=120):
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


# -----------------------------------------------------------------------------
# Model zoo: small models written here, torchvision models built with weights=None
# -----------------------------------------------------------------------------

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


class CausalSelfAttention(nn.Module):
    def __init__(self, n_embd, n_head):
        super().__init__()
        self.n_head = n_head
        self.qkv = nn.Linear(n_embd, 3 * n_embd)
        self.proj = nn.Linear(n_embd, n_embd)

    def forward(self, x):                                    # (B, T, C)
        b, t, c = x.shape
        q, k, v = self.qkv(x).split(c, dim=2)
        q, k, v = (z.view(b, t, self.n_head, c // self.n_head).transpose(1, 2) for z in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # (B, H, T, C/H)
        return self.proj(y.transpose(1, 2).reshape(b, t, c))


class Block(nn.Module):
    """Pre-norm transformer block, as in nanoGPT."""

    def __init__(self, n_embd, n_head):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(n_embd), nn.LayerNorm(n_embd)
        self.attn = CausalSelfAttention(n_embd, n_head)
        self.mlp = nn.Sequential(nn.Linear(n_embd, 4 * n_embd), nn.GELU(), nn.Linear(4 * n_embd, n_embd))

    def forward(self, x):
        x = x + self.attn(self.ln1(x))
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

    def forward(self, idx):                                  # (B, T) token ids
        positions = torch.arange(idx.shape[1], device=idx.device)
        x = self.tok(idx) + self.pos(positions)              # (B, T, C)
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln_f(x))                       # (B, T, vocab)


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


def _torchvision(name):
    def build():
        import torchvision
        return getattr(torchvision.models, name)(weights=None)  # weights=None: nothing downloaded
    return build


def _tokens(length):
    return lambda batch: torch.zeros(batch, length, dtype=torch.long)


def _image(channels, size):
    return lambda batch: (batch, channels, size, size)


# name -> (kind, builder, inputs(batch)): the models every figure compares.
MODEL_ZOO = {
    "MLP-512": ("mlp", functools.partial(mlp, 512), lambda batch: (batch, 1024)),
    "MLP-2048": ("mlp", functools.partial(mlp, 2048), lambda batch: (batch, 1024)),
    "MLP-8192": ("mlp", functools.partial(mlp, 8192), lambda batch: (batch, 1024)),
    "MNIST-CNN": ("cnn", MnistNet, _image(1, 28)),
    "ResNet-18": ("cnn", _torchvision("resnet18"), _image(3, 224)),
    "ResNet-50": ("cnn", _torchvision("resnet50"), _image(3, 224)),
    "MobileNetV2": ("cnn", _torchvision("mobilenet_v2"), _image(3, 224)),
    "EfficientNet-B0": ("cnn", _torchvision("efficientnet_b0"), _image(3, 224)),
    "ViT-B/16": ("transformer", _torchvision("vit_b_16"), _image(3, 224)),
    "TinyGPT": ("transformer", TinyGPT, _tokens(256)),
    "LSTM-Classifier": ("rnn", LSTMClassifier, _tokens(64)),  # meta counting is per time step
}
QUICK_ZOO = ["MLP-512", "MLP-2048", "MNIST-CNN", "ResNet-18", "MobileNetV2", "TinyGPT",
             "LSTM-Classifier"]


def build_model(name, device="meta"):
    """Build a zoo model directly on `device` (on "meta" its weights take no memory)."""
    kind, builder, _ = MODEL_ZOO[name]
    with torch.device(device):
        return builder()


# -----------------------------------------------------------------------------
# FLOP counting
# -----------------------------------------------------------------------------
# FLOPs = 2 * MACs; bias adds not counted.  MAC formulas below return multiply-adds for the
# matmul-class ops; "other" formulas return FLOPs directly (one per elementwise operation).

_FORMULAS = {}  # aten op name -> (kind, formula); kind is "macs" or "other"


def _register(kind, *op_names):
    """Register `formula` for aten ops by name (names, not objects: older torch lacks some ops)."""
    def decorator(fn):
        for name in op_names:
            if name in _FORMULAS:
                raise RuntimeError(f"a formula for aten.{name} is already registered")
            _FORMULAS[name] = (kind, fn)
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


@macs_formula("bmm")
def bmm_macs(a, b, *args, **kwargs) -> int:
    """(B, m, k) @ (B, k, n): B*m*k*n."""
    return a.shape[0] * a.shape[1] * a.shape[2] * b.shape[2]


@macs_formula("baddbmm")
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


@macs_formula("convolution", "_convolution")
def conv_macs(x, w, bias, stride, padding, dilation, transposed, *args, out=None, **kwargs) -> int:
    return _conv_macs(x.shape, w.shape, out.shape, transposed)


@macs_formula("convolution_backward")
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
              "_scaled_dot_product_cudnn_attention")
def sdpa_macs(q, k, v, *args, **kwargs) -> int:
    return _sdpa_macs(q, k, v)


@macs_formula("_scaled_dot_product_flash_attention_for_cpu_backward",
              "_scaled_dot_product_flash_attention_backward",
              "_scaled_dot_product_efficient_attention_backward",
              "_scaled_dot_product_cudnn_attention_backward")
def sdpa_backward_macs(grad_out, q, k, v, *args, **kwargs) -> int:
    """Recompute scores, then grad_scores, grad_v, grad_q, grad_k: flop_counter.py's 5 bmms."""
    b, h, l, e = q.shape
    s, ev = k.shape[-2], v.shape[-1]
    return b * h * l * s * (2 * e + 2 * ev + e)


@macs_formula("_native_multi_head_attention")
def mha_fastpath_macs(q, k, v, embed_dim, num_heads, qkv_weight, qkv_bias, proj_weight,
                      *args, **kwargs) -> int:
    """nn.MultiheadAttention's eval fast path: q/k/v projections, attention, out projection."""
    b, l, e = q.shape
    s = k.shape[1]
    projections = b * l * e * e + 2 * b * s * e * e + b * l * e * e
    return projections + 2 * b * l * s * e  # scores and weighted values over all heads


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


@macs_formula("mkldnn_rnn_layer")
def mkldnn_rnn_macs(x, w_ih, w_hh, b_ih, b_hh, *args, **kwargs) -> int:
    """The CPU (oneDNN) LSTM/GRU layer: T*B*(W_ih + W_hh) multiply-adds."""
    return _rnn_weight_macs(x, [w_ih, w_hh])


@macs_formula("_cudnn_rnn")
def cudnn_rnn_macs(x, weights, *args, **kwargs) -> int:
    """The cuDNN RNN over all layers and directions: T*B*(sum of weight matrices)."""
    return _rnn_weight_macs(x, weights)


@macs_formula("mkldnn_rnn_layer_backward", "_cudnn_rnn_backward")
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
               "native_dropout")
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


# Ops that move or create data without arithmetic: neither counted nor "unsupported".
ZERO_COST_OPS = {
    "detach", "clone", "copy_", "_to_copy", "empty", "empty_like", "empty_strided", "zeros",
    "zeros_like", "ones", "ones_like", "full", "full_like", "fill_", "zero_", "new_empty",
    "new_empty_strided", "new_zeros", "new_ones", "new_full", "arange", "cat", "stack",
    "embedding", "index_select", "gather", "lift_fresh", "lift_fresh_copy", "constant_pad_nd",
    "scalar_tensor", "_local_scalar_dense", "_unsafe_view", "contiguous", "index", "index_put_",
    "scatter", "scatter_", "masked_fill_", "masked_fill", "uniform_", "normal_", "bernoulli_",
    "randn", "rand", "randint", "randperm", "resize_", "set_", "_assert_async", "sym_size",
    "sym_numel", "sym_stride", "sym_storage_offset", "is_same_size",
    "_has_compatible_shallow_copy_type",
    "split_with_sizes_copy", "unbind_copy", "tril", "triu", "flip", "roll", "repeat",
    "_pin_memory", "unsafe_split", "unsafe_split_with_sizes", "unsafe_chunk", "select_backward",
    "slice_backward", "select_scatter", "slice_scatter", "as_strided_scatter", "index_add_", "index_put",
}


def _op_cost(func, args, kwargs, out):
    """Return (kind, amount) for one op: kind in {"macs", "other", "zero", "unsupported"}."""
    name = func.overloadpacket.__name__
    if name in _FORMULAS:
        kind, formula = _FORMULAS[name]
        return kind, int(formula(*args, **kwargs, out=out))
    if func.is_view or name in ZERO_COST_OPS or name.endswith("_copy"):
        return "zero", 0
    if torch.Tag.pointwise in func.tags:  # one FLOP per output element
        return "other", _first_output_numel(out)
    return "unsupported", 0


ATTENTION_OPS = {"bmm", "baddbmm", "_scaled_dot_product_flash_attention_for_cpu",
                 "_scaled_dot_product_flash_attention", "_scaled_dot_product_efficient_attention",
                 "_scaled_dot_product_cudnn_attention", "_native_multi_head_attention"}
WORK_CLASSES = ("linear/matmul", "conv", "attention", "RNN")


def _work_class(op_name, module):
    """Which kind of matmul-class work an op is, judged by the op and its innermost module."""
    if isinstance(module, nn.RNNBase) or "rnn" in op_name:
        return "RNN"
    if op_name in ("convolution", "_convolution", "convolution_backward"):
        return "conv"
    if op_name in ATTENTION_OPS:
        return "attention"
    return "linear/matmul"


class _CountingMode(TorchDispatchMode):
    """Dispatch mode that prices every op with the registry and attributes it to modules."""

    def __init__(self):
        super().__init__()
        self.phase = "forward"
        self.macs = Counter()          # phase -> multiply-adds
        self.other = Counter()         # phase -> other FLOPs
        self.by_operator = Counter()   # forward op name -> FLOPs (matmul-class and other)
        self.by_module = Counter()     # module name -> forward matmul-class FLOPs
        self.by_class = Counter()      # WORK_CLASSES entry -> forward matmul-class FLOPs
        self.unsupported = Counter()   # op name -> calls
        self.module_stack = []         # (name, module) of the modules being called

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        kind, amount = _op_cost(func, args, kwargs, out)
        name = func.overloadpacket.__name__
        if kind == "unsupported":
            self.unsupported[name] += 1
        elif kind == "macs":
            self.macs[self.phase] += amount
        elif kind == "other":
            self.other[self.phase] += amount
        if self.phase == "forward" and kind in ("macs", "other"):
            self.by_operator[name] += 2 * amount if kind == "macs" else amount
            if kind == "macs":
                for module_name in dict.fromkeys(name for name, _ in self.module_stack):
                    self.by_module[module_name] += 2 * amount
                innermost = self.module_stack[-1][1] if self.module_stack else None
                self.by_class[_work_class(name, innermost)] += 2 * amount
        return out


@contextlib.contextmanager
def _track_modules(model, mode):
    """Keep mode.module_stack in step with module calls, via global hooks removed on exit."""
    names = {}
    for name, module in model.named_modules():
        names.setdefault(id(module), name)

    def pre(module, args):
        mode.module_stack.append((names.get(id(module), type(module).__name__), module))

    def post(module, args, output):
        if mode.module_stack:
            mode.module_stack.pop()

    handles = [nn.modules.module.register_module_forward_pre_hook(pre),
               nn.modules.module.register_module_forward_hook(post, always_call=True)]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


# --- running a model on a replica: the user's module is never touched -------------------

def _replica(model, make):
    """A deep copy of `model` whose parameters and buffers are `make(tensor)`.

    `make` gives empty meta tensors (counting), fake tensors (estimating) or real clones
    (measuring); the user's module is never touched.  Tied weights stay tied (deepcopy's memo).
    """
    memo = {}
    for p in model.parameters():
        memo[id(p)] = nn.Parameter(make(p.detach()), requires_grad=p.requires_grad)
    for b in model.buffers():
        memo[id(b)] = make(b.detach())
    return copy.deepcopy(model, memo)


def _meta_like(x):
    return torch.empty_like(x, device="meta")


def _real_like(device, dtype=None, seed=0):
    """Real copies on `device` (floating tensors cast to `dtype`); a meta input becomes random data."""
    generator = torch.Generator().manual_seed(seed)

    def make(x):
        cast = dtype if (dtype is not None and x.is_floating_point()) else x.dtype
        if x.is_meta:  # a shape given by the user
            if x.is_floating_point():
                return torch.randn(x.shape, generator=generator).to(device, cast)
            return torch.zeros(x.shape, dtype=x.dtype, device=device)
        return x.detach().to(device, cast, copy=True)
    return make


def _model_device(model):
    for t in (*model.parameters(), *model.buffers()):
        return t.device
    return torch.device("cpu")


def _normalize_inputs(inputs):
    """Turn `inputs` into (args, kwargs) of tensors; validate shapes given as tuples."""
    if isinstance(inputs, torch.Size) or (isinstance(inputs, (tuple, list)) and inputs
                                          and all(isinstance(d, int) for d in inputs)):
        shape = tuple(inputs)
        if any(d <= 0 for d in shape):
            raise ValueError(f"input shape {shape} has a zero or negative dimension; "
                             "every dimension must be a positive integer")
        return (torch.empty(shape, device="meta"),), {}
    if isinstance(inputs, torch.Tensor):
        return (inputs,), {}
    if isinstance(inputs, dict):
        return (), dict(inputs)
    if isinstance(inputs, (tuple, list)) and inputs:
        return tuple(inputs), {}
    raise TypeError("inputs must be a shape tuple such as (32, 1024), a tensor, a tuple/list "
                    f"of tensors (positional arguments) or a dict (keyword arguments); "
                    f"got {type(inputs).__name__}")


def _map_tensors(tree, make):
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


def _shapes(args, kwargs):
    leaves = [x for x in tree_flatten((args, kwargs))[0] if isinstance(x, torch.Tensor)]
    shapes = [tuple(x.shape) for x in leaves]
    return shapes[0] if len(shapes) == 1 else shapes


def _check_model(model):
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")


def _scalar_loss(output):
    """Sum of every floating-point output tensor that requires grad (None if there is none)."""
    leaves = [x for x in tree_flatten(output)[0]
              if isinstance(x, torch.Tensor) and x.is_floating_point() and x.requires_grad]
    if not leaves:
        return None
    return sum(x.float().sum() for x in leaves)


class ModelRunError(ValueError):
    """The model could not run on the inputs given (shape mismatch and the like)."""


def _run_error(model, args, kwargs, err):
    return ModelRunError(f"{type(model).__name__} could not run on inputs of shape "
                         f"{_shapes(args, kwargs)}: {_first_line(err)}")


class FLOPCalculator:
    """Count FLOPs (2 per multiply-add), MACs and parameters of any nn.Module.

    Counting runs on meta tensors by default: a replica of the model whose weights take no
    memory, so the cost does not grow with the batch and the user's model is never touched.
    A model that needs real values (data-dependent control flow) falls back to a real run on a
    clone of its weights; ``result["mode"]`` says which was used.
    """

    MODES = ("auto", "meta", "real")

    def analyze_model(self, model, inputs, *, mode="auto"):
        """Count one forward (inference) and one forward + backward (training) of `model`.

        Parameters
        ----------
        model : nn.Module
        inputs : shape tuple (batch first), tensor, tuple/list of tensors, or dict of kwargs.
        mode : "auto" (meta, real if meta fails), "meta" or "real".
        """
        _check_model(model)
        if mode not in self.MODES:
            raise ValueError(f"mode must be one of {self.MODES}, got {mode!r}")
        args, kwargs = _normalize_inputs(inputs)
        can_run_real = _model_device(model).type != "meta"
        if mode in ("auto", "meta"):
            try:
                return self._count(model, args, kwargs, real=False, mode_note="meta")
            except Exception as err:
                meta_error = err
                if mode == "meta" or not can_run_real:
                    raise _run_error(model, args, kwargs, err) from None
        try:
            note = "real" if mode == "real" else f"real (meta failed: {_first_line(meta_error)})"
            return self._count(model, args, kwargs, real=True, mode_note=note)
        except Exception as err:
            raise _run_error(model, args, kwargs, err) from None

    def _count(self, model, args, kwargs, *, real, mode_note):
        make = _real_like(_model_device(model)) if real else _meta_like
        replica = _replica(model, make)
        run_args, run_kwargs = _map_tensors((args, kwargs), make)
        training = _CountingMode()
        with _track_modules(replica, training), training:
            output = replica(*run_args, **run_kwargs)
            training.phase = "backward"
            loss = _scalar_loss(output)
            if loss is not None:
                loss.backward()
        # NB: eval fast paths (nn.MultiheadAttention, TransformerEncoderLayer) run only without
        # autograd on CPU/CUDA, so a real run counts inference in a second, no-grad forward.
        # On meta they never trigger: the forward above is the inference count too.
        inference = training
        if real:
            inference = _CountingMode()
            with _track_modules(replica, inference), inference, torch.no_grad():
                replica(*run_args, **run_kwargs)
        return self._result(model, args, kwargs, inference, training, mode_note)

    @staticmethod
    def _result(model, args, kwargs, inference, training, mode_note):
        macs = inference.macs["forward"]
        backward_macs = training.macs["backward"]
        parameters = sum(p.numel() for p in model.parameters())
        unsupported = inference.unsupported | training.unsupported  # calls per pass, either pass
        return {
            "model": type(model).__name__,
            "input_shape": _shapes(args, kwargs),
            "flops": 2 * macs,
            "macs": macs,
            "other_flops": inference.other["forward"],
            "training_flops": 2 * (training.macs["forward"] + backward_macs),
            "backward_flops": 2 * backward_macs,
            "training_other_flops": training.other["forward"] + training.other["backward"],
            "flops_readable": readable(2 * macs, "FLOPs"),
            "macs_readable": readable(macs, "MACs"),
            "parameters": parameters,
            "parameters_readable": readable(parameters),
            "trainable_parameters": sum(p.numel() for p in model.parameters() if p.requires_grad),
            "by_module": {k: v for k, v in inference.by_module.items() if k},
            "by_operator": dict(inference.by_operator),
            "by_class": {cls: inference.by_class[cls] for cls in WORK_CLASSES},
            "unsupported_ops": dict(unsupported),
            "mode": mode_note,
        }


def _first_line(err):
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


FLOP_RECORD_KEYS = ("flops", "macs", "other_flops", "training_flops", "backward_flops", "parameters",
                    "trainable_parameters", "by_operator", "by_class", "unsupported_ops", "mode", "input_shape")


def run_flop_analysis(models=None, *, batch=1, quick=False, progress=None):
    """Count every zoo model at `batch`; return one record (dict) per model.

    Models are built on the meta device, so this takes seconds even for ViT-B/16.
    `progress(done, total, name)` is called after each model when given.
    """
    names = list(models or (QUICK_ZOO if quick else MODEL_ZOO))
    records = []
    for i, name in enumerate(names):
        kind, _, make_inputs = MODEL_ZOO[name]
        result = FLOPCalculator().analyze_model(build_model(name), make_inputs(batch))
        records.append({"name": name, "kind": kind, "batch": batch,
                        **{k: result[k] for k in FLOP_RECORD_KEYS}})
        if progress:
            progress(i + 1, len(names), name)
    return records


# -----------------------------------------------------------------------------
# Memory accounting
# -----------------------------------------------------------------------------
# total = the peak of live tensor storage bytes during one steady-state training step
# (forward, backward, optimizer.step(), optimizer state already created, grads set to None
# between steps), or during one forward under torch.inference_mode() for inference.

OPTIMIZER_STATES = {"sgd": 0, "sgd_momentum": 1, "adam": 2, "adamw": 2}  # state tensors per parameter
PRECISIONS = {"fp32": None, "amp_bf16": torch.bfloat16, "amp_fp16": torch.float16, "bf16": torch.bfloat16}


def _make_optimizer(name, params, foreach=None):
    if name == "sgd":
        return torch.optim.SGD(params, lr=1e-3, foreach=foreach)
    if name == "sgd_momentum":
        return torch.optim.SGD(params, lr=1e-3, momentum=0.9, foreach=foreach)
    if name == "adam":
        return torch.optim.Adam(params, lr=1e-3, foreach=foreach)
    return torch.optim.AdamW(params, lr=1e-3, foreach=foreach)


def _check_memory_options(optimizer, precision):
    if optimizer not in OPTIMIZER_STATES:
        raise ValueError(f"optimizer must be one of {sorted(OPTIMIZER_STATES)}, got {optimizer!r}")
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {list(PRECISIONS)}, got {precision!r}")


def _autocast(dtype, device):
    """torch.autocast to `dtype` on `device`'s type; no-op for dtype None (fp32)."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def _amp_dtype(precision):
    """The autocast dtype of a memory precision: amp_* autocast, fp32 and pure bf16 do not."""
    return PRECISIONS[precision] if precision.startswith("amp_") else None


def _checkpoint_blocks(model):
    """Recompute each block in backward: torch.utils.checkpoint around the elements of the model's
    outermost nn.Sequential / nn.ModuleList containers (the model itself if it is one).
    Only for replicas: it sets `forward` on the blocks.  Returns the number of blocks wrapped."""
    containers = [model] if isinstance(model, (nn.Sequential, nn.ModuleList)) else []

    def visit(module):
        for child in module.children():
            if isinstance(child, (nn.Sequential, nn.ModuleList)) and len(child) > 1:
                containers.append(child)
            else:
                visit(child)

    if not containers:
        visit(model)
    blocks = [b for c in containers for b in c if any(True for _ in b.parameters())]
    for block in blocks:
        block.forward = functools.partial(_checkpointed, block.forward)
    return len(blocks)


def _checkpointed(forward, *args, **kwargs):
    from torch.utils.checkpoint import checkpoint
    return checkpoint(forward, *args, use_reentrant=False, **kwargs)


class _StorageTracker(TorchDispatchMode):
    """Follows every tensor storage that ops create, and when each one is freed.

    Storages are told apart by identity (views and in-place results share one), freed through a
    weakref finalizer, and logged as +/- events so categories can be decided after the step.
    """

    def __init__(self):
        super().__init__()
        self.phase = "setup"
        self.info = []         # key -> [nbytes, phase created in, category or None]
        self.live = {}         # id(storage) -> key, for storages alive now
        self.events = []       # (key, +1 alloc / -1 free) in order
        self.phase_start = {}  # phase -> index into events
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

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        # autocast's low-precision copy of a weight, cached for the whole forward
        category = "weight_copies" if func is torch.ops.aten._to_copy.default and \
            isinstance(args[0], nn.Parameter) else None
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.layout == torch.strided:
                self.add(t, category)
        return out

    def close(self):
        for finalizer in self._finalizers:
            finalizer.detach()


def _categorize(tracker, gradient_keys):
    """Name each storage: given categories, gradients, activations (made in forward and still
    alive when backward starts) or temporary (everything else)."""
    forward_end = tracker.phase_start.get("backward", len(tracker.events))
    freed_at = {key: i for i, (key, sign) in enumerate(tracker.events) if sign < 0}
    for key, entry in enumerate(tracker.info):
        if entry[2]:
            continue
        if key in gradient_keys:
            entry[2] = "gradients"
        elif entry[1] == "forward" and freed_at.get(key, math.inf) >= forward_end:
            entry[2] = "activations"
        else:
            entry[2] = "temporary"


MEMORY_PARTS = ("parameters", "buffers", "inputs", "optimizer", "gradients", "activations", "weight_copies",
                "temporary")


def _replay(tracker):
    """Replay alloc/free events: the peak, what was live at it, and the phase it fell in."""
    live, by_cat = 0, Counter()
    peak, at_peak, peak_index = 0, Counter(), 0
    for i, (key, sign) in enumerate(tracker.events):
        nbytes, _, category = tracker.info[key]
        live += sign * nbytes
        by_cat[category] += sign * nbytes
        if live > peak:
            peak, at_peak, peak_index = live, Counter(by_cat), i
    phases = sorted(tracker.phase_start.items(), key=lambda kv: kv[1])
    peak_phase = next((p for p, start in reversed(phases) if start <= peak_index), "setup")
    return peak, {part: int(at_peak[part]) for part in MEMORY_PARTS}, peak_phase


def _memory_summary(tracker, gradient_keys):
    _categorize(tracker, gradient_keys)
    peak, at_peak, peak_phase = _replay(tracker)
    sizes = Counter()
    for nbytes, _, category in tracker.info:
        sizes[category] += nbytes
    result = {part: int(sizes[part]) for part in MEMORY_PARTS}
    # parts that live all step are their full size; temporary is what was live at the peak
    result["temporary"] = at_peak["temporary"]
    result.update(total=int(peak), at_peak=at_peak, peak_phase=peak_phase)
    return result


class _LayerOutputs:
    """Sum of every leaf module's output bytes in one forward: the napkin activation estimate."""

    def __init__(self):
        self.nbytes = 0

    def __call__(self, module, args, output):
        if next(module.children(), None) is None:
            self.nbytes += sum(t.numel() * t.element_size() for t in tree_flatten(output)[0]
                               if isinstance(t, torch.Tensor))


def _model_state(replica, optimizer):
    """(category, tensor) for every parameter, buffer and optimizer-state tensor."""
    yield from (("parameters", p) for p in replica.parameters())
    yield from (("buffers", b) for b in replica.buffers())
    for state in (optimizer.state.values() if optimizer else ()):
        yield from (("optimizer", v) for v in state.values() if isinstance(v, torch.Tensor))


def _register_step_state(tracker, replica, optimizer, run_args, run_kwargs):
    """Tensors alive before the step starts, each in its category."""
    for category, tensor in _model_state(replica, optimizer):
        tracker.add(tensor, category)
    for x in tree_flatten((run_args, run_kwargs))[0]:
        if isinstance(x, torch.Tensor):
            tracker.add(x, "inputs")


def _train_step(replica, run_args, run_kwargs, optimizer, precision, device, *, compute=None, tracker=None):
    """One training step: forward (under autocast for AMP), backward, optimizer.step(), zero_grad.

    `compute` is the context forward and backward run in (FakeTensorMode when estimating); the
    optimizer runs outside it so its CPU step counters stay real numbers.  Returns the storage
    keys of the gradients when `tracker` is given.
    """
    tracking = tracker if tracker is not None else contextlib.nullcontext()
    phase = tracker.set_phase if tracker is not None else (lambda name: None)
    with compute or contextlib.nullcontext(), tracking:
        phase("forward")
        with _autocast(_amp_dtype(precision), device):
            output = replica(*run_args, **run_kwargs)
        phase("backward")
        loss = _scalar_loss(output)
        del output
        if loss is None:
            raise ValueError(f"{type(replica).__name__} has no output that requires grad: nothing to train")
        loss.backward()
        del loss
        grads = {tracker.add(p.grad) for p in replica.parameters() if p.grad is not None} if tracker else set()
    with tracking:
        phase("optimizer")
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return grads


def _memory_run(model, args, kwargs, options, *, make, device, compute=None, foreach=None):
    """Run one tracked step (or inference forward) on a replica; return the summary dict."""
    replica = _replica(model, make)
    blocks = _checkpoint_blocks(replica) if options["checkpointing"] else 0
    with compute or contextlib.nullcontext():
        run_args, run_kwargs = _map_tensors((args, kwargs), make)
    tracker, layers = _StorageTracker(), _LayerOutputs()
    try:
        if options["training"]:
            optimizer = _make_optimizer(options["optimizer_name"], replica.parameters(), foreach=foreach)
            _train_step(replica, run_args, run_kwargs, optimizer, options["precision"], device, compute=compute)
            _register_step_state(tracker, replica, optimizer, run_args, run_kwargs)
            with _global_forward_hook(layers):
                grads = _train_step(replica, run_args, run_kwargs, optimizer, options["precision"], device,
                                    compute=compute, tracker=tracker)
        else:
            _register_step_state(tracker, replica, None, run_args, run_kwargs)
            grads = set()
            with compute or contextlib.nullcontext(), tracker, torch.inference_mode(), \
                    _global_forward_hook(layers), _autocast(_amp_dtype(options["precision"]), device):
                tracker.set_phase("forward")
                replica(*run_args, **run_kwargs)
        summary = _memory_summary(tracker, grads)
    finally:
        tracker.close()
    if not options["training"]:  # the forward's working set is its activations
        summary["activations"] = summary["total"] - summary["parameters"] - summary["buffers"] - summary["inputs"]
        summary["temporary"] = 0
    summary["formula"] = _napkin_memory(model, options, layers.nbytes)
    summary["checkpointed_blocks"] = blocks
    return summary


@contextlib.contextmanager
def _global_forward_hook(hook):
    handle = nn.modules.module.register_module_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def _napkin_memory(model, options, layer_output_bytes):
    """The lecture's formulas: params x bytes, grads = params, optimizer = k x params, activations
    = the sum of every layer's output."""
    n = sum(p.numel() for p in model.parameters() if p.requires_grad)
    bytes_per_param = 2 if options["precision"] == "bf16" else 4  # AMP keeps fp32 weights
    parameters = sum(p.numel() for p in model.parameters()) * bytes_per_param
    training = options["training"]
    formula = {
        "parameters": parameters,
        "gradients": n * bytes_per_param if training else 0,
        "optimizer": OPTIMIZER_STATES[options["optimizer_name"]] * n * bytes_per_param if training else 0,
        "activations": layer_output_bytes,
    }
    formula["total"] = sum(formula.values())
    return formula


@contextlib.contextmanager
def _quiet_fake_tensor_logs():
    """FakeTensorMode logs a traceback for a shape error even when it is caught: silence it."""
    import logging
    logger = logging.getLogger("torch._subclasses.fake_tensor")
    was_disabled, logger.disabled = logger.disabled, True
    try:
        yield
    finally:
        logger.disabled = was_disabled


def _memory_options(model, inputs, training, optimizer, precision, checkpointing, device):
    _check_model(model)
    _check_memory_options(optimizer, precision)
    args, kwargs = _normalize_inputs(inputs)
    device = torch.device(device) if device is not None else _model_device(model)
    options = {"training": bool(training), "optimizer_name": optimizer, "precision": precision,
               "checkpointing": bool(checkpointing)}
    return args, kwargs, device, options


def estimate_memory(model, inputs, *, training=True, optimizer="adam", precision="fp32",
                    checkpointing=False, device=None):
    """Predict the memory of one training step (or inference forward) without real arithmetic.

    Runs the step on fake tensors of the target device (default: the model's; CPU for a model
    on meta): the same kernels are chosen as in a real run (e.g. CPU flash attention, autocast
    casts) but no memory is allocated.  Returns bytes per part, `total` (the peak), `at_peak`,
    `peak_phase` and the napkin `formula` terms.
    """
    from torch._subclasses.fake_tensor import FakeTensorMode
    args, kwargs, device, options = _memory_options(model, inputs, training, optimizer, precision,
                                                    checkpointing, device)
    if device.type == "meta":
        device = torch.device("cpu")
    fake_mode = FakeTensorMode(allow_non_fake_inputs=True)
    dtype = torch.bfloat16 if precision == "bf16" else None

    def make(x):
        with fake_mode:
            cast = dtype if (dtype is not None and x.is_floating_point()) else x.dtype
            return torch.empty_like(x, device=device, dtype=cast)
    try:
        with _quiet_fake_tensor_logs():
            result = _memory_run(model, args, kwargs, options, make=make, device=device, compute=fake_mode,
                                 foreach=(device.type == "cuda"))  # CUDA's default is foreach
    except Exception as err:
        raise _run_error(model, args, kwargs, err) from None
    return {**result, **options, "device": str(device), "method": f"fake tensors on {device.type}"}


def measure_memory(model, inputs, *, training=True, optimizer="adam", precision="fp32",
                   checkpointing=False, device=None):
    """Run one real step (or inference forward) on a copy of the model and measure its memory.

    CUDA: the caching allocator's peak (torch.cuda.max_memory_allocated) for `total`; CPU and
    MPS: the peak of live tensor storages followed through a dispatch mode.  The parts come from
    the storage tracker on every device.
    """
    args, kwargs, device, options = _memory_options(model, inputs, training, optimizer, precision,
                                                    checkpointing, device)
    if device.type == "meta":
        raise ValueError("measure_memory needs real weights; the model is on the meta device "
                         "(use estimate_memory, or pass device='cpu' after materialising it)")
    make = _real_like(device, torch.bfloat16 if precision == "bf16" else None)
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
    try:
        result = _memory_run(model, args, kwargs, options, make=make, device=device)
    except Exception as err:
        raise _run_error(model, args, kwargs, err) from None
    method = "live tensor storages (dispatch-mode tracker)"
    if cuda:  # NB: includes the warm-up step's peak, which a steady step matches or exceeds
        torch.cuda.synchronize(device)
        result["tracked_total"] = result["total"]
        result["total"] = torch.cuda.max_memory_allocated(device) - before
        method = "CUDA caching allocator (max_memory_allocated)"
    return {**result, **options, "device": str(device), "method": method}


# ZeRO (Rajbhandari et al. 2020, Sec. 3 / Fig. 1): mixed-precision Adam holds per parameter
# 2 bytes fp16 weights + 2 bytes fp16 grads + K = 12 bytes of fp32 master weights, m and v.
ZERO_WEIGHT_BYTES, ZERO_GRAD_BYTES, ZERO_OPTIMIZER_BYTES = 2, 2, 12


def zero_memory_per_device(parameters, devices):
    """Bytes per device of model states (no activations) under DDP and ZeRO stages 1-3."""
    w, g, k = ZERO_WEIGHT_BYTES, ZERO_GRAD_BYTES, ZERO_OPTIMIZER_BYTES
    return {
        "DDP": parameters * (w + g + k),
        "ZeRO-1": parameters * (w + g + k / devices),      # optimizer states sharded
        "ZeRO-2": parameters * (w + (g + k) / devices),    # + gradients sharded
        "ZeRO-3": parameters * (w + g + k) / devices,      # + parameters sharded
    }


# name -> (builder, inputs(batch)): the models of the memory figure, small enough to measure.
MEMORY_MODELS = {
    "MLP-2048": (functools.partial(mlp, 2048), lambda b: (b, 1024)),
    "MNIST-CNN": (MnistNet, lambda b: (b, 1, 28, 28)),
    "ResNet-18 (64px)": (_torchvision("resnet18"), lambda b: (b, 3, 64, 64)),
    "TinyGPT (T=64)": (TinyGPT, lambda b: torch.zeros(b, 64, dtype=torch.long)),
}


def _memory_pair(model, inputs, **options):
    return {"estimate": estimate_memory(model, inputs, **options),
            "measured": measure_memory(model, inputs, **options)}


def run_memory_analysis(*, quick=False, device=None, batch=None, progress=None):
    """Estimate and measure training/inference memory of MEMORY_MODELS; return plain data."""
    device = torch.device(device or "cpu")
    batch = batch or (8 if quick else 16)
    data = {"device": _device_name(device), "batch": batch, "optimizer": "adam", "dtype": "fp32", "models": {}}
    names = list(MEMORY_MODELS)
    for i, name in enumerate(names):
        builder, inputs = MEMORY_MODELS[name]
        with torch.device(device):
            model = builder()
        data["models"][name] = {"training": _memory_pair(model, inputs(batch)),
                                "inference": _memory_pair(model, inputs(batch), training=False)}
        if name == "TinyGPT (T=64)":
            gpt, gpt_inputs = model, inputs
        if progress:
            progress(i + 1, len(names) + 2, name)
    data["growth"] = _memory_growth(gpt, gpt_inputs, [1, 4] if quick else [1, 4, 16])
    if progress:
        progress(len(names) + 1, len(names) + 2, "batch growth")
    data["variants"] = _memory_variants(gpt, gpt_inputs(batch))
    data["gpt_parameters"] = sum(p.numel() for p in gpt.parameters())
    seven_b = 7_000_000_000
    data["zero"] = {"parameters": seven_b, "devices": 8, "per_device": zero_memory_per_device(seven_b, 8)}
    if progress:
        progress(len(names) + 2, len(names) + 2, "precision and sharding")
    return data


def _memory_growth(model, inputs, measured_batches):
    batches = sorted({1, 2, 4, 8, 16, 32, 64, *measured_batches})
    estimates = [estimate_memory(model, inputs(b)) for b in batches]
    return {
        "batches": batches,
        "estimated_total": [e["total"] for e in estimates],
        "fixed": [e["parameters"] + e["buffers"] + e["gradients"] + e["optimizer"] for e in estimates],
        "measured_batches": list(measured_batches),
        "measured_total": [measure_memory(model, inputs(b))["total"] for b in measured_batches],
    }


MEMORY_VARIANTS = {  # label -> estimate_memory options
    "fp32": {}, "AMP bf16": {"precision": "amp_bf16"}, "AMP fp16": {"precision": "amp_fp16"},
    "pure bf16": {"precision": "bf16"}, "fp32 + checkpoint": {"checkpointing": True},
    "AMP bf16 + checkpoint": {"precision": "amp_bf16", "checkpointing": True},
}


def _memory_variants(model, inputs):
    return {label: estimate_memory(model, inputs, **opts)["total"] for label, opts in MEMORY_VARIANTS.items()}


def _device_name(device):
    device = torch.device(device)
    if device.type == "cuda":
        return f"cuda ({torch.cuda.get_device_name(device)})"
    if device.type == "cpu":
        return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
    return device.type


# -----------------------------------------------------------------------------
# Mixed-precision timing harness
# -----------------------------------------------------------------------------

AMP_DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
MAX_TIMED_RUNS = 10


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
        return ["fp32", "fp16"] + (["bf16"] if torch.cuda.is_bf16_supported() else [])
    if device.type == "mps":
        return ["fp32", "fp16"]
    return ["fp32", "bf16", "fp16"]


def _slow_low_precision_reason(device, precision):
    """Why a low precision can be slower than fp32 here, from what the hardware reports."""
    device = torch.device(device)
    if device.type == "cpu":
        flags = cpu_flags()
        if precision == "bf16" and not (flags["avx512_bf16"] or flags["amx_bf16"]):
            return "this CPU has neither AVX512-BF16 nor AMX: bf16 math is converted to fp32 in software"
        if precision == "fp16" and not flags["amx_bf16"]:
            return "this CPU has no native fp16 matmul (AMX-FP16): fp16 math is converted in software"
    return None


def _synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def _matmul_slowdown(device, precision, size=128, reps=3):
    """Time one size x size matmul under autocast vs fp32: a cheap predictor of a step's slowdown."""
    a = torch.randn(size, size, device=device)

    def time_it(ctx):
        with ctx:
            a @ a  # warm-up
            _synchronize(device)
            start = time.perf_counter()
            for _ in range(reps):
                a @ a
            _synchronize(device)
        return (time.perf_counter() - start) / reps
    fp32 = time_it(contextlib.nullcontext())
    low = time_it(torch.autocast(device.type, dtype=AMP_DTYPES[precision]))
    return low / max(fp32, 1e-9)


class _AmpTrainer:
    """One copy of the model trained in one precision: forward under autocast, GradScaler for
    fp16 on CUDA (torch.amp.GradScaler("cuda")), Adam."""

    def __init__(self, model, run_args, run_kwargs, precision, device, training):
        self.replica = _replica(model, _real_like(device))
        self.args, self.kwargs = run_args, run_kwargs
        self.precision, self.device, self.training = precision, device, training
        self.dtype = AMP_DTYPES[precision]
        self.optimizer = torch.optim.Adam(self.replica.parameters(), lr=1e-4) if training else None
        use_scaler = precision == "fp16" and device.type == "cuda"
        self.scaler = torch.amp.GradScaler("cuda") if use_scaler else None

    def forward(self):
        with _autocast(self.dtype, self.device):
            return self.replica(*self.args, **self.kwargs)

    def step(self, tracker=None):
        if not self.training:
            with torch.inference_mode():
                self.forward()
            return
        output = self.forward()
        if tracker is not None:
            tracker.set_phase("backward")
        loss = _scalar_loss(output)
        del output
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            loss.backward()
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def outputs(self):
        with torch.no_grad():
            leaves = [x for x in tree_flatten(self.forward())[0] if isinstance(x, torch.Tensor)]
        return [x.detach().float() for x in leaves if x.is_floating_point()]


def _max_rel_error(outputs, reference):
    """max |out - ref| / max |ref| over all output tensors."""
    scale = max(float(r.abs().max()) for r in reference) or 1.0
    return max(float((o - r).abs().max()) for o, r in zip(outputs, reference)) / scale


def _tracked_memory(trainer):
    """(peak bytes, activation bytes) of one step, from the storage tracker."""
    tracker = _StorageTracker()
    _register_step_state(tracker, trainer.replica, trainer.optimizer, trainer.args, trainer.kwargs)
    try:
        with tracker:
            tracker.set_phase("forward")
            trainer.step(tracker)
        summary = _memory_summary(tracker, set())
        return summary["total"], summary["activations"]
    finally:
        tracker.close()


def _time_runs(trainer, runs, deadline):
    """Time up to `runs` steps (at least one), stopping at `deadline`; synchronise around each.

    NB: torch.utils.benchmark.Timer would do the same per run, but gives no way to stop at a
    deadline between runs; this loop keeps the thread count torch already uses.
    """
    times = []
    while len(times) < runs and (not times or time.perf_counter() < deadline):
        _synchronize(trainer.device)
        start = time.perf_counter()
        trainer.step()
        _synchronize(trainer.device)
        times.append(time.perf_counter() - start)
    return times


def benchmark_mixed_precision(model, inputs, *, device=None, precisions=None, training=True, time_budget_s=30):
    """Time a training step (or a forward) of `model` in fp32 and each low precision.

    Returns one record per precision: median_s, iqr_s, runs, peak_memory_bytes, speedup_vs_fp32
    (below 1 is a slowdown), max_rel_error_vs_fp32 (outputs), skipped (reason or None), note,
    and the hardware it ran on.  The whole call stays within `time_budget_s`: each precision gets
    an equal share of what is left, a cheap matmul probe predicts how slow a low precision will
    be, and a precision predicted to overrun its share is skipped with that reason.
    """
    _check_model(model)
    if not (isinstance(time_budget_s, (int, float)) and time_budget_s > 0):
        raise ValueError(f"time_budget_s must be a positive number of seconds, got {time_budget_s!r}")
    device = torch.device(device) if device is not None else _model_device(model)
    if device.type == "meta":
        raise ValueError("benchmark_mixed_precision needs real weights; the model is on the meta device")
    precisions = list(precisions or supported_precisions(device))
    unknown = [p for p in precisions if p not in AMP_DTYPES]
    if unknown:
        raise ValueError(f"precisions must be among {list(AMP_DTYPES)}, got {unknown}")
    precisions = ["fp32"] + [p for p in precisions if p != "fp32"]  # fp32 is the reference
    args, kwargs = _normalize_inputs(inputs)
    run_args, run_kwargs = _map_tensors((args, kwargs), _real_like(device))
    deadline = time.perf_counter() + time_budget_s
    hardware = hardware_info(device)
    records, reference = [], None
    for i, precision in enumerate(precisions):
        share = (deadline - time.perf_counter()) / (len(precisions) - i)
        try:
            record = _benchmark_one(model, run_args, run_kwargs, precision, device, training, share, reference)
        except Exception as err:
            if i == 0:
                raise _run_error(model, args, kwargs, err) from None
            record = _skipped(precision, f"failed: {_first_line(err)}")
        if precision == "fp32":
            reference = record
        records.append({**record, "device": str(device), "training": training, "hardware": hardware})
    return records


def _skipped(precision, reason):
    return {"precision": precision, "median_s": None, "iqr_s": None, "runs": 0, "peak_memory_bytes": None,
            "activation_bytes": None, "speedup_vs_fp32": None, "max_rel_error_vs_fp32": None,
            "skipped": reason, "note": None,
            "times_s": []}


def _benchmark_one(model, run_args, run_kwargs, precision, device, training, share_s, reference):
    if precision not in supported_precisions(device):
        return _skipped(precision, f"autocast {precision} is not supported on {device.type}")
    slow_reason = _slow_low_precision_reason(device, precision)
    if share_s <= 0:
        return _skipped(precision, "the time budget was used up before this precision")
    if reference is not None and reference["median_s"]:
        factor = _matmul_slowdown(device, precision)
        predicted = reference["median_s"] * factor
        if predicted > share_s / 2:  # warm-up + at least one timed step must fit
            return _skipped(precision, f"predicted {predicted:.2f} s per step ({factor:.0f}x fp32 in a matmul "
                                       f"probe) does not fit its {share_s:.1f} s share of the budget"
                                       + (f"; {slow_reason}" if slow_reason else ""))
    start = time.perf_counter()
    trainer = _AmpTrainer(model, run_args, run_kwargs, precision, device, training)
    outputs = trainer.outputs()
    trainer.step()  # warm-up: allocator, autocast caches, optimizer state, lazy imports
    _synchronize(device)
    second = time.perf_counter()
    if share_s - (second - start) > 2 * (second - start) / 2:  # a second warm-up predicts a step better
        trainer.step()
        _synchronize(device)
    step_s = max(time.perf_counter() - second, 1e-6)
    left = share_s - (time.perf_counter() - start)
    runs = int(min(MAX_TIMED_RUNS + 1, left // (1.1 * step_s)))  # 10% for timer overhead
    peak, activations = _peak_memory(trainer, device) if runs >= 4 else (None, None)  # costs one step
    runs = max(1, min(runs - (1 if peak is not None else 0), MAX_TIMED_RUNS))
    times = _time_runs(trainer, runs, deadline=start + share_s)
    runs = len(times)
    median = float(np.median(times))
    q75, q25 = np.percentile(times, [75, 25])
    error = _max_rel_error(outputs, reference["outputs"]) if reference else 0.0
    speedup = reference["median_s"] / median if reference else 1.0
    note = None
    if speedup < 1 and slow_reason:
        note = f"{1 / speedup:.1f}x slower than fp32: {slow_reason}"
    elif runs < 3:
        note = f"only {runs} timed run(s) fit the budget"
    return {"precision": precision, "median_s": median, "iqr_s": float(q75 - q25), "runs": runs,
            "peak_memory_bytes": peak, "activation_bytes": activations, "speedup_vs_fp32": speedup,
            "max_rel_error_vs_fp32": error,
            "skipped": None, "note": note, "times_s": times, "outputs": outputs}


def _peak_memory(trainer, device):
    """(peak, activation) bytes of one untimed step; on CUDA the peak is the allocator's."""
    if device.type == "cuda":
        _synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        trainer.step()
        _synchronize(device)
        peak = torch.cuda.max_memory_allocated(device) - before + _state_bytes(trainer)
        return peak, _tracked_memory(trainer)[1]
    return _tracked_memory(trainer)


def _state_bytes(trainer):
    return sum(t.numel() * t.element_size() for _, t in _model_state(trainer.replica, trainer.optimizer))


# name -> (builder, inputs(batch)) for the mixed-precision figure: sizes from tiny to a few M params.
AMP_MODELS = {
    "MLP-1024": (functools.partial(mlp, 1024), lambda b: (b, 1024)),
    "MLP-4096": (functools.partial(mlp, 4096), lambda b: (b, 1024)),
    "TinyGPT (T=64)": (TinyGPT, lambda b: torch.zeros(b, 64, dtype=torch.long)),
}


def run_amp_analysis(*, quick=False, device=None, batch=None, time_budget_s=None, seed=0, progress=None):
    """Run benchmark_mixed_precision on AMP_MODELS within `time_budget_s` in all; return plain data."""
    device = torch.device(device or "cpu")
    batch = batch or (16 if quick else 32)
    budget = time_budget_s or (4.0 if quick else 15.0)
    names = list(AMP_MODELS)[:2] if quick else list(AMP_MODELS)
    deadline = time.perf_counter() + budget
    data = {"device": _device_name(device), "batch": batch, "hardware": hardware_info(device), "models": {}}
    for i, name in enumerate(names):
        builder, inputs = AMP_MODELS[name]
        seed_everything(seed)
        with torch.device(device):
            model = builder()
        share = max((deadline - time.perf_counter()) / (len(names) - i), 0.2)
        records = benchmark_mixed_precision(model, inputs(batch), device=device, time_budget_s=share)
        data["models"][name] = [{k: v for k, v in r.items() if k not in ("outputs", "hardware")} for r in records]
        if progress:
            progress(i + 1, len(names), name)
    data["ranges"] = dtype_ranges()
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


# -----------------------------------------------------------------------------
# Plotting: each function turns data into a Figure; save_figure writes it
# -----------------------------------------------------------------------------

KIND_COLORS = {"mlp": "#4C72B0", "cnn": "#55A868", "transformer": "#C44E52", "rnn": "#8172B2"}

def _suptitle(fig, title, subtitle):
    """Title on the first line, the conditions of the numbers (device, dtype, batch) below it."""
    fig.suptitle(f"{title}\n{subtitle}", fontsize=14, linespacing=1.6)


def _kind_color(kind):
    return KIND_COLORS.get(kind, "#777777")


def _barh(ax, names, values, colors, *, log=False, fmt=None, inside=False):
    """Horizontal bars with their value printed at the end of each bar (or just inside it)."""
    y = np.arange(len(names))
    ax.barh(y, values, color=colors)
    ax.set_yticks(y, names)
    ax.invert_yaxis()
    if log:
        ax.set_xscale("log")
    for yi, value in zip(y, values):
        if fmt:
            ax.annotate(fmt(value), (value, yi), xytext=(-3 if inside else 3, 0), textcoords="offset points",
                        va="center", ha="right" if inside else "left", fontsize=8,
                        color="white" if inside else "black")
    ax.margins(x=0.25 if not log else 0.05)
    if log:
        lo, hi = min(v for v in values if v > 0), max(values)
        ax.set_xlim(lo / 3, hi * 30)


def _kind_legend(ax, kinds, loc="lower right"):
    from matplotlib.patches import Patch
    handles = [Patch(color=_kind_color(k), label=_t(f"kind_{k}")) for k in dict.fromkeys(kinds)]
    ax.legend(handles=handles, loc=loc, fontsize=8)


def _plot_flop_bars(ax, records):
    names = [r["name"] for r in records]
    y = np.arange(len(records))
    ax.barh(y - 0.2, [r["flops"] for r in records], height=0.4, color="#4C72B0", label=_t("matmul_flops"))
    ax.barh(y + 0.2, [max(r["other_flops"], 1) for r in records], height=0.4, color="#DD8452",
            label=_t("other_flops"))
    for yi, r in zip(y, records):
        ax.annotate(readable(r["flops"]), (r["flops"], yi - 0.2), xytext=(3, 0), textcoords="offset points",
                    va="center", fontsize=7)
    ax.set_yticks(y, names)
    ax.invert_yaxis()
    ax.set_xscale("log")
    ax.set_xlim(min(r["other_flops"] for r in records) / 3, max(r["flops"] for r in records) * 40)
    ax.set_title(_t("flop_bars"))
    ax.legend(fontsize=8, loc="upper right")


def _plot_param_bars(ax, records):
    _barh(ax, [r["name"] for r in records], [r["parameters"] for r in records],
          [_kind_color(r["kind"]) for r in records], log=True, fmt=readable)
    ax.set_title(_t("params_bars"))
    _kind_legend(ax, [r["kind"] for r in records])


def _plot_flops_vs_params(ax, records):
    params = np.array([r["parameters"] for r in records], dtype=float)
    flops = np.array([r["flops"] for r in records], dtype=float)
    ax.scatter(params, flops, s=60, c=[_kind_color(r["kind"]) for r in records], zorder=3)
    for r, x, y in zip(records, params, flops):
        ax.annotate(r["name"], (x, y), xytext=(4, 4), textcoords="offset points", fontsize=7)
    line = np.array([params.min() / 2, params.max() * 2])
    ax.plot(line, 2 * line * records[0]["batch"], "k--", lw=1, label=_t("ratio_2x"))
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel(_t("parameters"))
    ax.set_ylabel(_t("fwd_flops_axis"))
    ax.set_title(_t("flops_vs_params"))
    ax.legend(fontsize=8, loc="upper left")
    ax.text(0.98, 0.03, _t("reuse_note"), transform=ax.transAxes, ha="right", fontsize=8, style="italic")


def _plot_flops_per_param(ax, records):
    per_param = [r["flops"] / r["batch"] / r["parameters"] for r in records]
    _barh(ax, [r["name"] for r in records], per_param, [_kind_color(r["kind"]) for r in records],
          log=True, fmt=lambda v: f"{v:,.0f}")
    ax.axvline(2, color="k", ls="--", lw=1)
    ax.set_title(_t("flops_per_param"))


def _plot_training_ratio(ax, records):
    ratios = [r["training_flops"] / r["flops"] for r in records]
    _barh(ax, [r["name"] for r in records], ratios, [_kind_color(r["kind"]) for r in records],
          fmt=lambda v: f"{v:.2f}×", inside=True)
    ax.axvline(3, color="k", ls="--", lw=1, label=_t("ratio_3x"))
    ax.set_xlim(0, 3.6)
    ax.set_title(_t("train_ratio"))
    ax.legend(fontsize=8, loc="lower left")


def _plot_flop_composition(ax, records):
    names = [r["name"] for r in records]
    left = np.zeros(len(records))
    colors = ["#4C72B0", "#55A868", "#C44E52", "#8172B2"]
    for cls, color in zip(WORK_CLASSES, colors):
        share = np.array([100 * r["by_class"][cls] / max(r["flops"], 1) for r in records])
        ax.barh(names, share, left=left, color=color, label=_t(f"cls_{cls.split('/')[0]}"))
        left += share
    ax.invert_yaxis()
    ax.set_xlim(0, 100)
    ax.set_title(_t("flop_composition"))
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.07), ncol=4)


def plot_flop_analysis(records):
    """Six panels from `run_flop_analysis` records; returns the Figure."""
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


def visualize_flop_analysis(output_dir=DEFAULT_OUTPUT_DIR, *, records=None, quick=False, batch=1, dpi=120):
    """Count the model zoo and draw FLOP分析可视化.png into `output_dir` (None: don't save)."""
    records = records or run_flop_analysis(quick=quick, batch=batch)
    fig = plot_flop_analysis(records)
    _save_into(fig, output_dir, "flop", dpi)
    return fig


MEMORY_COLORS = {"parameters": "#4C72B0", "gradients": "#DD8452", "optimizer": "#55A868",
                 "activations": "#C44E52", "temporary": "#8172B2", "buffers": "#937860"}
MIB, GIB = 2 ** 20, 2 ** 30


def _plot_memory_composition(ax, models):
    names = list(models)
    x = np.arange(len(names))
    for offset, source in ((-0.2, "formula"), (0.2, "at_peak")):
        bottom = np.zeros(len(names))
        for part in ("parameters", "gradients", "optimizer", "activations", "temporary", "buffers"):
            values = []
            for name in names:
                estimate = models[name]["training"]["estimate"]
                parts = estimate["formula"] if source == "formula" else estimate["at_peak"]
                value = parts.get(part, 0) + (parts.get("inputs", 0) if part == "buffers" else 0)
                values.append(value / MIB)
            ax.bar(x + offset, values, 0.38, bottom=bottom, color=MEMORY_COLORS[part],
                   label=_t(f"{part}_part") if source == "at_peak" else None,
                   hatch="//" if source == "formula" else None, edgecolor="white", linewidth=0.5)
            bottom += values
    measured = [models[n]["training"]["measured"]["total"] / MIB for n in names]
    ax.scatter(x + 0.2, measured, marker="D", s=50, color="black", zorder=3, label=_t("measured_peak"))
    ax.set_ylim(0, 1.12 * max(max(measured), *(models[n]["training"]["estimate"]["formula"]["total"] / MIB
                                                for n in names)))
    ax.set_xticks(x, names, fontsize=8)
    ax.set_ylabel(_t("mib"))
    ax.set_title(_t("mem_composition"))
    ax.legend(fontsize=7, loc="upper left")


def _plot_train_vs_inference(ax, models):
    names = list(models)
    x = np.arange(len(names))
    train = [models[n]["training"]["measured"]["total"] / MIB for n in names]
    infer = [models[n]["inference"]["measured"]["total"] / MIB for n in names]
    ax.bar(x - 0.2, train, 0.4, color="#C44E52", label=_t("training"))
    ax.bar(x + 0.2, infer, 0.4, color="#4C72B0", label=_t("inference"))
    for xi, t, i in zip(x, train, infer):
        ax.annotate(f"{t / i:.1f}×", (xi - 0.2, t), xytext=(0, 2), textcoords="offset points", ha="center",
                    fontsize=8)
    ax.set_xticks(x, names, fontsize=8)
    ax.set_ylabel(_t("mib"))
    ax.set_title(_t("train_vs_infer"))
    ax.legend(fontsize=8)


def _plot_memory_growth(ax, growth, model_name):
    ax.plot(growth["batches"], np.array(growth["estimated_total"]) / MIB, "o-", color="#C44E52",
            label=_t("estimated_total"))
    ax.plot(growth["batches"], np.array(growth["fixed"]) / MIB, "--", color="#4C72B0", label=_t("fixed_part"))
    ax.scatter(growth["measured_batches"], np.array(growth["measured_total"]) / MIB, marker="D", s=60,
               color="black", zorder=3, label=_t("measured_points"))
    ax.set_xlabel(_t("batch_size"))
    ax.set_ylabel(_t("mib"))
    ax.set_ylim(bottom=0)
    ax.set_title(_t("mem_growth", model=model_name))
    ax.legend(fontsize=8, loc="upper left")


def _plot_memory_variants(ax, variants, parameters, model_name, batch):
    labels = list(variants)
    per_param = [variants[label] / parameters for label in labels]
    _barh(ax, labels, per_param, ["#4C72B0", "#55A868", "#64B5CD", "#8172B2", "#C44E52", "#DD8452"],
          fmt=lambda v: f"{v:.1f} B")
    ax.set_xlabel(_t("bytes_per_param"))
    ax.set_title(_t("mem_variants", model=model_name, batch=batch))


def _plot_zero(ax, zero):
    labels = list(zero["per_device"])
    values = [v / GIB for v in zero["per_device"].values()]
    ax.bar(labels, values, color=["#777777", "#4C72B0", "#55A868", "#C44E52"])
    for i, v in enumerate(values):
        ax.annotate(f"{v:.1f}", (i, v), xytext=(0, 2), textcoords="offset points", ha="center", fontsize=8)
    ax.axhline(80, color="k", ls="--", lw=1, label=_t("gpu_80gb"))
    ax.set_ylabel(_t("gib"))
    ax.set_title(_t("zero_title", n=zero["devices"]))
    ax.text(0.98, 0.6, _t("zero_note"), transform=ax.transAxes, ha="right", fontsize=8, style="italic",
            wrap=True)
    ax.legend(fontsize=8)


def _plot_memory_error(ax, models):
    names = list(models)
    x = np.arange(len(names))
    for offset, key, color in ((-0.2, "napkin", "#DD8452"), (0.2, "estimate", "#4C72B0")):
        errors = []
        for name in names:
            pair = models[name]["training"]
            measured = pair["measured"]["total"]
            predicted = pair["estimate"]["formula"]["total"] if key == "napkin" else pair["estimate"]["total"]
            errors.append(100 * (predicted - measured) / measured)
        ax.bar(x + offset, errors, 0.4, color=color, label=_t(key))
        for xi, e in zip(x, errors):
            ax.annotate(f"{e:+.1f}%", (xi + offset, e), xytext=(0, 2 if e >= 0 else -10),
                        textcoords="offset points", ha="center", fontsize=8)
    ax.axhline(0, color="k", lw=0.8)
    ax.set_xticks(x, names, fontsize=8)
    ax.set_ylabel("%")
    ax.set_title(_t("mem_error"))
    ax.margins(y=0.12)
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.07), ncol=2)


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


def visualize_memory_analysis(output_dir=DEFAULT_OUTPUT_DIR, *, data=None, quick=False, device=None, dpi=120):
    """Estimate and measure memory, and draw 内存分析可视化.png into `output_dir` (None: don't save)."""
    data = data or run_memory_analysis(quick=quick, device=device)
    fig = plot_memory_analysis(data)
    _save_into(fig, output_dir, "memory", dpi)
    return fig


PRECISION_COLORS = {"fp32": "#4C72B0", "bf16": "#55A868", "fp16": "#C44E52"}


def _amp_matrix(models, key):
    """{precision: [value per model]} with None where the precision was skipped."""
    precisions = list(AMP_DTYPES)
    return {p: [next((r[key] for r in recs if r["precision"] == p and not r["skipped"]), None)
                for recs in models.values()] for p in precisions}


def _grouped_bars(ax, names, matrix, *, log=False, fmt=None):
    x = np.arange(len(names))
    width = 0.8 / len(matrix)
    for j, (precision, values) in enumerate(matrix.items()):
        xs = x + (j - (len(matrix) - 1) / 2) * width
        heights = [v if v is not None else 0 for v in values]
        ax.bar(xs, heights, width, color=PRECISION_COLORS[precision], label=precision)
        for xi, v in zip(xs, values):
            text = _t("skipped") if v is None else (fmt(v) if fmt else None)
            if text:
                ax.annotate(text, (xi, v if v else 0), xytext=(0, 2), textcoords="offset points", ha="center",
                            fontsize=7, rotation=90 if v is None else 0, va="bottom")
    ax.set_xticks(x, names, fontsize=8)
    if log:
        ax.set_yscale("log")
    ax.legend(fontsize=8)


def _plot_amp_time(ax, models):
    names = list(models)
    med = _amp_matrix(models, "median_s")
    _grouped_bars(ax, names, med, log=True, fmt=lambda v: f"{v * 1e3:.1f}ms")
    iqr = _amp_matrix(models, "iqr_s")
    width = 0.8 / len(med)
    for j, p in enumerate(med):
        xs = np.arange(len(names)) + (j - (len(med) - 1) / 2) * width
        for xi, m, q in zip(xs, med[p], iqr[p]):
            if m is not None:
                ax.errorbar(xi, m, yerr=[[min(q / 2, m * 0.9)], [q / 2]], color="k", capsize=2, lw=0.8)
    ax.set_ylabel(_t("seconds"))
    ax.set_title(_t("amp_time"))


def _plot_amp_memory(ax, models):
    _grouped_bars(ax, list(models), {p: [v / MIB if v else None for v in vals]
                                     for p, vals in _amp_matrix(models, "peak_memory_bytes").items()},
                  fmt=lambda v: f"{v:.0f}")
    ax.set_ylabel(_t("mib"))
    ax.set_title(_t("amp_memory"))


def _plot_amp_speedup(ax, models):
    matrix = {p: v for p, v in _amp_matrix(models, "speedup_vs_fp32").items() if p != "fp32"}
    _grouped_bars(ax, list(models), matrix, log=True, fmt=lambda v: f"{v:.2f}×")
    from matplotlib.ticker import FuncFormatter, NullFormatter
    ax.axhline(1, color="k", lw=1)
    ax.axhspan(2, 3, color="#999999", alpha=0.2, label=_t("lit_mark"))
    ax.set_ylim(min([v for vals in matrix.values() for v in vals if v] + [0.5]) / 2, 6)
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}×"))
    ax.yaxis.set_minor_formatter(NullFormatter())
    ax.set_title(_t("amp_speedup"))
    ax.legend(fontsize=7, loc="upper left")


def _plot_amp_saving(ax, models):
    peaks = _amp_matrix(models, "activation_bytes")
    matrix = {p: [100 * (1 - v / f) if (v and f) else None for v, f in zip(peaks[p], peaks["fp32"])]
              for p in peaks if p != "fp32"}
    _grouped_bars(ax, list(models), matrix, fmt=lambda v: f"{v:+.1f}%")
    ax.axhline(0, color="k", lw=0.8)
    ax.set_ylabel("%")
    ax.set_title(_t("amp_saving"))


def _plot_amp_error(ax, models):
    matrix = {p: v for p, v in _amp_matrix(models, "max_rel_error_vs_fp32").items() if p != "fp32"}
    _grouped_bars(ax, list(models), matrix, log=True, fmt=lambda v: f"{v:.1e}")
    ax.set_title(_t("amp_error"))


def _plot_dtype_ranges(ax, ranges):
    names = list(ranges["dtypes"])
    for i, name in enumerate(names):
        r = ranges["dtypes"][name]
        lo, hi = math.log10(r["smallest_subnormal"]), math.log10(r["max"])
        ax.barh(i, hi - lo, left=lo, color=PRECISION_COLORS[name], alpha=0.8)
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
    flags = [f"{k}={'yes' if v else 'no'}" for k, v in hw.items() if k in ("avx512_bf16", "amx_bf16", "bf16_supported")
             and v is not None]
    return ", ".join([f"torch {hw['torch']}", f"{hw['threads']} threads", f"TF32={hw['tf32_matmul']}"] + flags)


def plot_amp_analysis(data):
    """Six panels from `run_amp_analysis` data; returns the Figure."""
    import matplotlib.pyplot as plt
    with _figure_style():
        fig, axs = plt.subplots(2, 3, figsize=(19, 11), layout="constrained")
        _plot_amp_time(axs[0, 0], data["models"])
        _plot_amp_memory(axs[0, 1], data["models"])
        _plot_amp_speedup(axs[0, 2], data["models"])
        _plot_amp_saving(axs[1, 0], data["models"])
        _plot_amp_error(axs[1, 1], data["models"])
        _plot_dtype_ranges(axs[1, 2], data["ranges"])
        _suptitle(fig, _t("amp_title"), _t("amp_sub", device=data["device"], batch=data["batch"],
                                           support=_hardware_support(data["hardware"])))
    return fig


def demonstrate_mixed_precision_benefits(output_dir=DEFAULT_OUTPUT_DIR, *, data=None, quick=False, device=None,
                                         dpi=120):
    """Measure fp32 vs bf16/fp16 on this machine and draw 混合精度效益对比.png (None: don't save)."""
    data = data or run_amp_analysis(quick=quick, device=device)
    fig = plot_amp_analysis(data)
    _save_into(fig, output_dir, "amp", dpi)
    return fig


def _save_into(fig, output_dir, key, dpi):
    if output_dir is not None:
        Path(output_dir).mkdir(parents=True, exist_ok=True)
        save_figure(fig, Path(output_dir) / FIGURE_FILES[key], dpi=dpi)


# -----------------------------------------------------------------------------
# CLI / main()
# -----------------------------------------------------------------------------

STAGES = ("flop", "memory", "amp")  # in the order they run


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
    parser.add_argument("--dpi", type=int, default=120, help="PNG resolution")
    args = parser.parse_args(argv)
    stages = [s.strip() for s in args.only.split(",") if s.strip()]
    unknown = [s for s in stages if s not in STAGES]
    if unknown or not stages:
        parser.error(f"--only takes a comma-separated subset of {','.join(STAGES)}; got {args.only!r}")
    args.only = [s for s in STAGES if s in stages]
    if args.dpi <= 0:
        parser.error("--dpi must be a positive integer")
    return args


def _resolve_device(name):
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        return torch.device("mps") if torch.backends.mps.is_available() else torch.device("cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device is available here")
    if name == "mps" and not torch.backends.mps.is_available():
        raise ValueError("--device mps: no MPS device is available here")
    return torch.device(name)


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
        print(f"  [{stage}] {done}/{total} {name} ({time.perf_counter() - started:.1f}s)", flush=True)
    return report


def _run_stage(stage, args, device, out):
    started = time.perf_counter()
    report = _progress(stage, started)
    if stage == "flop":
        data = run_flop_analysis(quick=args.quick, progress=report)
        visualize_flop_analysis(out, records=data, dpi=args.dpi)
    elif stage == "memory":
        data = run_memory_analysis(quick=args.quick, device=device, progress=report)
        visualize_memory_analysis(out, data=data, dpi=args.dpi)
    else:
        data = run_amp_analysis(quick=args.quick, device=device, seed=args.seed, progress=report)
        demonstrate_mixed_precision_benefits(out, data=data, dpi=args.dpi)
    return data


def environment(device, seed):
    return {"device": _device_name(device), "torch": torch.__version__, "python": platform.python_version(),
            "threads": torch.get_num_threads(), "cpu": cpu_flags(), "seed": seed,
            "cpu_capability": torch.backends.cpu.get_cpu_capability()}


def main(argv=None):
    """Run the selected demos in order; write their PNGs and results.json.  Returns an exit code:
    0 all done, 1 a demo failed (the others still ran), 2 bad options or unusable output/device."""
    args = parse_args(argv)
    try:
        device = _resolve_device(args.device)
        _check_writable(args.output_dir)
        set_language(args.lang)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    seed_everything(args.seed)
    out = Path(args.output_dir)
    results = {"environment": environment(device, args.seed), "quick": args.quick, "stages": {}}
    failed, started = [], time.perf_counter()
    for stage in args.only:
        stage_start = time.perf_counter()
        print(f"[{stage}] {FIGURE_FILES[stage]} ...", flush=True)
        try:
            results["stages"][stage] = _run_stage(stage, args, device, out)
            print(f"[{stage}] done in {time.perf_counter() - stage_start:.1f}s", flush=True)
        except Exception as err:  # one failing demo must not stop the others
            failed.append(stage)
            results["stages"][stage] = {"error": f"{type(err).__name__}: {_first_line(err)}"}
            print(f"[{stage}] FAILED: {type(err).__name__}: {_first_line(err)}", file=sys.stderr, flush=True)
    results["wall_s"] = time.perf_counter() - started
    write_json_atomic(results, out / "results.json")
    print(f"wrote {len(args.only) - len(failed)} figure(s) and results.json to {out} "
          f"in {results['wall_s']:.1f}s", flush=True)
    if failed:
        print(f"failed stage(s): {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
