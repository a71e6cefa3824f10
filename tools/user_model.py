"""A user's own pretrained network through the Python API alone: the peer's CIFAR ResNet-56 (its own class and
weights, `../shared/models/cifar-resnet-peer`), pruned as it is, then retrofitted with stochastic depth and pruned
again, scored on all of `../shared/data/cifar10-test`.

    python tools/user_model.py --epochs 2 --finetune 2 --out runs/user-model
    python tools/user_model.py --device cuda --epochs 40 --lr 0.02 --finetune 10 --out runs/user-model-gpu   # bf16 on a GPU

(a) the pretrained model; (b) `measure_drop_effects`, then `prune` at keep 0.8 / 0.6 / 0.4 by those effects,
`recalibrate`d; (c) `train_stochastic_depth` for --epochs from the pretrained weights, then the same keeps by the
recorded drop effects (kept blocks adding p_l f(x), and as `block_scale="auto"` chooses on 40 augmented training
batches) and by `every-other`, recalibrated; (d) keep 0.6 of (c), by whichever of the two rankings
is better on the validation split, fine-tuned with distillation from (c)'s full network for --finetune epochs. Training uses the 45,000-image training split of `../shared/data/cifar10`
(seed 0); nothing is chosen on the test images. Each stage's result is kept under --out (`results.json`,
`retrofit.pt`, and `retrofit-state.pt` after every epoch of the retrofit), so a rerun picks up where the last one stopped.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import sdcompress  # noqa: E402
from sdcompress.api import _prune  # noqa: E402 - prune, and the record of the kept blocks' scale it chose
from sdcompress.data import ImageBatches, _decode_folder, load_dataset  # noqa: E402

PEER = ROOT.parent / "shared" / "models" / "cifar-resnet-peer"
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)  # the peer's trainer normalizes with ImageNet's constants


@torch.no_grad()
def top1(model, batches) -> float:
    model.eval()
    dev = next(model.parameters()).device
    right = total = 0
    for x, y in batches:
        right += int((model(x.to(dev)).argmax(1).cpu() == y).sum())
        total += len(y)
    return round(100.0 * right / total, 2)


def peer_resnet56():
    spec = importlib.util.spec_from_file_location("peer_resnet", PEER / "resnet.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    model = mod.resnet56()
    state = torch.load(PEER / "resnet56-4bfd9763.th", map_location="cpu", weights_only=True)["state_dict"]
    model.load_state_dict({k.removeprefix("module."): v for k, v in state.items()})
    return model.eval()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--lr", type=float, default=0.01)
    ap.add_argument("--finetune", type=int, default=2)
    ap.add_argument("--precision", default="auto")
    ap.add_argument("--device", default="cpu", help="where the API functions run (they follow the model's device): cpu or cuda")
    ap.add_argument("--data-dir", default=str(ROOT.parent / "shared" / "data" / "cifar10"))
    ap.add_argument("--test-dir", default=str(ROOT.parent / "shared" / "data" / "cifar10-test"))
    ap.add_argument("--out", default="runs/user-model")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    res_path = out / "results.json"
    res = json.loads(res_path.read_text()) if res_path.exists() else {}

    def note(key, value):
        res[key] = value
        res_path.write_text(json.dumps(res, indent=1))
        print(f"{key}: {value}", flush=True)

    torch.set_num_threads(max(1, torch.get_num_threads()))
    ds = load_dataset("cifar10", args.data_dir)
    test = _decode_folder(Path(args.test_dir))[0]
    train = ImageBatches(ds.train, MEAN, STD, 128, train=True, pad=4, flip=True)
    test_b = ImageBatches(test, MEAN, STD, 500, train=False)
    val_b = ImageBatches(ds.val, MEAN, STD, 500, train=False)
    dev = torch.device(args.device)
    model = peer_resnet56().to(dev)
    example = next(iter(test_b))[0][:2].to(dev)
    blocks = sdcompress.find_blocks(model, example)
    note("blocks", len(blocks))
    if "a" not in res:
        note("a", top1(model, test_b))
    if "b" not in res:
        t = time.perf_counter()
        stats = sdcompress.measure_drop_effects(model, [next(iter(train)) for _ in range(40)], blocks, rounds=3)
        b = {"measure_seconds": round(time.perf_counter() - t, 1)}
        for keep in (0.8, 0.6, 0.4):
            small = sdcompress.recalibrate(sdcompress.prune(model, keep, stats=stats), train)
            b[str(keep)] = top1(small, test_b)
        note("b", b)
    ck = out / "retrofit.pt"
    if ck.exists():
        saved = torch.load(ck, weights_only=False, map_location=dev)
        retro = peer_resnet56().to(dev)
        retro.load_state_dict(saved["state_dict"])
        stats, history = saved["stats"], saved["history"]
    else:
        state = out / "retrofit-state.pt"  # after every epoch: a stopped run goes on from its last one
        trained = sdcompress.train_stochastic_depth(model, train, args.epochs, blocks=blocks, lr=args.lr, precision=args.precision,
                                                    progress=True, checkpoint=state, resume=state.exists())
        retro, stats, history = trained
        torch.save({"state_dict": retro.state_dict(), "stats": stats, "history": history}, ck)
    calib = [b for b, _ in zip(train, range(40))]  # augmented training batches: the kept blocks' scale is chosen on them

    def cut(keep, strategy, scale="auto"):
        small, rec = _prune(retro, keep, stats=stats, strategy=strategy, block_scale=scale, calibration=calib)
        return sdcompress.recalibrate(small, train), rec["block_scale"]

    if "c" not in res:
        c = {"epochs": history["epochs"], "seconds": history["seconds"], "precision": history["precision"],
             "lr": args.lr, "full": top1(retro, test_b), "val_full": top1(retro, val_b)}
        for keep in (0.8, 0.6, 0.4):
            for strategy, scale in (("stats", "survival"), ("stats", "auto"), ("every-other", "auto")):
                small, rec = cut(keep, strategy, scale)
                c[f"{keep} {strategy} {scale}"] = {"top1": top1(small, test_b), "exponent": rec.get("exponent"), "loss": rec.get("loss")}
        note("c", c)
    if res.get("d", {}).get("epochs") != args.finetune:  # the ranking to fine-tune is the one better on the validation split, never on test images
        cuts = {s: cut(0.6, s)[0] for s in ("stats", "every-other")}
        val = {s: top1(m, val_b) for s, m in cuts.items()}
        strategy = max(val, key=val.get)
        tuned, h = sdcompress.finetune(cuts[strategy], train, teacher=retro, epochs=args.finetune, precision=args.precision, progress=True)
        note("d", {"epochs": args.finetune, "seconds": h["seconds"], "strategy": strategy, "val_before_finetune": val,
                   "top1": top1(tuned, test_b), "params": sum(p.numel() for p in tuned.parameters()),
                   "params_full": sum(p.numel() for p in retro.parameters())})
        sdcompress.save(tuned, out / "tuned", blocks=sdcompress.find_blocks(tuned, example), force=True)


if __name__ == "__main__":
    main()
