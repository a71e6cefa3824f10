import json
import os
import pickle

import pytest
import torch

from sdcompress.checkpoint import SCHEMA, load_checkpoint, read_sidecar, save_checkpoint
from sdcompress.errors import InputError
from sdcompress.nets import NetSpec, build_model

META = {"data": {"name": "toy", "source": "toy.npz", "input_shape": [3, 32, 32], "mean": [0.5] * 3, "std": [0.25] * 3,
                 "classes": list("abcdefghij")}, "stages": [{"stage": "train", "config": {}}]}


def test_round_trip_full_and_pruned(tmp_path):
    for kept in (None, (0, 1, 4, 8)):
        torch.manual_seed(0)
        model = build_model(NetSpec("resnet20", blocks_kept=kept)).eval()
        save_checkpoint(tmp_path / str(kept), model, META)
        loaded, meta = load_checkpoint(tmp_path / str(kept))
        assert meta.raw["schema"] == SCHEMA and loaded.spec == model.spec == meta.spec
        x = torch.randn(2, 3, 32, 32)
        assert torch.equal(loaded(x), model(x))
        state = torch.load(tmp_path / str(kept) / "model.pt", weights_only=True)
        assert set(state) == set(model.state_dict())
    assert os.path.getsize(tmp_path / "(0, 1, 4, 8)" / "model.pt") < os.path.getsize(tmp_path / "None" / "model.pt")


def test_sidecar_is_plain_json_with_the_spec(tmp_path):
    save_checkpoint(tmp_path, build_model(NetSpec("resnet20", blocks_kept=(0, 2))), META)
    side = json.loads((tmp_path / "model.json").read_text())
    assert side["spec"]["blocks_kept"] == [0, 2] and side["spec"]["blocks_total"] == 9


def _saved(tmp_path):
    save_checkpoint(tmp_path, build_model(NetSpec("resnet20")), META)
    return tmp_path


def test_corrupt_sidecar(tmp_path):
    (_saved(tmp_path) / "model.json").write_text("{not json")
    with pytest.raises(InputError, match="corrupt sidecar"):
        load_checkpoint(tmp_path)


def test_newer_schema(tmp_path):
    p = _saved(tmp_path) / "model.json"
    p.write_text(json.dumps({**json.loads(p.read_text()), "schema": "sdcompress.checkpoint/9"}))
    with pytest.raises(InputError, match="upgrade"):
        read_sidecar(p)


def test_missing_sidecar(tmp_path):
    (_saved(tmp_path) / "model.json").unlink()
    with pytest.raises(InputError, match="sidecar"):
        load_checkpoint(tmp_path)


def test_weights_that_disagree_with_the_sidecar(tmp_path):
    p = _saved(tmp_path) / "model.json"
    meta = json.loads(p.read_text())
    meta["spec"]["blocks_kept"] = [0, 1, 2]
    p.write_text(json.dumps(meta))
    with pytest.raises(InputError, match="do not match"):
        load_checkpoint(tmp_path)


def test_truncated_weights(tmp_path):
    w = _saved(tmp_path) / "model.pt"
    w.write_bytes(w.read_bytes()[:1000])
    with pytest.raises(InputError, match="corrupt"):
        load_checkpoint(tmp_path)


class _Evil:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_pickle_that_would_run_code_is_refused(tmp_path):
    ckpt = _saved(tmp_path / "ckpt")
    victim = tmp_path / "pwned.txt"
    with open(ckpt / "model.pt", "wb") as f:
        pickle.dump({"x": _Evil(str(victim))}, f)
    torch.save({"stem.weight": _Evil(str(victim))}, ckpt / "model.pt")
    with pytest.raises(InputError, match="refused|corrupt"):
        load_checkpoint(ckpt)
    assert not victim.exists()
