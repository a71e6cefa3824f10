"""A second family: torchvision's resnet18 trained with stochastic depth against constant depth, then pruned.

Trains `torchvision:resnet18` on CIFAR-10 at 32x32 twice with the same recipe and epochs (`--survival-rule
linear --p-last 0.5`, and `--survival-rule none`), then prunes both at each keep fraction with each strategy
(`stats`, `every-other`, `sensitivity`), and the constant-depth one also by drop effects measured without
training (`sdcompress stats --measure`, then `prune --strategy stats`). Every step is the user's own command
(`sdcompress.cli.main`), so the table's rows can be reproduced one by one. Accuracy is on the 5,000-image
validation split held out of the training folder. Training resumes where it stopped (`--resume`), and finished
prune reports are reused, so a rerun continues.

    python tools/bench_family.py --data ../shared/data/cifar10/train --out runs/bench-family

Why resnet18: it is the fastest torchvision residual network on this CPU at 32x32 (its ImageNet stem brings
32x32 to 8x8 before the first block); the depthwise networks train slower here (FACTS.md, measured while another job shared the CPU: resnet18 about
190 img/s, mobilenet_v2 63, efficientnet_b0 13, batch 128 at 32x32).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sdcompress.cli import main as sdcompress  # noqa: E402

ARCH = "torchvision:resnet18"
RULES = {"sd": ["--survival-rule", "linear", "--p-last", "0.5"], "constant": ["--survival-rule", "none"]}


def run(argv: list[str]) -> None:
    print("$ sdcompress " + " ".join(argv), flush=True)
    t0 = time.perf_counter()
    rc = sdcompress(argv)
    if rc != 0:
        raise SystemExit(f"sdcompress {argv[0]} exited {rc}")
    print(f"  ({time.perf_counter() - t0:.0f} s)", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", required=True, help="the CIFAR-10 training folder (ImageFolder layout)")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--epochs", type=int, default=15)
    ap.add_argument("--train-limit", type=int, default=20000, help="training images used (of the 45,000 of the split)")
    ap.add_argument("--keeps", default="0.8,0.6,0.4")
    ap.add_argument("--strategies", default="stats,every-other,sensitivity")
    a = ap.parse_args()
    a.out.mkdir(parents=True, exist_ok=True)
    common = ["--arch", ARCH, "--data", a.data, "--epochs", str(a.epochs), "--train-limit", str(a.train_limit), "--no-progress"]
    ckpts = {}
    for name, rule in RULES.items():
        ckpt = a.out / f"resnet18-{name}"
        state = ckpt / "train_state.pt"
        done = (ckpt / "model.json").exists() and json.loads((ckpt / "model.json").read_text())["metrics"]["epochs"] >= a.epochs
        if not done:
            run(["train", *common, *rule, "--out", str(ckpt), *(["--resume"] if state.exists() else [])])
        ckpts[name] = ckpt
    measured = a.out / "resnet18-constant-measured"
    if not (measured / "model.json").exists():
        run(["stats", str(ckpts["constant"]), "--measure", "--data", a.data, "--out", str(measured), "--no-plot"])
    ckpts["constant, measured"] = measured

    rows = []
    for name, ckpt in ckpts.items():
        side = json.loads((ckpt / "model.json").read_text())
        rows.append({"model": name, "keep": 1.0, "strategy": "-", "blocks": len(side["spec"]["blocks_kept"]),
                     "top1": side["metrics"].get("val_top1") if name != "constant, measured" else None})
        strategies = ["stats"] if name == "constant, measured" else a.strategies.split(",")
        for keep in a.keeps.split(","):
            for strat in strategies:
                out = a.out / f"{ckpt.name}-keep{keep}-{strat}"
                if not (out / "report.json").exists():
                    run(["prune", str(ckpt), "--keep", keep, "--strategy", strat, "--data", a.data, "--out", str(out),
                         "--force", "--no-progress"])
                rep = json.loads((out / "report.json").read_text())
                rows.append({"model": name, "keep": float(keep), "strategy": strat, "blocks": len(rep["after"]["model"]["blocks_kept"]),
                             "top1": rep["after"]["accuracy"]["top1"], "ranked_by": rep["prune"]["ranking"]["by"],
                             "params": rep["after"]["params"]["total"], "macs": rep["after"]["macs"]})
    lines = ["| model | keep | strategy | blocks | top-1 (5k val) | ranked by |", "|---|---|---|---|---|---|"]
    for r in rows:
        top1 = f"{100 * r['top1']:.1f}%" if r["top1"] is not None else "-"
        lines.append(f"| {r['model']} | {r['keep']} | {r['strategy']} | {r['blocks']} | {top1} | {r.get('ranked_by', '-')} |")
    table = "\n".join(lines)
    (a.out / "bench_family.json").write_text(json.dumps(rows, indent=1))
    (a.out / "bench_family.md").write_text(table + "\n")
    print(table)


if __name__ == "__main__":
    main()
