"""Accuracy after pruning, for every keep ratio, strategy and recalibration choice, on held-out images.

Runs the bundled stochastic-depth ResNet-56 and its constant-depth control (same architecture, recipe and
epochs) through `sdcompress.pruning`: blocks chosen by each strategy, removed, then evaluated with and without
BatchNorm recalibration (on the bundled calibration set: training-split images). The sensitivity strategy
measures its loss on those training images too, never on the evaluation images. These are all of --test-dir
(`../shared/data/cifar10-test`, which no bundled model trained on), or, without it, the 5,000-image validation
split of --data-dir (seen by the pretrained networks the bundled models start from). Results are cached in
OUT/bench_prune.json (a rerun skips what is done); OUT/bench_prune.md and OUT/bench_prune.png are the table and
the plot.

    python tools/bench_prune.py --data-dir ../shared/data/cifar10 --test-dir ../shared/data/cifar10-test --out runs/bench-prune
"""

from __future__ import annotations

import argparse
import json

import torch
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sdcompress.checkpoint import load_checkpoint  # noqa: E402

from sdcompress.files import atomic_write_bytes, atomic_write_json  # noqa: E402
from sdcompress.data import Normalize, _decode_folder, load_dataset, load_eval_set  # noqa: E402
from sdcompress.data import train_augmentation  # noqa: E402
from sdcompress.loops import batch_loss, evaluate, recalibrate_bn  # noqa: E402
from sdcompress.pruning import STRATEGIES, PruneConfig, blocks_to_remove, remove_blocks, sensitivity_order  # noqa: E402
from sdcompress.zoo import bundled, bundled_calib_set  # noqa: E402

MODELS = ("resnet56-sd", "resnet56-constant")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data-dir", required=True)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--test-dir", help="evaluate on all images of this ImageFolder (default: the validation split of --data-dir)")
    ap.add_argument("--keeps", default="1.0,0.9,0.8,0.7,0.6,0.5,0.4")
    ap.add_argument("--strategies", default=",".join(STRATEGIES))
    ap.add_argument("--recalibrate", type=int, default=PruneConfig().recalibrate)
    ap.add_argument("--sensitivity-batches", type=int, default=2)
    args = ap.parse_args()
    keeps = [float(k) for k in args.keeps.split(",")]
    strategies = args.strategies.split(",")
    cache = args.out / "bench_prune.json"
    results = json.loads(cache.read_text()) if cache.exists() else {}
    calib = load_eval_set(bundled_calib_set())
    val = _decode_folder(Path(args.test_dir))[0] if args.test_dir else None
    where = f"all {len(val):,} images of {args.test_dir}" if val is not None else "the 5,000-image validation split"
    # the cheap strategies for both models first, the greedy sensitivity search last
    plan = [(n, [s for s in strategies if s != "sensitivity"]) for n in MODELS]
    plan += [(n, ["sensitivity"]) for n in MODELS if "sensitivity" in strategies]
    for name, model_strategies in plan:
        model, meta = load_checkpoint(bundled(name))
        norm = Normalize(meta.data.mean, meta.data.std)
        if val is None:
            sp = meta.data.split
            val = load_dataset("cifar10", args.data_dir, sp["val_size"], sp["seed"]).val
        sens = calib.subset(slice(0, args.sensitivity_batches * 128))
        order = None
        for strategy in model_strategies:
            for keep in keeps:
                key = f"{name}|{strategy}|{keep}"
                if key in results:
                    continue
                t0 = time.perf_counter()
                cfg = PruneConfig(keep=keep, strategy=strategy)
                if strategy == "sensitivity":  # greedy and nested: one order serves every keep ratio
                    n = len(model.block_ids)
                    if order is None:
                        order = sensitivity_order(model, model.block_ids, n - int(min(keeps) * n + 0.5),
                                                  lambda m: batch_loss(m, sens, norm, args.sensitivity_batches, 128))
                    removed = order[: n - int(keep * n + 0.5)]
                else:
                    removed = blocks_to_remove(model, meta, cfg)
                pruned = remove_blocks(model, removed).eval().to(memory_format=torch.channels_last)  # faster on CPU
                plain = evaluate(pruned, val, norm)["top1"]
                recalibrate_bn(pruned, calib, norm, args.recalibrate, 128, 0, *train_augmentation(meta))
                recal = evaluate(pruned, val, norm)["top1"]
                results[key] = {"model": name, "strategy": strategy, "keep": keep, "blocks": len(pruned.block_ids),
                                "removed": sorted(removed), "top1": plain, "top1_recal": recal}
                atomic_write_json(cache, results)
                print(f"{name:18} {strategy:12} keep {keep:.1f} ({len(pruned.block_ids):2} blocks)  top-1 {100 * plain:5.1f}%  "
                      f"recalibrated {100 * recal:5.1f}%  [{time.perf_counter() - t0:.0f} s]", flush=True)
    write_outputs(results, keeps, strategies, args.out, where)


def write_outputs(results: dict, keeps: list[float], strategies: list[str], out: Path, where: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lines = ["| model | strategy | recalibrated | " + " | ".join(f"keep {k}" for k in keeps) + " |",
             "|---|---|---|" + "---|" * len(keeps)]
    for name in MODELS:
        for strategy in strategies:
            for recal in (False, True):
                vals = [results.get(f"{name}|{strategy}|{k}") for k in keeps]
                cells = [f"{100 * v['top1_recal' if recal else 'top1']:.1f}" if v else "-" for v in vals]
                lines.append(f"| {name} | {strategy} | {'yes' if recal else 'no'} | " + " | ".join(cells) + " |")
    blocks = [results.get(f"{MODELS[0]}|{strategies[0]}|{k}", {}).get("blocks") for k in keeps]
    text = (f"Top-1 (%) on {where} after removing blocks "
            f"(blocks kept: {', '.join(str(b) for b in blocks)}).\n\n" + "\n".join(lines) + "\n")
    atomic_write_bytes(out / "bench_prune.md", text.encode())
    print(text)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    for ax, name in zip(axes, MODELS):
        for i, strategy in enumerate(strategies):
            for recal, style in ((True, "-"), (False, ":")):
                ys = [results.get(f"{name}|{strategy}|{k}") for k in keeps]
                ax.plot(keeps, [100 * y["top1_recal" if recal else "top1"] if y else float("nan") for y in ys], style,
                        color=f"C{i}", marker="o", ms=3, label=f"{strategy}{' + BN recal' if recal else ''}")
        ax.set_title(name)
        ax.set_xlabel("keep (fraction of blocks)")
        ax.invert_xaxis()
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("top-1 (%)")
    axes[1].legend(fontsize=7)
    fig.tight_layout()
    import io

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    atomic_write_bytes(out / "bench_prune.png", buf.getvalue())


if __name__ == "__main__":
    main()
