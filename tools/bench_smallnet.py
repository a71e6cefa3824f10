"""Is a deep network pruned to a small one worth it? The depth-pruned ResNet-56 against a ResNet-32 trained
directly and against the same ResNet-56 channel-pruned by Torch-Pruning to the same MACs, all fine-tuned the same
epochs: top-1, parameters, MACs, `.ort` bytes and onnxruntime latency, timed together in one run.

    sdcompress prune --keep 0.6 --finetune 2 --data ../shared/data/cifar10 --out runs/ft/sd-k06-ft2
    sdcompress prune models/resnet32-constant --keep 1.0 --finetune 2 --teacher models/resnet56-sd \
        --data ../shared/data/cifar10 --out runs/ft/r32-ft2
    python tools/bench_smallnet.py --depth runs/ft/sd-k06-ft2 --small runs/ft/r32-ft2 --finetune 2 --out runs/smallnet

The channel-pruned model is made here (kept under --out, so a rerun only times): Torch-Pruning 1.6
(`torch_pruning.pruner.BasePruner` with `GroupMagnitudeImportance(p=2)`, one uniform ratio per layer and widths
rounded to multiples of 8 for speed, as its README shows) removes channels of --full until its MACs are at most
those of --depth; a second row without the rounding (closer to the MACs, not fine-tuned) shows what odd widths cost. Its README's call, with only the
classifier left out, fails on these networks: the option-A shortcut zero-pads the residual stream's channels, and
its dependency graph cannot follow the pad (IndexError). So the stem, the classifier and each block's last
convolution (the residual stream) are left out, and the inner width of every block is pruned: the usual way to
channel-prune a ResNet with parameter-free shortcuts. Then, as `prune` does for removed blocks, BatchNorm is
re-estimated on 40 training batches and the model is fine-tuned --finetune epochs with `sdcompress.finetune`
(distilled from --full, lr 0.01 cosine, T 4, alpha 0.9: the recipe of `prune --finetune`) on the 45,000-image
training split. Top-1 is on all of --test-dir; latency is onnxruntime on the CPU, batch 1, --threads threads, every
file in the same interleaved rounds; medians.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import sdcompress  # noqa: E402
from sdcompress.checkpoint import load_checkpoint  # noqa: E402
from sdcompress.data import ImageBatches, Normalize, _decode_folder, load_dataset  # noqa: E402
from sdcompress.loops import evaluate  # noqa: E402
from sdcompress.exporters import onnx as ex  # noqa: E402

SHARED = ROOT.parent / "shared"


def macs(model, x) -> int:
    return int(sdcompress.footprint(model, x)["totals"]["macs"]["total"])


def channel_pruned(full, x, ratio: float, round_to: int | None):
    """A copy of `full` with the inner width of every block pruned by `ratio` (Torch-Pruning, magnitude), each width
    a multiple of `round_to` (None: any)."""
    import torch_pruning as tp

    model = copy.deepcopy(full).eval()
    ignored = [model.stem, model.fc] + [b.conv2 for b in model.blocks.values() if hasattr(b, "conv2")]
    pruner = tp.pruner.BasePruner(model, x[:1], importance=tp.importance.GroupMagnitudeImportance(p=2),
                                  pruning_ratio=ratio, ignored_layers=ignored, round_to=round_to)
    pruner.step()
    return model


def ratio_for(full, x, target: int, round_to: int | None) -> float:
    """The smallest ratio (to 1e-3) whose channel-pruned model has at most `target` MACs."""
    lo, hi = 0.0, 0.95
    while hi - lo > 1e-3:
        mid = (lo + hi) / 2
        lo, hi = (lo, mid) if macs(channel_pruned(full, x, mid, round_to), x) <= target else (mid, hi)
    return round(hi, 4)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--depth", required=True, help="the depth-pruned (fine-tuned) checkpoint")
    ap.add_argument("--small", required=True, help="the small network's (fine-tuned) checkpoint")
    ap.add_argument("--full", default=str(ROOT / "models" / "resnet56-sd"), help="the network both were cut from")
    ap.add_argument("--finetune", type=int, default=2, help="fine-tuning epochs of the channel-pruned model")
    ap.add_argument("--data-dir", default=str(SHARED / "data" / "cifar10"))
    ap.add_argument("--test-dir", default=str(SHARED / "data" / "cifar10-test"))
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--runs", type=int, default=50)
    ap.add_argument("--out", type=Path, required=True)
    a = ap.parse_args()
    a.out.mkdir(parents=True, exist_ok=True)

    full, meta = load_checkpoint(a.full)
    full.eval()
    mean, std = meta.data.mean, meta.data.std
    test_images = _decode_folder(Path(a.test_dir), list(meta.data.classes))[0]
    x = ImageBatches(test_images, mean, std, 64, train=False).__iter__().__next__()[0]

    def top1(model) -> float:
        return round(100.0 * evaluate(model, test_images, Normalize(mean, std))["top1"], 2)

    depth, _ = load_checkpoint(a.depth)
    small, _ = load_checkpoint(a.small)
    ds = load_dataset("cifar10", a.data_dir)
    train = ImageBatches(ds.train, mean, std, 128, train=True, pad=4, flip=True)

    def channel_model(round_to: int | None, epochs: int):
        """The channel-pruned model (made once, then kept under --out) and its record."""
        tag = f"channel-round{round_to or 1}-ft{epochs}"
        if (a.out / f"{tag}.json").exists():
            record = json.loads((a.out / f"{tag}.json").read_text())
            model = channel_pruned(full, x, record["ratio"], round_to)
            model.load_state_dict(torch.load(a.out / f"{tag}.pt", weights_only=True))
            return model.eval(), record
        target = macs(depth, x)
        ratio = ratio_for(full, x, target, round_to)
        model = sdcompress.recalibrate(channel_pruned(full, x, ratio, round_to), train, num_batches=40)
        record = {"ratio": ratio, "round_to": round_to, "target_macs": target, "top1_before_finetune": top1(model)}
        print(f"channel-pruned, round_to {round_to}, ratio {ratio}: {macs(model, x):,} MACs (target {target:,}), "
              f"top-1 {record['top1_before_finetune']}% before fine-tuning", flush=True)
        if epochs:
            model, record["finetune"] = sdcompress.finetune(model, train, teacher=full, epochs=epochs, lr=0.01)
        torch.save(model.state_dict(), a.out / f"{tag}.pt")
        (a.out / f"{tag}.json").write_text(json.dumps(record, indent=1, default=str))
        return model.eval(), record

    channel, record = channel_model(8, a.finetune)
    odd, odd_record = channel_model(None, 0)

    models = {"full ResNet-56 (start of both)": full, "ResNet-56, keep 0.6 (depth-pruned)": depth,
              f"ResNet-56, channels pruned by Torch-Pruning (round_to 8, fine-tuned {a.finetune})": channel,
              "ResNet-56, channels pruned by Torch-Pruning (no rounding, not fine-tuned)": odd, "ResNet-32": small}
    rows, sessions = [], {}
    for label, model in models.items():
        folder = a.out / "files" / f"model{len(rows)}"
        rep = sdcompress.export(model, folder, x, formats=["ort"], force=True)
        ort = rep["formats"]["ort"]
        sessions[label] = ex.ort_session(str(folder / ort["file"]), a.threads)
        fp = sdcompress.footprint(model, x)["totals"]
        rows.append({"model": label, "top1": top1(model), "params": sum(p.numel() for p in model.parameters()),
                     "macs": int(fp["macs"]["total"]), "ort_bytes": ort["bytes"], "ort_top1_agreement": ort["verification"]["top1_agreement"]})
        print(f"{label}: {rows[-1]}", flush=True)
    lat = ex.interleaved_latency(sessions, tuple(x.shape[1:]), a.rounds, a.runs)
    for r in rows:
        r["latency_ms"] = lat[r["model"]]
    (a.out / "bench_smallnet.json").write_text(json.dumps({"threads": a.threads, "rows": rows, "channel": record, "channel_no_rounding": odd_record,
                                                           "date": time.strftime("%Y-%m-%d")}, indent=1, default=str))
    print(f"\n| model | test top-1 | parameters | MACs | `.ort` bytes | latency (ms, batch 1, {a.threads} thread) |")
    print("|---|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['model']} | {r['top1']:.2f}% | {r['params'] / 1e6:.3f} M | {r['macs'] / 1e6:.1f} M | {r['ort_bytes']:,} | "
              f"{r['latency_ms']:.3f} |")
    for r in (record, odd_record):
        print(f"\nchannel pruning, round_to {r['round_to']}: ratio {r['ratio']}, {r['top1_before_finetune']}% before fine-tuning")
    print(f"latency: {a.rounds} interleaved rounds of {a.runs} runs")


if __name__ == "__main__":
    main()
