"""Copy a finished `sdcompress train` run into `models/NAME` as a bundled model, saying where its weights came from.

    python tools/bundle_model.py runs/bundled/resnet56-sd resnet56-sd --log runs/bundled/train.log

The run's `model.pt` is copied as it is. Its sidecar is rewritten in two places only, so that it names no path of
the machine it was trained on: the training data becomes `../shared/data/cifar10` (the folder the run read,
wherever it lay), and the starting weights (`train --weights`) become the name of the pretrained file inside
`../shared/models/cifar-resnet-peer`, with its SHA-256 and origin under `provenance`. The weights were renamed from
the original repository's layout (`conv1`, `bn1`, `layerS.i`, `linear`) to sdcompress's by `sdcompress train
--weights` itself (`train.map_keys`), which also folded 1/p_l into each block's last BatchNorm. With `--log`, the
training log is kept beside the model as `train.log`, with the same two paths and its output folder replaced.
"""

from __future__ import annotations

import argparse
import hashlib
import re
import json
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from sdcompress.files import atomic_write_bytes  # noqa: E402

PEER = ROOT.parent / "shared" / "models" / "cifar-resnet-peer"
ORIGIN = {
    "repository": "https://github.com/akamaster/pytorch_resnet_cifar10",
    "license": "BSD 2-Clause",
    "copyright": "Copyright (c) 2018, Yerlan Idelbayev",
    "recipe": "SGD momentum 0.9, weight decay 1e-4, lr 0.1 divided by 10 at epochs 100 and 150, 200 epochs, on all "
              "50,000 CIFAR-10 training images (the lossless originals), 4-pixel padded random crop + horizontal flip, "
              "normalized with ImageNet's mean and std",
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run", type=Path, help="a finished run folder of sdcompress train (model.pt, model.json)")
    ap.add_argument("name", help="the bundled model's folder name under models/")
    ap.add_argument("--log", type=Path, default=None, help="the training log to keep beside it")
    ap.add_argument("--data", default="../shared/data/cifar10", help="the data folder to name in the sidecar")
    args = ap.parse_args()
    side = json.loads((args.run / "model.json").read_text())
    cfg = side["stages"][0]["config"]
    if side["metrics"]["epochs"] < cfg["epochs"]:
        sys.exit(f"{args.run}: unfinished ({side['metrics']['epochs']} of {cfg['epochs']} epochs); resume it first")
    ran_on = {cfg["data"]: args.data}  # the run's own paths, replaced in the sidecar and the log alike
    cfg["data"] = side["data"]["source"] = args.data
    if cfg.get("weights"):
        start = PEER / Path(cfg["weights"]).name
        digest = hashlib.sha256(start.read_bytes()).hexdigest()
        ran_on[str(Path(cfg["weights"]).parent)] = "../shared/models/cifar-resnet-peer"
        cfg["weights"] = f"../shared/models/cifar-resnet-peer/{start.name}"
        side["provenance"] = {"start": cfg["weights"], "sha256": digest, **ORIGIN}
    out = ROOT / "models" / args.name
    out.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(args.run / "model.pt", out / "model.pt")
    atomic_write_bytes(out / "model.json", (json.dumps(side, indent=1) + "\n").encode())
    if args.log:
        log = args.log.read_text()
        for old, new in ran_on.items():
            log = log.replace(old, new)
        log = re.sub(r"(--out |wrote )/\S+?/(?=resnet)", r"\1runs/bundled/", log)
        atomic_write_bytes(out / "train.log", log.encode())
    print(f"wrote {out}: {sum(f.stat().st_size for f in out.iterdir())} bytes")


if __name__ == "__main__":
    main()
