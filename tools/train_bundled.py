"""Train the bundled models: resnet56 with stochastic depth (linear, p_L 0.5), its constant-depth control, and
the small-net control resnet32 at constant depth (15 blocks, about as many as keep 0.6 of resnet56 leaves).

All use `sdcompress train` itself with the same recipe and epochs and run side by side on one device. The
number of epochs is chosen to fit a wall-clock budget, from a short measurement of the step time:

    python tools/train_bundled.py --data-dir ../shared/data/cifar10 --out runs/bundled --budget-s 540 --recipe fast

`--recipe paper` is the stochastic depth paper's (batch 128, lr 0.1, no warmup); `--recipe fast` the fast
CIFAR-10 trainers' (batch 512, lr 0.4 scaled with the batch, 2 warmup epochs, label smoothing 0.1, each residual
branch compiled); every run at `--precision auto` (bf16 autocast and channels_last where the device runs bf16
fast). Each run checkpoints every epoch; rerunning the same
command resumes every unfinished run from its last epoch with the epochs it started with.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from sdcompress.nets import NetSpec, build_model  # noqa: E402
from sdcompress.loops import resolve_device, train_step  # noqa: E402
from sdcompress.precision import resolve_precision, to_layout  # noqa: E402

MODELS = {"resnet56-sd": ("resnet56", "linear", 0.5), "resnet56-constant": ("resnet56", "none", 0.5),
          "resnet32-constant": ("resnet32", "none", 0.5)}
# with --start: a fourth run, the survival schedule aimed at keep 0.6 (linear to p_L 0.2: about 60% of the blocks
# run in an average step, as many as keep 0.6 leaves)
AIMED = {"resnet56-sd-pl02": ("resnet56", "linear", 0.2)}
# the pretrained networks each run starts from with --start (the peer's files, trained elsewhere, see models/*/README.md)
PEER_FILES = {"resnet56": "resnet56-4bfd9763.th", "resnet32": "resnet32-d509ac18.th"}
PEER_NORM = ["--mean", "0.485,0.456,0.406", "--std", "0.229,0.224,0.225"]  # the peer's trainer normalizes with ImageNet's
RECIPES = {
    "paper": [],
    # from pretrained weights: a fifth of the paper's learning rate, the pretrained network's weight decay
    "retrofit": ["--lr", "0.02", "--weight-decay", "1e-4"],
    "fast": ["--batch-size", "512", "--lr", "0.4", "--warmup-epochs", "2", "--label-smoothing", "0.1", "--compile", "on"],
}


def step_time(arch: str, device: torch.device, batch: int, steps: int = 30) -> float:
    """Seconds per training step of the constant-depth network (the slower of the two)."""
    cuda = device.type == "cuda"
    prec = resolve_precision("auto", device)  # what the runs will use
    torch.manual_seed(0)
    model = to_layout(build_model(NetSpec(arch, 3, 10, "none", 0.5)).to(device), prec.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    x = prec.layout(torch.randn(batch, 3, 32, 32, device=device))
    y = torch.randint(0, 10, (batch,), device=device)
    for i in range(steps + 5):
        if i == 5:
            if cuda:
                torch.cuda.synchronize()
            t0 = time.perf_counter()
        train_step(opt, lambda x, y, step: F.cross_entropy(model(x).float(), y), x, y, i, prec, device)
    if cuda:
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) / steps


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--recipe", choices=list(RECIPES), default="paper")
    ap.add_argument("--data", default="cifar10")
    ap.add_argument("--data-dir", default=None, help="folder of the torchvision dataset (with --data cifar10)")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--budget-s", type=float, default=540.0, help="wall-clock budget for the three runs together (ignored with --epochs)")
    ap.add_argument("--epochs", type=int, default=None, help="fix the epochs instead of fitting the budget")
    ap.add_argument("--max-epochs", type=int, default=300)
    ap.add_argument("--train-images", type=int, default=None,
                    help="train on this many images of the training split (default all 45,000; a few thousand prove the path)")
    ap.add_argument("--overlap", type=float, default=None,
                    help="assumed slowdown of running the runs at once (default 1.8 on CPU; on a GPU, their number: one GPU's "
                         "time is shared)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--start", type=Path, default=None,
                    help="folder of the pretrained CIFAR ResNets to retrofit (the peer's .th files); adds the aimed schedule run")
    ap.add_argument("--deadline-s", type=float, default=None,
                    help="stop every run still going after this many seconds (each keeps its last complete epoch: --resume continues)")
    ap.add_argument("--extra", nargs=argparse.REMAINDER, default=[], help="more flags for sdcompress train")
    args = ap.parse_args()
    device = resolve_device(args.device)
    models = {**MODELS, **(AIMED if args.start else {})}
    flags = RECIPES[args.recipe] + args.extra
    batch = next((int(flags[i + 1]) for i, a in enumerate(flags) if a == "--batch-size"), 128)
    if args.train_images:
        flags += ["--train-limit", str(args.train_images)]
    if args.epochs:
        epochs = args.epochs
        print(f"{epochs} epochs (fixed)", flush=True)
    else:
        t = step_time("resnet56", device, batch)
        steps = (args.train_images or 45000) // batch
        load_s = 60.0 + (90.0 if "--compile" in flags else 0.0)  # decoding the data and starting up (compiling), per run
        overlap = args.overlap if args.overlap else (len(models) if device.type == "cuda" else 1.8)
        per_epoch = steps * t * overlap + 2.0  # + validation
        epochs = max(1, min(args.max_epochs, math.floor((args.budget_s - load_s) / per_epoch)))
        print(f"step {t * 1e3:.1f} ms on {device}; epoch about {per_epoch:.1f} s with all running; {epochs} epochs", flush=True)
    procs = {}
    for name, (arch, rule, p_last) in models.items():
        run_dir = args.out / name
        resume = (run_dir / "train_state.pt").exists()
        run_epochs = epochs
        if resume:  # continue with the epochs it started with (the schedule depends on them)
            side = json.loads((run_dir / "model.json").read_text())
            run_epochs = side["stages"][0]["config"]["epochs"]
            if side["metrics"]["epochs"] >= run_epochs:
                print(f"{name}: finished ({run_epochs} epochs)", flush=True)
                continue
        # warm-up of at most half the run (the recipe's 2 epochs need runs longer than 4)
        run_flags = [(f"{min(float(v), run_epochs / 2):g}" if i and flags[i - 1] == "--warmup-epochs" else v) for i, v in enumerate(flags)]
        cmd = [sys.executable, "-m", "sdcompress", "train", "--arch", arch, "--data", args.data, *(["--data-dir", args.data_dir] if args.data_dir else []),
               "--epochs", str(run_epochs), "--schedule", "cosine", "--survival-rule", rule, "--p-last", str(p_last),
               "--device", args.device, "--out", str(run_dir), "--resume" if resume else "--force", "--no-progress", *run_flags]
        if args.start:
            cmd += ["--weights", str(args.start / PEER_FILES[arch]), *PEER_NORM]
        print(" ".join(cmd[1:]), flush=True)
        procs[name] = subprocess.Popen(cmd, cwd=ROOT, env={**os.environ, "PYTHONUNBUFFERED": "1"}, stderr=subprocess.STDOUT)
    t0 = time.perf_counter()
    codes = {}
    for name, p in procs.items():
        left = None if args.deadline_s is None else max(1.0, args.deadline_s - (time.perf_counter() - t0))
        try:
            codes[name] = p.wait(timeout=left)
        except subprocess.TimeoutExpired:
            print(f"{name}: past the deadline, stopped (its last complete epoch is kept; rerun to resume)", flush=True)
            p.terminate()
            p.wait()
            codes[name] = 1  # unfinished: not a success, whatever the signal left as its code
    print(f"done in {time.perf_counter() - t0:.0f} s: {codes}", flush=True)
    sys.exit(max(codes.values(), default=0))


if __name__ == "__main__":
    main()
