"""Core ML conversion time of a binarized checkpoint with the exact two-value 1-bit tables sdcompress uses, against
coremltools' 1-bit k-means, timed alternately in one process after a warm-up conversion.

    python tools/bench_palettize.py CKPT [--rounds 2]
"""

from __future__ import annotations

import argparse
import time

from sdcompress.checkpoint import load_checkpoint
from sdcompress.exporters import coreml
from sdcompress.zoo import card_fields


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("ckpt", help="a binarized checkpoint (sdcompress binarize)")
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()
    model, meta = load_checkpoint(args.ckpt)
    card = card_fields(args.ckpt, meta)
    coreml.import_coremltools()
    import coremltools.optimize.coreml as opt

    exact = opt.OpPalettizerConfig

    def kmeans(**_):
        return exact(mode="kmeans", nbits=1, granularity="per_grouped_channel", group_size=1, weight_threshold=0)

    coreml.convert(model, meta, "float16", "image", card)  # warm-up
    times: dict[str, list[float]] = {"two-value table": [], "k-means": []}
    for _ in range(args.rounds):
        for name, cfg in (("two-value table", exact), ("k-means", kmeans)):
            opt.OpPalettizerConfig = cfg  # what `coreml.convert` builds its per-layer config with
            t0 = time.perf_counter()
            _, facts = coreml.convert(model, meta, "float16", "image", card)
            times[name].append(time.perf_counter() - t0)
    opt.OpPalettizerConfig = exact
    for name, ts in times.items():
        print(f"{name:16s} {', '.join(f'{t:.1f} s' for t in ts)}  ({facts['binary_layers']['count']} layers palettized)")


if __name__ == "__main__":
    main()
