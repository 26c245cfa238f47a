"""Speed and memory goals of pytorch_practice_demo, measured on this machine.

    python benchmarks/bench.py            # every case, each in its own process (clean peak RSS)
    python benchmarks/bench.py flops      # one group: flops, memory, run

Goals (from the issues): analyze_model on resnet50@8 vs one real forward under FlopCounterMode
<= 1.0; analyze_model time at batch 256 vs batch 1 <= 1.5; a ~5B-parameter transformer built on
the meta device analysed in <= 10 s; memory estimate within 10% of measurement; default run
<= 45 s and <= 1.5 GB peak RSS, --quick <= 15 s.
"""

import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def peak_rss_mb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KB on Linux


def timed(fn, repeats=3):
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


# --- cases: each prints one JSON line -------------------------------------------------------

def case_resnet50_ratio():
    import torch
    import torchvision
    from torch.utils.flop_counter import FlopCounterMode

    from pytorch_practice_demo import FLOPCalculator
    model = torchvision.models.resnet50(weights=None)
    x = torch.randn(8, 3, 224, 224)

    def real_forward():
        with FlopCounterMode(display=False):
            model(x)

    calc = FLOPCalculator()
    ours = timed(lambda: calc.analyze_model(model, (8, 3, 224, 224)))
    reference = timed(real_forward)
    return {"analyze_model_s": ours, "real_forward_flopcountermode_s": reference,
            "ratio": ours / reference, "goal": "<= 1.0"}


def case_batch_scaling():
    import torchvision

    from pytorch_practice_demo import FLOPCalculator
    model = torchvision.models.resnet50(weights=None)
    calc = FLOPCalculator()
    t1 = timed(lambda: calc.analyze_model(model, (1, 3, 224, 224)))
    t256 = timed(lambda: calc.analyze_model(model, (256, 3, 224, 224)))
    return {"batch1_s": t1, "batch256_s": t256, "ratio": t256 / t1, "goal": "<= 1.5"}


def case_meta_5b():
    import torch

    from pytorch_practice_demo import FLOPCalculator, TinyGPT
    start = time.perf_counter()
    with torch.device("meta"):
        model = TinyGPT(vocab_size=50304, n_layer=32, n_embd=4096, n_head=32, block_size=2048)
    r = FLOPCalculator().analyze_model(model, torch.zeros(1, 2048, dtype=torch.long, device="meta"))
    return {"parameters": r["parameters"], "flops": r["flops"], "training_flops": r["training_flops"],
            "time_s": time.perf_counter() - start, "peak_rss_mb": peak_rss_mb(), "goal": "<= 10 s"}


def case_memory_error_table():
    import torch

    from pytorch_practice_demo import MnistNet, TinyGPT, estimate_memory, measure_memory, mlp
    models = {"mlp": (lambda: mlp(512), lambda b: (b, 1024)),
              "cnn": (MnistNet, lambda b: (b, 1, 28, 28)),
              "transformer": (lambda: TinyGPT(vocab_size=512, n_layer=2, n_embd=128, n_head=4, block_size=64),
                              lambda b: torch.zeros(b, 64, dtype=torch.long))}
    rows = []
    for name, (make, inputs) in models.items():
        model = make()
        for batch in (8, 64):
            for optimizer in ("adam", "sgd"):
                for ckpt in (False, True):
                    e = estimate_memory(model, inputs(batch), optimizer=optimizer, checkpointing=ckpt)
                    m = measure_memory(model, inputs(batch), optimizer=optimizer, checkpointing=ckpt)
                    rows.append(f"{name:11s} b={batch:<3d} {optimizer:4s} ckpt={ckpt!s:5s} "
                                f"est={e['total']:>11,d} meas={m['total']:>11,d} "
                                f"err={(e['total'] - m['total']) / m['total']:+.2%} "
                                f"napkin_err={(e['formula']['total'] - m['total']) / m['total']:+.1%}")
    return {"rows": rows}


def case_memory_speed():
    import torch

    from pytorch_practice_demo import TinyGPT, estimate_memory, measure_memory
    model = TinyGPT()
    x = torch.zeros(64, 64, dtype=torch.long)
    estimate_memory(model, torch.zeros(1, 64, dtype=torch.long))  # first use of FakeTensorMode
    est = timed(lambda: estimate_memory(model, x), repeats=1)
    meas = timed(lambda: measure_memory(model, x), repeats=1)
    return {"model": "TinyGPT (4x256, T=64)", "batch": 64, "estimate_s": est, "measure_s": meas}


def _cli_run(*options):
    """python pytorch_practice_demo.py in a child process: wall time (with imports) and its peak RSS."""
    import tempfile
    with tempfile.TemporaryDirectory() as out:
        start = time.perf_counter()
        proc = subprocess.run([sys.executable, str(ROOT / "pytorch_practice_demo.py"), *options, "--output-dir", out],
                              capture_output=True, text=True)
        wall = time.perf_counter() - start
        stages = [line for line in proc.stdout.splitlines() if line.startswith("[") and "done in" in line]
    rss_mb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    return {"exit": proc.returncode, "wall_s": round(wall, 1), "peak_rss_mb": round(rss_mb), "stages": stages}


def case_default_run():
    return {**_cli_run(), "goal": "<= 45 s, <= 1500 MB"}


def case_quick_run():
    return {**_cli_run("--quick"), "goal": "<= 15 s"}


GROUPS = {"flops": [case_resnet50_ratio, case_batch_scaling, case_meta_5b],
          "memory": [case_memory_error_table, case_memory_speed],
          "run": [case_default_run, case_quick_run]}


def machine():
    import torch
    return {"python": platform.python_version(), "torch": torch.__version__, "cpu": platform.processor()
            or platform.machine(), "cores": os.cpu_count(), "threads": torch.get_num_threads(),
            "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None}


def main(argv):
    if argv and argv[0] == "--case":
        fn = next(f for fs in GROUPS.values() for f in fs if f.__name__ == argv[1])
        print(json.dumps(fn()))
        return 0
    groups = argv or list(GROUPS)
    print("machine:", json.dumps(machine()))
    for group in groups:
        for fn in GROUPS[group]:
            out = subprocess.run([sys.executable, __file__, "--case", fn.__name__], capture_output=True,
                                 text=True, cwd=ROOT)
            result = out.stdout.strip().splitlines()[-1] if out.returncode == 0 else out.stderr[-800:]
            if result.startswith('{"rows"'):
                result = "\n  " + "\n  ".join(json.loads(result)["rows"])
            print(f"{group}/{fn.__name__[5:]}: {result}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
