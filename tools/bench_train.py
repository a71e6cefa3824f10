"""Training throughput with constant depth, with stochastic depth, and with the fast recipe, measured in one run.

Prints images/s of each, the ratio of their step times, and the ratio the expected depth predicts (the
fraction of block MACs expected to run: sum_l p_l * MACs_l plus the stem and classifier, over the total).
The fast recipe is the stochastic-depth network trained as `tools/train_bundled.py --recipe fast` trains it:
each residual branch compiled on its own (`--compile on`), a larger batch (`--fast-batch`, default 512) and
label smoothing; its images/s against today's stochastic-depth trainer is the last line. Rounds alternate
between the trainers so that the shared machine's noise hits all alike; medians are reported.

    python tools/bench_train.py                      # resnet56, CPU
    python tools/bench_train.py --arch resnet110
    python tools/bench_train.py --device cuda --steps 50 --rounds 7
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sdcompress.nets import NetSpec, build_model, count_macs  # noqa: E402
from sdcompress.survival import draw_run_mask  # noqa: E402
from sdcompress.loops import resolve_device, train_step  # noqa: E402
from sdcompress.train import compile_branches  # noqa: E402


def predicted_ratio(spec: NetSpec) -> float:
    macs = count_macs(build_model(spec), (3, 32, 32))
    blocks = sum(macs["per_block"].values())
    other = macs["total"] - blocks
    expected = sum(p * macs["per_block"][l] for l, p in enumerate(spec.probs()))
    return (other + expected) / macs["total"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", default="resnet56")
    ap.add_argument("--p-last", type=float, default=0.5)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--steps", type=int, default=8, help="timed steps per round")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    ap.add_argument("--fast-batch", type=int, default=512, help="batch of the fast recipe")
    ap.add_argument("--no-fast", action="store_true", help="skip the fast recipe (its compilation takes minutes on a CPU)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    cuda = device.type == "cuda"
    gen = torch.Generator().manual_seed(0)
    batches = {}
    for b in {args.batch_size, args.fast_batch}:
        x = torch.randn(b, 3, 32, 32, generator=gen).to(device)
        batches[b] = (x.contiguous(memory_format=torch.channels_last) if cuda else x, torch.randint(0, 10, (b,), generator=gen).to(device))
    runs = {}
    for name, rule in (("none", "none"), ("linear", "linear")) + ((("fast", "linear"),) if not args.no_fast else ()):
        spec = NetSpec(args.arch, 3, 10, rule, args.p_last)
        torch.manual_seed(0)
        model = build_model(spec).to(device)
        if cuda:
            model = model.to(memory_format=torch.channels_last)
        if name == "fast":
            compile_branches(model)
        model.train()
        opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, nesterov=True, weight_decay=1e-4)
        batch = args.fast_batch if name == "fast" else args.batch_size
        runs[name] = (spec, model, opt, torch.tensor(spec.probs()), torch.Generator().manual_seed(1), batch)

    def round_time(rule: str, steps: int) -> float:
        spec, model, opt, probs, g, batch = runs[rule]
        x, y = batches[batch]
        ids = model.block_ids
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(steps):
            run_mask = dict(zip(ids, draw_run_mask(probs, g).tolist()))
            train_step(model, opt, x, y, run_mask, bf16=cuda, label_smoothing=0.1 if rule == "fast" else 0.0)
        if cuda:
            torch.cuda.synchronize()
        return (time.perf_counter() - t0) / steps

    t0 = time.perf_counter()
    for rule in runs:  # warm-up (the fast recipe compiles here: one graph per block shape, train and eval)
        round_time(rule, 3 if rule != "fast" else 8)
    warm_s = time.perf_counter() - t0
    times = {rule: [] for rule in runs}
    for _ in range(args.rounds):
        for rule in runs:
            times[rule].append(round_time(rule, args.steps))
    med = {rule: statistics.median(v) for rule, v in times.items()}
    pred = predicted_ratio(runs["linear"][0])
    name = torch.cuda.get_device_name(device) if cuda else f"cpu, {torch.get_num_threads()} threads"
    print(f"{args.arch}  batch {args.batch_size}  device {name}  {'bf16 autocast, channels_last' if cuda else 'fp32'}")
    print(f"  constant depth          {args.batch_size / med['none']:8.0f} img/s  ({med['none'] * 1e3:.1f} ms/step)")
    print(f"  stochastic depth p_L {args.p_last}  {args.batch_size / med['linear']:8.0f} img/s  ({med['linear'] * 1e3:.1f} ms/step)")
    ratio = med["linear"] / med["none"]
    print(f"  step-time ratio SD / constant: {ratio:.3f}   predicted by expected depth: {pred:.3f}")
    if "fast" in med:
        fast = args.fast_batch / med["fast"]
        print(f"  fast recipe (compiled branches, batch {args.fast_batch}, label smoothing 0.1)  {fast:8.0f} img/s  "
              f"({med['fast'] * 1e3:.1f} ms/step; warm-up with compilation {warm_s:.0f} s)")
        print(f"  fast / today's stochastic-depth trainer: {fast / (args.batch_size / med['linear']):.2f}x images/s")


if __name__ == "__main__":
    main()
