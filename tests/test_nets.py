import pytest
import torch

from sdcompress.nets import ARCHS, BasicBlock, NetSpec, Shortcut, build_model, count_macs, count_params


@pytest.mark.parametrize("arch,params", [("resnet20", 269_722), ("resnet56", 853_018)])
def test_parameter_counts_by_hand(arch, params):
    # option-A CIFAR ResNets ("0.27M" and "0.85M" in He et al. 2016, table 6), recounted by hand:
    n = int(arch[6:]) // 6
    stem = 3 * 16 * 9 + 2 * 16
    blocks = 0
    for cin, cout in ((16, 16), (16, 32), (32, 64)):
        blocks += cin * cout * 9 + cout * cout * 9 + 4 * cout  # first block of the stage
        blocks += (n - 1) * (2 * cout * cout * 9 + 4 * cout)
    fc = 64 * 10 + 10
    model = build_model(NetSpec(arch))
    assert count_params(model) == stem + blocks + fc == params


def test_registry_depths():
    for arch, n in ARCHS.items():
        assert int(arch[6:]) == 6 * n + 2


def test_macs_by_hand_resnet20():
    hw = {1: 32 * 32, 2: 16 * 16, 3: 8 * 8}
    stem = hw[1] * 16 * 3 * 9
    stage1 = 6 * hw[1] * 16 * 16 * 9
    stage2 = hw[2] * 32 * 16 * 9 + 5 * hw[2] * 32 * 32 * 9
    stage3 = hw[3] * 64 * 32 * 9 + 5 * hw[3] * 64 * 64 * 9
    fc = 64 * 10
    macs = count_macs(build_model(NetSpec("resnet20")), (3, 32, 32))
    assert macs["total"] == stem + stage1 + stage2 + stage3 + fc == 40_551_040
    assert macs["per_block"][0] == 2 * hw[1] * 16 * 16 * 9


def test_any_channels_and_classes():
    model = build_model(NetSpec("resnet20", in_channels=1, num_classes=7)).eval()
    assert model(torch.randn(2, 1, 28, 28)).shape == (2, 7)


def test_eval_output_is_deterministic():
    torch.manual_seed(0)
    model = build_model(NetSpec("resnet20")).eval()
    x = torch.randn(4, 3, 32, 32)
    assert torch.equal(model(x), model(x))


def test_eval_scales_each_branch_by_its_survival_probability():
    torch.manual_seed(0)
    model = build_model(NetSpec("resnet20", survival_rule="linear", p_last=0.5)).eval()
    blk = model.blocks["8"]
    assert blk.survival_prob == pytest.approx(0.5)
    x = torch.rand(2, 64, 8, 8)
    assert torch.allclose(blk(x, blk.survival_prob), torch.relu(x + 0.5 * blk.branch(x)))


def test_dropped_block_gets_no_gradient_and_is_not_computed():
    torch.manual_seed(0)
    model = build_model(NetSpec("resnet20")).train()
    calls = []
    model.blocks["4"].conv1.register_forward_hook(lambda *a: calls.append(1))
    run_mask = {l: l != 4 for l in range(9)}
    model(torch.randn(8, 3, 32, 32), run_mask).sum().backward()
    assert calls == []
    assert all(p.grad is None for p in model.blocks["4"].parameters())
    assert all(p.grad is not None for p in model.blocks["5"].parameters())


@pytest.mark.parametrize("removed", [4, 3, 6])  # 3 and 6 are the downsampling blocks of resnet20
def test_removing_a_block_gives_exactly_its_shortcut(removed):
    torch.manual_seed(0)
    full = build_model(NetSpec("resnet20", survival_rule="none")).eval()
    for m in full.modules():  # non-trivial BN statistics
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 1.5)
    kept = [l for l in range(9) if l != removed]
    pruned = build_model(full.spec.with_kept(kept)).eval()
    missing = pruned.load_state_dict({k: v for k, v in full.state_dict().items() if not k.startswith(f"blocks.{removed}.")})
    assert missing.missing_keys == [] and missing.unexpected_keys == []
    assert not any(k.startswith(f"blocks.{removed}.") for k in pruned.state_dict())
    if removed in (3, 6):
        assert isinstance(pruned.blocks[str(removed)], Shortcut)
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        expected = full(x, {l: l != removed for l in range(9)})
        assert torch.allclose(pruned(x), expected, atol=1e-6)
        # and at block level: a dropped block is its shortcut
        h = torch.relu(torch.randn(2, 16, 32, 32))
        blk = full.blocks["3"]
        assert torch.equal(blk.shortcut(h), Shortcut(16, 32, 2)(h))
    assert count_params(pruned) < count_params(full)


def test_spec_validation():
    with pytest.raises(ValueError, match="unknown architecture"):
        NetSpec("resnet57")
    with pytest.raises(ValueError, match="blocks_kept"):
        NetSpec("resnet20", blocks_kept=(3, 1))
    with pytest.raises(ValueError, match="blocks_kept"):
        NetSpec("resnet20", blocks_kept=(0, 9))
    spec = NetSpec("resnet56", blocks_kept=(0, 1, 26))
    assert NetSpec.from_dict(spec.to_dict()) == spec
    assert [isinstance(m, BasicBlock) for m in build_model(spec).blocks.values()] == [True, True, False, False, True]
