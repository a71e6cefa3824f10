"""Training throughput in float32 and bf16, with constant and with stochastic depth, measured in one run.

Each variant runs the training step as `sdcompress train` runs it: a uint8 batch augmented (padded crop and
flip) and normalized, the per-batch drop draw, the contribution norms every fourth step, forward, loss,
backward and the SGD step; bf16 is autocast with channels_last (`sdcompress.precision`), float32 is NCHW.
Rounds alternate between the variants (and the single-block timings below) so that a shared machine's noise hits
all alike; images/s are medians over rounds, and each ratio is the median of its per-round ratios (the two step
times of a ratio measured next to each other).

Printed: images/s of each variant; bf16 / fp32 step time at constant and at stochastic depth; and stochastic /
constant step time at each precision against what the expected depth predicts, two ways:
- by MACs: the fraction of the MACs expected to run (stem and classifier plus sum_l p_l * MACs_l, over the total);
- by block time: the same sum weighted by each block's own training time (forward + backward of one block of
  each shape, timed alone at the variant's precision and batch), the rest of the constant-depth step (stem,
  classifier, loss, optimizer, augmentation, the draw) counted as always run. The blocks of a CIFAR ResNet's
  three stages have equal MACs but not equal time (the 16-channel blocks at 32x32 move the most memory and use
  the matrix units least), and the first stage is the one that drops least, so the MACs predict too little.

`--fast` adds the fast recipe: the stochastic-depth network with each residual branch compiled (`--compile
on`), a larger batch (`--fast-batch`) and label smoothing, against the plain trainer at the same precision (its
compilation takes minutes on a CPU).

    python tools/bench_train.py --device cpu              # resnet56, batch 128, fp32 and bf16
    python tools/bench_train.py --device cuda --steps 30 --rounds 5
    python tools/bench_train.py --precisions fp32 --fast
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sdcompress.data import Normalize, augment  # noqa: E402
from sdcompress.loops import resolve_device, train_step  # noqa: E402
from sdcompress.nets import BasicBlock, NetSpec, block_layout, build_model, count_macs  # noqa: E402
from sdcompress.precision import FP32, Precision, bf16_fast, to_layout  # noqa: E402
from sdcompress.survival import draw_run_mask  # noqa: E402
from sdcompress.train import compile_branches  # noqa: E402

CONTRIB_EVERY = 4  # as TrainConfig.contrib_every


def predicted_ratio(spec: NetSpec) -> float:
    macs = count_macs(build_model(spec), (3, 32, 32))
    blocks = sum(macs["per_block"].values())
    other = macs["total"] - blocks
    expected = sum(p * macs["per_block"][l] for l, p in enumerate(spec.probs()))
    return (other + expected) / macs["total"]


class BlockTimer:
    """Forward + backward of each block shape of a CIFAR ResNet alone, as it runs in training."""

    def __init__(self, arch: str, batch: int, prec: Precision, device: torch.device):
        self.device, self.prec, self.shapes, self.cases = device, prec, [], {}
        hw = 32
        for cin, cout, stride in block_layout(arch):
            key = (cin, cout, stride, hw)
            self.shapes.append(key)
            if key not in self.cases:
                torch.manual_seed(0)
                blk = to_layout(BasicBlock(cin, cout, stride, 1.0).to(device), prec.channels_last).train()
                x = prec.layout(torch.relu(torch.randn(batch, cin, hw, hw, device=device))).requires_grad_()
                self.cases[key] = (blk, x)
            hw //= stride
        self.times: dict[tuple, list[float]] = {k: [] for k in self.cases}

    def _once(self, key) -> None:
        blk, x = self.cases[key]
        with self.prec.autocast(self.device):
            y = blk(x)
        y.float().sum().backward()

    def run(self, reps: int = 2) -> None:
        """One timing of every block shape (after a first call per shape)."""
        for key in self.cases:
            if not self.times[key]:
                self._once(key)
            if self.device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            for _ in range(reps):
                self._once(key)
            if self.device.type == "cuda":
                torch.cuda.synchronize()
            self.times[key].append((time.perf_counter() - t0) / reps)

    def per_block(self) -> list[float]:
        """Median seconds of every block of the network, block 0 first."""
        med = {k: statistics.median(v) for k, v in self.times.items()}
        return [med[k] for k in self.shapes]


def time_predicted_ratio(spec: NetSpec, blocks: list[float], constant_step: float) -> float:
    """Stochastic / constant step time if each block costs its own time and everything else the same."""
    rest = max(0.0, constant_step - sum(blocks))
    return (rest + sum(p * t for p, t in zip(spec.probs(), blocks))) / (rest + sum(blocks))


class Variant:
    """One network with its optimizer and generators, stepped as the trainer steps it."""

    def __init__(self, arch: str, rule: str, p_last: float, prec: Precision, batch: int, device: torch.device,
                 compiled: bool = False, label_smoothing: float = 0.0):
        self.spec = NetSpec(arch, 3, 10, rule, p_last)
        torch.manual_seed(0)
        self.model = to_layout(build_model(self.spec).to(device), prec.channels_last)
        if compiled:
            compile_branches(self.model)
        self.model.train()
        self.opt = torch.optim.SGD(self.model.parameters(), lr=0.01, momentum=0.9, nesterov=True, weight_decay=1e-4)
        self.prec, self.batch, self.device, self.label_smoothing = prec, batch, device, label_smoothing
        self.probs = torch.tensor(self.spec.probs())
        self.drop_gen = torch.Generator().manual_seed(1)
        self.aug_gen = torch.Generator(device=device).manual_seed(2)
        g = torch.Generator().manual_seed(0)
        self.images = torch.randint(0, 256, (4 * batch, 3, 32, 32), dtype=torch.uint8, generator=g).to(device)
        self.labels = torch.randint(0, 10, (4 * batch,), generator=g).to(device)
        self.normalize = Normalize([0.49, 0.48, 0.45], [0.25, 0.24, 0.26], device)
        self.step = 0

    def loss_of(self, run_mask: dict):
        """The step's loss as `sdcompress train` computes it (`train._Epochs.loss_of`), for `loops.train_step`."""
        import torch.nn.functional as F

        return lambda x, y, step: F.cross_entropy(self.model(x, run_mask).float(), y, label_smoothing=self.label_smoothing)

    def run(self, steps: int) -> float:
        """Seconds per step over `steps` steps."""
        cuda = self.device.type == "cuda"
        ids = self.model.block_ids
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(steps):
            idx = torch.randint(0, len(self.labels), (self.batch,), device=self.device, generator=self.aug_gen)
            x = self.prec.layout(self.normalize(augment(self.images[idx], 4, True, self.aug_gen)))
            record = self.step % CONTRIB_EVERY == 0
            self.model.set_record_contribution(record)
            run_mask = dict(zip(ids, draw_run_mask(self.probs, self.drop_gen).tolist()))
            train_step(self.opt, self.loss_of(run_mask), x, self.labels[idx], self.step, self.prec, self.device)
            if record:
                [c.item() for c in self.model.contributions().values() if c is not None]  # the trainer stacks them
            self.step += 1
        if cuda:
            torch.cuda.synchronize()
        return (time.perf_counter() - t0) / steps

    def parts(self, steps: int) -> dict[str, float]:
        """Milliseconds per step of each part of `loops.train_step` and around it (its body, timed piece by piece)."""
        import torch.nn.functional as F

        sync = torch.cuda.synchronize if self.device.type == "cuda" else (lambda: None)
        ids, spent = self.model.block_ids, {}

        def lap(name, t):
            sync()
            now = time.perf_counter()
            spent[name] = spent.get(name, 0.0) + (now - t) * 1e3 / steps
            return now

        for _ in range(steps):
            sync()
            t = time.perf_counter()
            idx = torch.randint(0, len(self.labels), (self.batch,), device=self.device, generator=self.aug_gen)
            x = self.prec.layout(self.normalize(augment(self.images[idx], 4, True, self.aug_gen)))
            t = lap("augment + normalize (uint8)", t)
            record = self.step % CONTRIB_EVERY == 0
            self.model.set_record_contribution(record)
            run_mask = dict(zip(ids, draw_run_mask(self.probs, self.drop_gen).tolist()))
            t = lap("drop draw", t)
            with self.prec.autocast(self.device):
                logits = self.model(x, run_mask)
                t = lap("forward", t)
                loss = F.cross_entropy(logits.float(), self.labels[idx])
            t = lap("loss", t)
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
            t = lap("backward", t)
            self.opt.step()
            t = lap("SGD step", t)
            if record:
                [c.item() for c in self.model.contributions().values() if c is not None]
            lap("contribution statistics", t)
            self.step += 1
        return spent


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", default="resnet56")
    ap.add_argument("--p-last", type=float, default=0.5)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--steps", type=int, default=4, help="timed steps per round")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--precisions", default="fp32,bf16", help="comma-separated: fp32, bf16")
    ap.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    ap.add_argument("--parts", action="store_true", help="also time the parts of a stochastic-depth step at each precision")
    ap.add_argument("--fast", action="store_true", help="add the fast recipe (compiled branches; compiling takes minutes on a CPU)")
    ap.add_argument("--fast-batch", type=int, default=512, help="batch of the fast recipe")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    precs = {"fp32": FP32, "bf16": Precision("bf16", True, "bf16")}
    names = [p.strip() for p in args.precisions.split(",") if p.strip()]
    if not names or any(p not in precs for p in names):
        ap.error(f"--precisions: a comma-separated list of fp32, bf16, got {args.precisions!r}")
    variants: dict[tuple[str, str], Variant] = {}
    for p in names:
        for rule in ("none", "linear"):
            variants[(p, rule)] = Variant(args.arch, rule, args.p_last, precs[p], args.batch_size, device)
        if args.fast:
            variants[(p, "fast")] = Variant(args.arch, "linear", args.p_last, precs[p], args.fast_batch, device, compiled=True,
                                            label_smoothing=0.1)
    timers = {p: BlockTimer(args.arch, args.batch_size, precs[p], device) for p in names}
    t0 = time.perf_counter()
    for key, v in variants.items():  # warm-up (the fast recipe compiles here: one graph per block shape and mode)
        v.run(8 if key[1] == "fast" else 2)
    warm_s = time.perf_counter() - t0
    times: dict[tuple[str, str], list[float]] = {k: [] for k in variants}
    for _ in range(args.rounds):
        for p in names:
            for rule in ("none", "linear", "fast"):
                if (p, rule) in variants:
                    times[(p, rule)].append(variants[(p, rule)].run(args.steps))
            timers[p].run()
    med = {k: statistics.median(v) for k, v in times.items()}

    def ratio(a: tuple[str, str], b: tuple[str, str]) -> float:
        return statistics.median(x / y for x, y in zip(times[a], times[b]))

    spec = variants[(names[0], "linear")].spec
    pred = predicted_ratio(spec)
    blocks = {p: timers[p].per_block() for p in names}
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu, {torch.get_num_threads()} threads"
    print(f"{args.arch}  batch {args.batch_size}  device {where} ({bf16_fast(device)[1]})  "
          f"{args.rounds} rounds x {args.steps} steps, medians")
    for (p, rule), t in med.items():
        what = {"none": "constant depth", "linear": f"stochastic depth p_L {args.p_last}",
                "fast": f"fast recipe (batch {args.fast_batch})"}[rule]
        batch = args.fast_batch if rule == "fast" else args.batch_size
        print(f"  {p:<4} {precs[p].describe():<30} {what:<26} {batch / t:7.0f} img/s  ({t * 1e3:7.1f} ms/step)")
    if "fp32" in names and "bf16" in names:
        for rule, what in (("none", "constant depth"), ("linear", "stochastic depth")):
            print(f"  bf16 / fp32 step time, {what}: {ratio(('bf16', rule), ('fp32', rule)):.3f}")
    for p in names:
        r = ratio((p, "linear"), (p, "none"))
        by_time = time_predicted_ratio(spec, blocks[p], med[(p, "none")])
        stages = sorted({round(t * 1e3, 1) for t in blocks[p]}, reverse=True)
        print(f"  {p}: step-time ratio stochastic / constant {r:.3f}; expected depth predicts {pred:.3f} by MACs "
              f"({r - pred:+.3f}), {by_time:.3f} by block time ({r - by_time:+.3f}; one block's step "
              f"{', '.join(f'{t:g}' for t in stages)} ms, blocks {1e3 * sum(blocks[p]):.0f} of {1e3 * med[(p, 'none')]:.0f} ms)")
    if args.parts:
        for p in names:
            v = variants[(p, "linear")]
            spent = v.parts(max(args.steps * 2, 8))
            total = sum(spent.values())
            print(f"  {p} stochastic-depth step by part ({total:.0f} ms): " + ", ".join(f"{k} {t:.1f} ms ({100 * t / total:.1f}%)"
                                                                                    for k, t in spent.items()))
    if args.fast:
        for p in names:
            fast = args.fast_batch / med[(p, "fast")]
            plain = args.batch_size / med[(p, "linear")]
            print(f"  {p}: fast recipe / stochastic-depth trainer {fast / plain:.2f}x images/s (warm-up with compilation {warm_s:.0f} s)")


if __name__ == "__main__":
    main()
