"""Two CPU processes with gloo, as torchrun would start them, on a tiny model and data."""

import json
import socket
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _Stop(Exception):
    pass


def _worker(rank: int, world: int, port: int, out: str, logs: str, sync_bn: bool, stop_at: int = -1, resume: bool = False) -> None:
    import os

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    import sdcompress.train as tr
    from sdcompress.config import TrainConfig
    from sdcompress.distributed import teardown

    writes = []
    real_save = tr.save_checkpoint
    tr.save_checkpoint = lambda *a, **k: (writes.append(rank), real_save(*a, **k))[1]
    masks = []

    def on_step(step, keep):
        if step == stop_at:
            raise _Stop  # every rank stops at the same step, mid-epoch, as if the job were killed
        masks.append(keep)

    cfg = TrainConfig(arch="resnet20", data="digits", epochs=2, batch_size=64, lr=0.1, device="cpu", p_last=0.5,
                      contrib_every=2, sync_bn=sync_bn)
    try:
        try:
            model, meta = tr.train(cfg, out, progress=False, on_step=on_step, resume=resume)
        except _Stop:
            return
        torch.save({k: v.detach().cpu() for k, v in model.state_dict().items()}, Path(logs) / f"state{rank}.pt")
        (Path(logs) / f"rank{rank}.json").write_text(json.dumps({"masks": masks, "writes": writes, "history": meta.raw.get("history")}))
    finally:
        teardown()


@pytest.mark.timeout(240)
def test_two_process_gloo_training(tmp_path):
    sync_bn = False
    out, logs = tmp_path / "run", tmp_path / "logs"
    logs.mkdir()
    mp.spawn(_worker, args=(2, _free_port(), str(out), str(logs), sync_bn), nprocs=2, join=True)
    r0 = json.loads((logs / "rank0.json").read_text())
    r1 = json.loads((logs / "rank1.json").read_text())
    assert len(r0["masks"]) == len(r1["masks"]) > 20
    assert r0["masks"] == r1["masks"]  # identical drop draws at every step
    assert any(not all(m) for m in r0["masks"])  # and blocks were in fact dropped
    s0, s1 = torch.load(logs / "state0.pt"), torch.load(logs / "state1.pt")
    assert s0.keys() == s1.keys()
    for k in s0:  # parameters (and BN buffers) identical across ranks
        assert torch.equal(s0[k], s1[k]), k
    h = r0["history"]
    assert h[-1]["train_loss"] < h[0]["train_loss"]  # the loss fell
    assert r0["writes"] == [0, 0] and r1["writes"] == []  # only rank 0 wrote, once per epoch
    from sdcompress.checkpoint import load_checkpoint

    model, meta = load_checkpoint(out)
    assert meta.raw["distributed"]["world_size"] == 2 and meta.raw["distributed"]["global_batch"] == 64
    assert meta.raw["distributed"]["sync_bn"] == sync_bn
    for k, v in model.state_dict().items():
        assert torch.equal(v, s0[k]), k
    assert meta.survival_stats.steps == len(r0["masks"])

    # --resume under torchrun: stopped mid-epoch 2 on both ranks, resumed, the same weights as the run above
    cut = tmp_path / "cut"
    mp.spawn(_worker, args=(2, _free_port(), str(cut), str(logs), False, 30), nprocs=2, join=True)
    assert torch.load(cut / "train_state.pt", weights_only=True)["epoch"] == 1
    mp.spawn(_worker, args=(2, _free_port(), str(cut), str(logs), False, -1, True), nprocs=2, join=True)
    b = torch.load(cut / "model.pt", weights_only=True)
    assert all(torch.equal(s0[k], b[k]) for k in b)
    assert json.loads((out / "model.json").read_text())["survival_stats"] == json.loads((cut / "model.json").read_text())["survival_stats"]


def test_sync_bn_needs_several_cuda_processes(tmp_path, capsys):
    from sdcompress.cli import main

    assert main(["train", "--arch", "resnet20", "--data", "digits", "--epochs", "1", "--sync-bn", "--out", str(tmp_path / "o")]) == 2
    assert "--sync-bn" in capsys.readouterr().err
    assert not (tmp_path / "o" / "model.pt").exists()
