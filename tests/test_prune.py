import json
import os

import pytest
import torch

from sdcompress.checkpoint import SCHEMA, Sidecar, load_checkpoint, save_checkpoint
from sdcompress.cli import main
from sdcompress.cli.prune import parse_size
from sdcompress.data import Normalize
from sdcompress.errors import InputError
from sdcompress.nets import NetSpec, build_model, count_params
from sdcompress.loops import recalibrate_bn
from sdcompress.pruning import STRATEGIES, PruneConfig, blocks_to_remove, every_other, remove_blocks, stats_order


def _meta(n_blocks=9, effects=None):
    effects = effects or [0.1 * (n_blocks - l) for l in range(n_blocks)]
    return {
        "data": {"name": "toy", "source": "toy.npz", "input_shape": [3, 32, 32], "mean": [0.5] * 3, "std": [0.25] * 3,
                 "classes": [str(i) for i in range(10)]},
        "stages": [{"stage": "train", "config": {}}],
        "survival_stats": {"blocks": [{"block": l, "drop_effect": effects[l], "contribution": 1.0, "drop_effect_se": 0.01,
                                       "p_scheduled": 1.0, "runs": 1, "survival_rate": 1.0} for l in range(n_blocks)],
                           "steps": 1, "window": 1, "regression_steps": 1},
    }


def _side(meta: dict | None = None) -> Sidecar:
    """A resnet20 sidecar, typed, around `_meta()`."""
    return Sidecar.from_dict({**(meta or _meta()), "schema": SCHEMA, "spec": NetSpec("resnet20").to_dict()})


def test_removed_blocks_are_gone_and_the_file_shrinks(tmp_path):
    torch.manual_seed(0)
    full = build_model(NetSpec("resnet20")).eval()
    pruned = remove_blocks(full, [2, 6, 8])
    state = pruned.state_dict()
    assert not any(k.startswith(("blocks.2.", "blocks.6.", "blocks.8.")) for k in state)
    removed_bytes = sum(v.numel() * v.element_size() for k, v in full.state_dict().items() if k.startswith(("blocks.2.", "blocks.6.", "blocks.8.")))
    save_checkpoint(tmp_path / "full", full, _meta())
    save_checkpoint(tmp_path / "pruned", pruned, _meta())
    shrink = os.path.getsize(tmp_path / "full" / "model.pt") - os.path.getsize(tmp_path / "pruned" / "model.pt")
    assert shrink >= removed_bytes
    reloaded, _ = load_checkpoint(tmp_path / "pruned")
    x = torch.randn(4, 3, 32, 32)
    assert torch.equal(reloaded(x), pruned(x))
    assert count_params(pruned) == sum(v.numel() for k, v in state.items() if "running" not in k and "num_batches" not in k)


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("keep", [1.0, 0.6, 0.34, 0.05])
def test_every_strategy_returns_the_requested_number_of_blocks(strategy, keep):
    torch.manual_seed(0)
    model = build_model(NetSpec("resnet20")).eval()
    cfg = PruneConfig(keep=keep, strategy=strategy)
    removed = blocks_to_remove(model, _side(), cfg, loss_fn=lambda m: float(len(m.block_ids)))
    n_keep = int(keep * 9 + 0.5)
    assert len(removed) == 9 - n_keep and len(set(removed)) == len(removed)


def test_strategies_pick_what_they_say():
    present = list(range(27))
    assert every_other(list(range(8)), 4) == [1, 3, 5, 7]
    spread = every_other(present, 9)
    gaps = [b - a for a, b in zip(spread, spread[1:])]
    assert max(gaps) - min(gaps) <= 1
    model = build_model(NetSpec("resnet20"))
    assert sorted(blocks_to_remove(model, _side(), PruneConfig(keep=0.67, strategy="top"))) == [6, 7, 8]
    effects = [0.5, 0.4, 0.01, 0.3, 0.2, 0.02, 0.6, 0.03, 0.7]
    assert stats_order(_side(_meta(effects=effects)).survival_stats, list(range(9)))[:3] == [2, 5, 7]
    # a constant-depth network has no drop effects: contribution decides
    meta = _meta()
    for b, c in zip(meta["survival_stats"]["blocks"], [0.9, 0.1, 0.8, 0.2, 0.7, 0.3, 0.6, 0.4, 0.5]):
        b["drop_effect"], b["contribution"] = None, c
    assert stats_order(_side(meta).survival_stats, list(range(9)), "contribution")[:2] == [1, 3]
    assert stats_order(_side(meta).survival_stats, list(range(9)))[:2] == [1, 3]  # no effect anywhere: contribution decides


def test_stats_removes_as_many_per_stage_as_every_other_and_the_cheapest_there():
    """resnet20: 3 stages of 3 blocks. The drop effects make stage 1 the cheapest everywhere; ranked over the
    whole network all three removals would be 0, 1, 2 and the first stage would be gone. `stats` takes every-other's
    count per stage (one each at keep 0.67) and the lowest effect inside each stage."""
    effects = [0.01, 0.02, 0.03, 0.5, 0.2, 0.4, 0.9, 0.7, 0.8]
    model = build_model(NetSpec("resnet20"))
    side = _side(_meta(effects=effects))
    assert stats_order(side.survival_stats, list(range(9)))[:3] == [0, 1, 2]  # the global order
    removed = blocks_to_remove(model, side, PruneConfig(keep=0.67, strategy="stats"))
    per_stage = lambda bs: sorted(b // 3 for b in bs)  # noqa: E731
    assert per_stage(removed) == per_stage(every_other(list(range(9)), 3)) == [0, 1, 2]
    assert removed == [0, 4, 7]


def test_budget_keeps_the_most_blocks_that_fit():
    model = build_model(NetSpec("resnet20"))
    limit = count_params(remove_blocks(model, [7, 8])) + 10
    removed = blocks_to_remove(model, _side(), PruneConfig(keep=None, max_params=limit, strategy="top"))
    assert sorted(removed) == [7, 8]
    with pytest.raises(InputError, match="no model meets the budget"):
        blocks_to_remove(model, _side(), PruneConfig(keep=None, max_params=100, strategy="top"))


def test_recalibration_rescues_a_pruned_network(tmp_path):
    """A trained net with a middle block removed: stale BatchNorm statistics hurt; recalibration restores them."""
    from sdcompress.data import load_dataset
    from sdcompress.config import TrainConfig
    from sdcompress.loops import evaluate
    from sdcompress.train import train

    ds = load_dataset("digits")
    torch.manual_seed(0)
    model, _ = train(TrainConfig(arch="resnet20", data="digits", epochs=6, survival_rule="none"), tmp_path, progress=False, dataset=ds)
    norm = Normalize(ds.mean, ds.std)
    pruned = remove_blocks(model, [0, 1, 3, 4])
    stale = evaluate(pruned, ds.val, norm)["top1"]
    recalibrate_bn(pruned, ds.train, norm, batches=12, batch_size=128)
    fresh = evaluate(pruned, ds.val, norm)["top1"]
    assert fresh > stale + 0.05, (stale, fresh)


def test_parse_size():
    assert parse_size("200KiB") == 204800 and parse_size("1.5MiB") == 1572864 and parse_size("300k") == 300000
    for bad in ("", "12 parsecs", "-5", "0"):
        with pytest.raises(Exception):
            parse_size(bad)


@pytest.fixture(scope="module")
def sd_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("sd") / "run"
    assert main(["train", "--arch", "resnet20", "--data", "digits", "--epochs", "4", "--out", str(out), "--no-progress"]) == 0
    return out


def test_prune_cli_report_is_recomputed_another_way(sd_run, tmp_path, capsys):
    out = tmp_path / "p"
    assert main(["prune", str(sd_run), "--keep", "0.6", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert text.startswith("blocks 9 -> 5, params") and "top-1" in text
    rep = json.loads((out / "report.json").read_text())
    model, meta = load_checkpoint(out)
    assert rep["after"]["model"]["blocks_kept"] == model.block_ids and len(model.block_ids) == 5
    assert rep["after"]["params"]["total"] == sum(t.numel() for t in model.parameters())
    assert rep["after"]["bytes"]["checkpoint"] == os.path.getsize(out / "model.pt")
    assert rep["before"]["bytes"]["checkpoint"] == os.path.getsize(sd_run / "model.pt")
    assert rep["before"]["macs"] > rep["after"]["macs"]
    assert meta.stages[-1]["stage"] == "prune" and sorted(meta.stages[-1]["removed"]) == rep["prune"]["removed"]
    assert (out / "blocks.png").exists() and "blocks 9 -> 5" in (out / "report.md").read_text()


def test_keep_one_changes_nothing(sd_run, tmp_path):
    out = tmp_path / "same"
    assert main(["prune", str(sd_run), "--keep", "1.0", "--out", str(out)]) == 0
    a = torch.load(sd_run / "model.pt", weights_only=True)
    b = torch.load(out / "model.pt", weights_only=True)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    rep = json.loads((out / "report.json").read_text())
    assert rep["before"]["accuracy"]["top1"] == rep["after"]["accuracy"]["top1"]


def test_prune_then_finetune(sd_run, tmp_path):
    out = tmp_path / "ft"
    assert main(["prune", str(sd_run), "--keep", "0.5", "--finetune", "1", "--data", "digits", "--out", str(out), "--no-progress"]) == 0
    rep = json.loads((out / "report.json").read_text())
    assert rep["prune"]["finetune"]["epochs"] == 1


def test_block_scale_unit_is_the_training_steps_network_and_auto_takes_the_lower_loss(sd_run, tmp_path):
    """`--block-scale unit` folds 1/p_l into each kept block's bn2: its evaluation-time network is the training
    network of the draw where exactly the kept blocks run; `survival` keeps p_l f(x); `auto` recalibrates both and
    keeps the one whose loss on training images, the record's, is lower."""

    def prune(name, *args):
        out = tmp_path / name
        assert main(["prune", str(sd_run), "--keep", "0.6", "--data", "digits", "--out", str(out), *args]) == 0
        model, meta = load_checkpoint(out)
        shape[:] = meta.data.input_shape
        return model, meta.stages[-1]["block_scale"]

    shape = []
    unit, rec_u = prune("unit", "--block-scale", "unit", "--recalibrate", "0")
    surv, rec_s = prune("survival", "--block-scale", "survival", "--recalibrate", "0")
    kept = unit.block_ids
    assert len(kept) == 5 and surv.block_ids == kept and rec_u["chosen"] == "unit" and rec_s["chosen"] == "survival"
    p = unit.block_survival()
    assert any(v < 1 for v in p.values())
    for b in kept:  # the branch weights and running statistics as they were; the last BatchNorm's affine divided by p_l
        u, s = unit.blocks[str(b)].bn2, surv.blocks[str(b)].bn2
        assert torch.allclose(u.weight * p[b], s.weight, rtol=1e-6) and torch.allclose(u.bias * p[b], s.bias, rtol=1e-6, atol=1e-7)
        assert torch.equal(u.running_var, s.running_var)
    x = torch.randn(4, *shape)
    with torch.no_grad():  # evaluation-time network == the network of the training draw with exactly the kept blocks
        assert torch.allclose(unit(x), surv(x, {b: True for b in kept}), atol=1e-5)
        assert not torch.allclose(unit(x), surv(x), atol=1e-3)

    auto, rec = prune("auto")
    loss = {float(k): v for k, v in rec["loss"].items()}
    t = rec["exponent"]
    assert {1.0, 0.0} <= set(loss) and t == min(loss, key=loss.get) and loss[0.0] != loss[1.0]
    for b in kept:  # p_l^t f(x): the last BatchNorm's affine times p_l^(t - 1), whatever recalibration did to its statistics
        a, s = auto.blocks[str(b)].bn2, surv.blocks[str(b)].bn2
        assert torch.allclose(a.weight, s.weight * p[b] ** (t - 1), rtol=1e-5) and torch.allclose(a.bias, s.bias * p[b] ** (t - 1), rtol=1e-5, atol=1e-7)
    assert "kept blocks add" in (tmp_path / "auto" / "report.md").read_text()
    if rec["chosen"] in ("unit", "survival"):
        same, _ = prune("same", "--block-scale", rec["chosen"])  # the choice, made by hand: the same weights
        assert all(torch.equal(v, auto.state_dict()[k]) for k, v in same.state_dict().items())


def test_the_block_scale_search_walks_down_while_the_loss_falls():
    """`auto` tries p_l f(x) (t = 1) and f(x) (t = 0); when f(x) is lower it goes on below 0 in steps of 0.5 and
    stops at the first rise (or the floor); when p_l f(x) is lower it tries 0.5 between them."""
    from sdcompress.pruning import EXPONENT_FLOOR, search_exponent

    tried = []

    def bowl(centre):
        def loss(t):
            tried.append(t)
            return (t - centre) ** 2
        return loss

    t, loss = search_exponent(bowl(-0.8))
    assert t == -1.0 and loss == pytest.approx({1.0: 3.24, 0.0: 0.64, -0.5: 0.09, -1.0: 0.04, -1.5: 0.49})
    assert tried == [1.0, 0.0, -0.5, -1.0, -1.5]
    tried.clear()
    t, loss = search_exponent(bowl(0.9))
    assert t == 1.0 and tried == [1.0, 0.0, 0.5]
    tried.clear()
    t, _ = search_exponent(bowl(-10.0))
    assert t == EXPONENT_FLOOR and min(tried) == EXPONENT_FLOOR
    t, _ = search_exponent(lambda t: float("nan") if t == 0.0 else 1.0)  # a non-finite loss is never chosen
    assert t == 1.0


def test_pruning_a_pruned_checkpoint_divides_by_p_l_once(sd_run, tmp_path):
    """A checkpoint whose kept blocks already add f(x) (an earlier prune chose `unit`) is pruned again: `unit` leaves
    their BatchNorm as it is (1/p_l once, not twice), `survival` multiplies p_l back, and each record says which."""
    full, _ = load_checkpoint(sd_run)
    assert main(["prune", str(sd_run), "--keep", "0.8", "--block-scale", "unit", "--recalibrate", "0", "--out", str(tmp_path / "a")]) == 0
    for scale in ("unit", "survival"):
        out = tmp_path / scale
        assert main(["prune", str(tmp_path / "a"), "--keep", "0.7", "--block-scale", scale, "--recalibrate", "0", "--out", str(out)]) == 0
        again, meta = load_checkpoint(out)
        assert meta.stages[-1]["block_scale"]["chosen"] == scale and len(again.block_ids) < 8
        for b in again.block_ids:
            p = again.blocks[str(b)].survival_prob
            want = full.blocks[str(b)].bn2.weight / (p if scale == "unit" else 1.0)
            assert torch.allclose(again.blocks[str(b)].bn2.weight, want, rtol=1e-5), (scale, b)


@pytest.mark.parametrize(
    "args",
    [["--keep", "0"], ["--keep", "-0.5"], ["--keep", "1.5"], ["--keep", "lots"], ["--strategy", "random"],
     ["--max-params", "10"], ["--max-size", "1B"], ["--blocks-to-keep", "0,99"], ["--blocks-to-keep", "a,b"],
     ["--keep", "0.5", "--max-size", "1MiB"]],
)
def test_prune_bad_input(sd_run, tmp_path, capsys, args):
    out = tmp_path / "bad"
    try:
        rc = main(["prune", str(sd_run), "--out", str(out), *args])
    except SystemExit as e:
        rc = e.code
    err = capsys.readouterr().err
    assert rc == 2 and len([l for l in err.splitlines() if l.strip()]) == 1 and "Traceback" not in err
    assert not out.exists() or not any(out.iterdir())


def test_pruned_macs_by_hand():
    from sdcompress.nets import count_macs

    full = build_model(NetSpec("resnet20"))
    pruned = remove_blocks(full, [1, 3, 8])  # 3 is a downsampling block: its shortcut stays, free
    stage1_block = 2 * 32 * 32 * 16 * 16 * 9
    down_block = 16 * 16 * 32 * 16 * 9 + 16 * 16 * 32 * 32 * 9
    stage3_block = 2 * 8 * 8 * 64 * 64 * 9
    assert count_macs(pruned, (3, 32, 32))["total"] == 40_551_040 - stage1_block - down_block - stage3_block
    assert pruned(torch.randn(1, 3, 32, 32)).shape == (1, 10)


def test_every_strategy_is_registered_with_what_it_ranks_by():
    from sdcompress.pruning import IMPORTANCE, RANKED_BY

    assert set(STRATEGIES) == set(IMPORTANCE) | {"every-other"} and set(RANKED_BY) == set(STRATEGIES)


def test_the_report_line_reads_every_record_of_the_block_scale():
    """Records written before the search (losses by name), by it (losses by t) and without a choice all read."""
    from sdcompress.report import block_scale_text

    old = block_scale_text({"chosen": "unit", "why": "lower loss", "loss": {"survival": 0.31, "unit": 0.21}})
    assert old.startswith("- kept blocks add f(x), as in a training step") and "0.3100 at t = 1, 0.2100 at t = 0" in old
    new = block_scale_text({"chosen": "amplified", "exponent": -0.5, "why": "lowest loss", "loss": {"1": 0.31, "0": 0.21, "-0.5": 0.19, "-1": 0.2}})
    assert "p_l^-0.5 f(x), amplified" in new and new.endswith("0.1900 at t = -0.5, 0.2000 at t = -1)")
    assert "p_l f(x), the stochastic depth rule" in block_scale_text({"chosen": "survival", "why": "asked for"})
    assert "add what they added" in block_scale_text({"chosen": None, "why": "p_l not known"})
