"""The zoo's models: schedule, gates, real skip, eval closed form, timm API, bad input."""
import math

import pytest
import timm
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

import sdzoo
from sdzoo.models.sd_resnet import cifar_stage_depths

from helpers import step_compiled_and_eager

ZOO = ["sd_resnet20_cifar", "sd_resnet56_cifar", "sd_resnet110_cifar", "sd_resnet152_cifar",
       "sd_resnet1202_cifar", "sd_resnet50", "sd_resnet101", "sd_resnet152"]


def n_params(model):
    return sum(p.numel() for p in model.parameters())


# -- schedule ------------------------------------------------------------------------------------------
def test_linear_schedule_resnet110():
    probs = sdzoo.survival_probs(54, 0.5, "linear")
    assert len(probs) == 54
    assert probs[0] == pytest.approx(1 - 0.5 / 54)
    assert probs[-1] == pytest.approx(0.5)
    assert all(a > b for a, b in zip(probs, probs[1:]))
    assert sdzoo.expected_depth(54, 0.5) == pytest.approx(40.25)


def test_uniform_schedule_and_constant_depth():
    assert sdzoo.survival_probs(10, 0.8, "uniform") == [0.8] * 10
    assert sdzoo.expected_depth(54, 1.0) == pytest.approx(54)


def test_settings_give_each_blocks_survival_probability():
    settings = sdzoo.SurvivalSettings(survival_prob=0.5, survival_rule="uniform")
    assert settings.block_survival_probs(4) == sdzoo.survival_probs(4, 0.5, "uniform") == [0.5] * 4
    assert sdzoo.SurvivalSettings().block_survival_probs(54) == sdzoo.survival_probs(54, 0.5)
    # constant depth: at gate_mode "off", and once folded (p_l is in the weights then)
    assert sdzoo.SurvivalSettings(gate_mode="off").block_survival_probs(3) == [1.0] * 3
    assert settings.folded().block_survival_probs(3) == [1.0] * 3
    with pytest.raises(ValueError, match="num_blocks"):
        settings.block_survival_probs(0)


def test_model_uses_the_schedule():
    model = timm.create_model("sd_resnet110_cifar")
    assert len(model.residual_blocks()) == 54
    assert model.block_survival_probs() == pytest.approx(sdzoo.survival_probs(54, 0.5))
    assert model.expected_depth() == pytest.approx(40.25)
    uniform = timm.create_model("sd_resnet110_cifar", survival_rule="uniform", survival_prob=0.8)
    assert uniform.block_survival_probs() == pytest.approx([0.8] * 54)
    off = timm.create_model("sd_resnet110_cifar", gate_mode="off")
    assert off.expected_depth() == 54


# -- architecture --------------------------------------------------------------------------------------
def test_parameter_counts():
    with torch.device("meta"):
        r110 = timm.create_model("sd_resnet110_cifar", num_classes=10)
        r1202 = timm.create_model("sd_resnet1202_cifar", num_classes=10)
        projection = timm.create_model("sd_resnet110_cifar", num_classes=10, shortcut="projection")
    assert n_params(r110) == pytest.approx(1.7e6, rel=0.03)
    assert n_params(r1202) == pytest.approx(19.4e6, rel=0.01)
    # two 1x1 projections with BN (16->32, 32->64) are all option B adds
    assert n_params(projection) - n_params(r110) == 16 * 32 + 2 * 32 + 32 * 64 + 2 * 64


@pytest.mark.parametrize("depth,blocks", [(20, 3), (56, 9), (110, 18), (152, 25), (1202, 200)])
def test_cifar_depths(depth, blocks):
    assert cifar_stage_depths(depth) == (blocks,) * 3


def test_zero_pad_shortcut_is_option_a():
    model = timm.create_model("sd_resnet20_cifar")
    shortcut = model.layer2[0].downsample
    x = torch.randn(2, 16, 8, 8)
    out = shortcut(x)
    assert out.shape == (2, 32, 4, 4)
    assert torch.equal(out[:, :16], x[:, :, ::2, ::2])
    assert torch.count_nonzero(out[:, 16:]) == 0
    assert n_params(shortcut) == 0


# -- real skip and FLOPs -------------------------------------------------------------------------------
def _train_step_flops(model, x):
    with FlopCounterMode(display=False) as counter:
        model(x).sum().backward()
    return counter.get_total_flops(), counter.get_flop_counts()


def _mean_train_flops(steps, batch_size, **kwargs):
    model = timm.create_model("sd_resnet110_cifar", gate_seed=1, **kwargs).train()
    x = torch.randn(batch_size, 3, 32, 32)
    return sum(_train_step_flops(model, x)[0] for _ in range(steps)) / steps


def _branch_flops(batch_size):
    """Constant depth's training-step FLOPs, and each of the 54 branches' share of them."""
    model = timm.create_model("sd_resnet110_cifar", gate_mode="off").train()
    total, per_module = _train_step_flops(model, torch.randn(batch_size, 3, 32, 32))
    branch_flops = [sum(sum(per_module.get(f"SDResNet.{stage}.{i}.{layer}", {}).values())
                        for layer in ("conv1", "bn1", "conv2", "bn2"))
                    for stage in ("layer1", "layer2", "layer3") for i in range(18)]
    return total, branch_flops


def _predicted_flops(batch_size):
    """What the schedule predicts: constant-depth cost less each branch's cost times (1 - p_l)."""
    total, branch_flops = _branch_flops(batch_size)
    probs = sdzoo.survival_probs(54, 0.5)
    return total, total - sum((1 - p) * f for p, f in zip(probs, branch_flops))


def test_training_flops_follow_the_schedule():
    # Each step computes exactly the branches its draw kept, and block l is kept with probability p_l: so
    # the executed FLOPs follow the schedule in expectation, as many cheap draws then show.
    off, branch_flops = _branch_flops(batch_size=2)
    model = timm.create_model("sd_resnet110_cifar", gate_seed=1).train()
    x = torch.randn(2, 3, 32, 32)
    for _ in range(6):
        executed = _train_step_flops(model, x)[0]
        gates, _ = model.gate_sampler.last_draw
        assert 0 < sum(not bool(g) for g in gates) < 54
        assert executed == off - sum(f for g, f in zip(gates, branch_flops) if not bool(g))
    assert _mean_train_flops(steps=1, batch_size=2, gate_mode="off") == off

    draws = 4000
    kept = torch.stack([torch.stack(model.gate_sampler.draw(2, step=step)) for step in range(draws)])
    probs = torch.tensor(sdzoo.survival_probs(54, 0.5))
    assert (kept.double().mean(0) - probs).abs().max() < 4 * (0.25 / draws) ** 0.5  # 4 standard deviations
    mean_flops = off - (~kept).double().mean(0) @ torch.tensor(branch_flops, dtype=torch.float64)
    predicted = off - ((1 - probs.double()) * torch.tensor(branch_flops, dtype=torch.float64)).sum()
    assert float(mean_flops) == pytest.approx(float(predicted), rel=0.005)
    assert 0.72 < float(predicted) / off < 0.78  # about 0.75 of constant depth


def test_sample_mode_flops_follow_the_schedule():
    # round(p_l * B) of B samples run each branch: the same proportion at every step, so a few steps do
    off, predicted = _predicted_flops(batch_size=16)
    sample = _mean_train_flops(steps=3, batch_size=16, gate_mode="sample")
    assert sample == pytest.approx(predicted, rel=0.02)
    assert 0.72 < sample / off < 0.78


def test_dropped_branch_is_not_computed():
    model = timm.create_model("sd_resnet20_cifar", survival_prob=0.5, gate_seed=0).train()
    calls = [0] * 9
    for i, blk in enumerate(model.residual_blocks()):
        blk.conv1.register_forward_hook(lambda m, a, o, i=i: calls.__setitem__(i, calls[i] + 1))
    expected = model.gate_sampler.draw(2)  # the next training forward's gates (drawing uses nothing up)
    model(torch.randn(2, 3, 32, 32)).sum().backward()
    assert calls == [int(k) for k in expected]
    assert 0 < sum(calls) < 9
    # A skipped branch is not computed, but its parameters get a zero gradient, not a missing one.
    for ran, blk in zip(calls, model.residual_blocks()):
        grads = [p.grad for layer in blk.branch_layers() for p in layer.parameters()]
        assert all(g is not None for g in grads)
        assert any(torch.count_nonzero(g) for g in grads) if ran else not any(torch.count_nonzero(g) for g in grads)


def test_sample_mode_runs_branch_on_kept_samples_only():
    model = timm.create_model("sd_resnet20_cifar", gate_mode="sample", survival_prob=0.5).train()
    sizes = []
    for blk in model.residual_blocks():
        blk.conv1.register_forward_pre_hook(lambda m, a: sizes.append(a[0].shape[0]))
    model(torch.randn(16, 3, 32, 32))
    probs = model.block_survival_probs()
    assert sizes == [round(p * 16) for p in probs]


# -- eval: deterministic closed form ------------------------------------------------------------------
def _closed_form(model, x):
    """H_l = ReLU(shortcut(H_{l-1}) + p_l * f_l(H_{l-1})), written out from the modules."""
    x = model.act1(model.bn1(model.conv1(x)))
    for blk in model.residual_blocks():
        shortcut = x if blk.downsample is None else blk.downsample(x)
        x = F.relu(shortcut + blk.gate.survival_prob * blk.branch(x))
    return model.fc(x.mean((2, 3)))


@pytest.mark.parametrize("gate_mode", ["batch", "sample"])
def test_eval_is_deterministic_closed_form(gate_mode):
    torch.manual_seed(0)
    model = timm.create_model("sd_resnet20_cifar", gate_mode=gate_mode)
    x = torch.randn(4, 3, 32, 32)
    model.train()
    for _ in range(3):  # move BN statistics away from init
        model(x)
    model.eval()
    step = model.gate_sampler.step
    with torch.no_grad():
        out1, out2 = model(x), model(x)
        expected = _closed_form(model, x)
    assert torch.equal(out1, out2)
    torch.testing.assert_close(out1, expected, rtol=1e-5, atol=1e-5)
    assert model.gate_sampler.step == step, "eval must not consume gate draws"
    model.train()
    with torch.no_grad():
        model(x)
    assert model.gate_sampler.step == step + 1, "train mode must roll the dice again"


def test_inverted_scaling():
    torch.manual_seed(0)
    model = timm.create_model("sd_resnet20_cifar", scaling="inverted", survival_prob=0.5).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        plain = timm.create_model("sd_resnet20_cifar", gate_mode="off").eval()
        plain.load_state_dict(model.state_dict())
        torch.testing.assert_close(model(x), plain(x))  # identity at eval
        # training with every gate open: each branch divided by its p_l
        blk = model.layer1[0].train()
        h = torch.randn(2, 16, 8, 8).relu()
        out = blk.act2(blk.gate.apply_gate(torch.tensor(True), blk.branch, h, h))
        expected = F.relu(h + blk.branch(h) / blk.gate.survival_prob)
        torch.testing.assert_close(out, expected)


@pytest.mark.parametrize("name", ["sd_resnet20_cifar", "sd_resnet50"])
def test_a_blocks_branch_is_its_residual_method_in_timms_layer_names(name):
    torch.manual_seed(0)
    model = timm.create_model(name, layers=[1] * (3 if "cifar" in name else 4), num_classes=10).eval()
    blk = model.residual_blocks()[1]
    x = torch.randn(2, blk.conv1.in_channels, 8, 8)
    with torch.no_grad():
        written_out = blk.bn2(blk.conv2(blk.act1(blk.bn1(blk.conv1(x)))))
        if hasattr(blk, "conv3"):  # the bottleneck goes on
            written_out = blk.bn3(blk.conv3(blk.act2(written_out)))
        assert torch.equal(blk.residual(x), written_out) and torch.equal(blk.branch(x), written_out)
    assert blk.branch_layers() == [getattr(blk, layer) for layer in blk.branch_layer_names]
    # timm's keys: the branch's layers at the block's top level (a projection shortcut adds downsample.*)
    expected = {"conv1", "bn1", "conv2", "bn2"} | ({"conv3", "bn3", "downsample"} if hasattr(blk, "conv3") else set())
    assert {key.split(".")[0] for key in blk.state_dict()} == expected


# -- dice --------------------------------------------------------------------------------------------
def _draws(seed, steps=20, mode="batch"):
    model = timm.create_model("sd_resnet110_cifar", gate_seed=seed, gate_mode=mode).train()
    return [torch.stack([g.to(torch.int64).flatten().sum() if mode == "sample" else g for g in
                         model.gate_sampler.draw(8, step=step)]) for step in range(steps)]


def test_same_seed_same_gates_other_seed_other_gates():
    a, b, c = _draws(7), _draws(7), _draws(8)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not all(torch.equal(x, y) for x, y in zip(a, c))
    assert len({tuple(x.tolist()) for x in a}) > 1, "every step must roll new dice"


def test_same_seed_same_training_outputs():
    x = torch.randn(4, 3, 32, 32)
    outs = []
    for _ in range(2):
        torch.manual_seed(0)
        model = timm.create_model("sd_resnet20_cifar", gate_seed=5, gate_mode="sample").train()
        outs.append(torch.stack([model(x) for _ in range(3)]))
    assert torch.equal(*outs)


# -- torch.compile -------------------------------------------------------------------------------------
@pytest.mark.slow  # compiles (the slow marker's rule)
@pytest.mark.parametrize("gate_mode", ["batch", "sample"])
def test_compile_keeps_dice_random_without_recompiles(gate_mode):
    import copy

    from torch._dynamo.testing import CompileCounterWithBackend
    torch._dynamo.reset()
    torch.manual_seed(0)
    # three blocks are enough to see every step follow its own draws
    model = timm.create_model("sd_resnet20_cifar", layers=[1, 1, 1], gate_mode=gate_mode, gate_seed=11).train()
    eager = copy.deepcopy(model)
    ran = [0] * 3
    for i, blk in enumerate(eager.residual_blocks()):
        blk.conv1.register_forward_hook(lambda m, a, o, i=i: ran.__setitem__(i, ran[i] + 1))
    sampler = model.gate_sampler
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(model, backend=counter)
    x = torch.randn(4, 3, 32, 32)
    steps, drawn, frames = 12, [0] * 3, []
    for step in range(steps):
        for i, g in enumerate(sampler.draw(4, step=step)):
            drawn[i] += int(g) if gate_mode == "batch" else 1
        step_compiled_and_eager(compiled, eager, x)
        frames.append(counter.frame_count)
    # the compiled model followed every step's draws, as the eager twin that counted its branch calls
    assert ran == drawn
    if gate_mode == "batch":
        assert 0 < sum(ran) < steps * 3 and len(set(ran)) > 1
    assert frames[-1] == frames[0], f"recompiled during training: frame counts {frames}"
    # eager and compiled agree on the gradients, zeros for the skipped blocks included
    for a, b in zip(model.parameters(), eager.parameters()):
        assert a.grad is not None and b.grad is not None
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-4)
    for a, b in zip(model.buffers(), eager.buffers()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


# -- timm integration ----------------------------------------------------------------------------------
def test_list_models():
    assert set(timm.list_models("sd_*")) == set(ZOO)


def test_create_by_name_tag_and_num_classes():
    model = timm.create_model("sd_resnet56_cifar.cifar100")
    assert model.num_classes == 100 and model.pretrained_cfg["tag"] == "cifar100"
    assert timm.create_model("sd_resnet152_cifar").pretrained_cfg["tag"] == "svhn"
    assert timm.create_model("sd_resnet20_cifar", num_classes=7)(torch.randn(1, 3, 32, 32)).shape == (1, 7)
    in1k = timm.create_model("sd_resnet50")
    assert in1k.num_classes == 1000 and in1k.pretrained_cfg["input_size"] == (3, 224, 224)
    cfg = timm.data.resolve_data_config({}, model=model)
    assert cfg["input_size"] == (3, 32, 32) and len(cfg["mean"]) == 3


def test_timm_model_api():
    model = timm.create_model("sd_resnet20_cifar").eval()
    x = torch.randn(2, 3, 32, 32)
    feats = model.forward_features(x)
    assert feats.shape == (2, 64, 8, 8)
    assert model.forward_head(feats, pre_logits=True).shape == (2, 64)
    assert torch.equal(model.forward_head(feats), model(x))
    assert model.get_classifier() is model.fc
    model.reset_classifier(5)
    assert model(x).shape == (2, 5)
    model.reset_classifier(0)
    assert model(x).shape == (2, 64)
    groups = model.group_matcher()
    assert "stem" in groups and "blocks" in groups
    final, inter = model.forward_intermediates(x)
    assert [t.shape[1] for t in inter] == [16, 16, 32, 64] and torch.equal(final, feats)


def test_grad_checkpointing_matches():
    torch.manual_seed(0)
    a = timm.create_model("sd_resnet20_cifar", gate_seed=3).train()
    b = timm.create_model("sd_resnet20_cifar", gate_seed=3).train()
    b.load_state_dict(a.state_dict())
    b.set_grad_checkpointing(True)
    x = torch.randn(2, 3, 32, 32)
    a(x).sum().backward()
    b(x).sum().backward()
    for pa, pb in zip(a.parameters(), b.parameters()):
        assert (pa.grad is None) == (pb.grad is None)
        if pa.grad is not None:
            torch.testing.assert_close(pa.grad, pb.grad)


@pytest.mark.parametrize("name,size,chs,reductions", [
    ("sd_resnet20_cifar", 32, [16, 16, 32, 64], [1, 1, 2, 4]),
    ("sd_resnet50", 64, [64, 256, 512, 1024, 2048], [2, 4, 8, 16, 32]),
])
def test_features_only(name, size, chs, reductions):
    model = timm.create_model(name, features_only=True).eval()
    assert model.feature_info.channels() == chs
    assert model.feature_info.reduction() == reductions
    feats = model(torch.randn(1, 3, size, size))
    assert [f.shape[1] for f in feats] == chs
    assert [size // f.shape[-1] for f in feats] == reductions
    sub = timm.create_model(name, features_only=True, out_indices=(1, 2))
    assert sub.feature_info.channels() == chs[1:3]


def test_survival_settings_round_trip_through_timm(tmp_path):
    from timm.models import save_for_hf
    model = timm.create_model("sd_resnet20_cifar", survival_prob=0.7, survival_rule="uniform",
                              gate_mode="sample", scaling="inverted", gate_seed=4).eval()
    save_for_hf(model, tmp_path)
    loaded = timm.create_model(f"local-dir:{tmp_path}", pretrained=True).eval()
    for key in ("survival_prob", "survival_rule", "gate_mode", "scaling"):
        assert getattr(loaded, key) == getattr(model, key)
    assert loaded.block_survival_probs() == model.block_survival_probs()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))


def test_drop_path_rate_is_one_minus_survival_prob():
    model = timm.create_model("sd_resnet20_cifar", drop_path_rate=0.3)
    assert model.survival_prob == pytest.approx(0.7)
    assert model.block_survival_probs()[-1] == pytest.approx(0.7)


def test_survival_settings_are_one_value_that_every_record_reads():
    """The model's attributes, its model args (config.json, timm's get_model_args), the weights' metadata and
    the ONNX metadata all come from ``model.survival_settings``; folding replaces it, and all of them follow."""
    import dataclasses
    import json
    from timm.models import get_model_args
    from sdzoo.files.weights import SETTINGS_KEY, weights_metadata
    from sdzoo.fold import fold_survival
    from sdzoo.export.onnx_export import onnx_metadata

    model = timm.create_model("sd_resnet20_cifar", survival_prob=0.7, survival_rule="uniform", gate_seed=3,
                              num_classes=10)
    settings = model.survival_settings
    assert settings == sdzoo.SurvivalSettings(survival_prob=0.7, survival_rule="uniform", gate_seed=3)
    with pytest.raises(dataclasses.FrozenInstanceError):
        settings.gate_mode = "off"
    with pytest.raises(AttributeError):
        model.gate_mode = "off"  # a view of the settings: fold_survival replaces them instead
    trained = dict(survival_prob=0.7, survival_rule="uniform", scaling="expectation", gate_mode="batch")

    fold_survival(model)
    assert model.survival_settings.folded_from.trained_dict() == settings.trained_dict() == trained
    assert model.survival_settings.gate_mode == "off"
    assert (model.gate_mode, model.survival_prob, model.folded_from) == ("off", 0.7, trained)
    args = get_model_args(model)
    assert args["gate_mode"] == "off" and args["folded_from"] == trained and args["gate_seed"] == 3
    recorded = json.loads(weights_metadata(model)[SETTINGS_KEY])["model_args"]
    assert recorded == dict(trained, gate_mode="off", folded_from=trained)  # no seed: it is not in the weights
    meta = onnx_metadata(model)
    assert json.loads(meta["stochastic_depth"]) == trained and meta["folded"] == "true"
    rebuilt = timm.create_model("sd_resnet20_cifar", **args)
    assert rebuilt.survival_settings == model.survival_settings


@pytest.mark.parametrize("kwargs,match", [
    (dict(survival_prob=0), "survival_prob must be in"),
    (dict(survival_rule="cosine"), "survival_rule must be one of 'linear', 'uniform'"),
    (dict(scaling="none"), "scaling must be one of 'expectation', 'inverted'"),
    (dict(gate_mode="row"), "gate_mode must be one of 'batch', 'sample', 'off'"),
    (dict(gate_seed=-1), "gate_seed must be an integer in"),
    (dict(folded_from={"survival_prob": 0.5, "gate_seed": 1}), "folded_from must be .* a mapping of survival_prob, "
                                                                "survival_rule, scaling, gate_mode"),
    (dict(folded_from=[0.5]), "folded_from must be"),
    (dict(folded_from={"survival_rule": "cosine"}), "survival_rule must be one of"),
])
def test_survival_settings_are_checked_when_made(kwargs, match):
    with pytest.raises(ValueError, match=match):
        sdzoo.SurvivalSettings(**kwargs)


def test_survival_settings_from_model_args():
    from_args = sdzoo.SurvivalSettings.from_args
    assert from_args({}) == sdzoo.SurvivalSettings()
    assert from_args(dict(drop_path_rate=0.25, layers=[3, 3, 3], survival_rule=None)).survival_prob == 0.75
    folded = from_args(dict(gate_mode="sample", folded_from=dict(survival_prob=0.5)))
    assert folded.gate_mode == "off" and folded.folded_from == sdzoo.SurvivalSettings()
    with pytest.raises(ValueError, match="already folded"):
        folded.folded()


# -- bad input ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs,match", [
    (dict(survival_prob=0.0), "survival_prob"),
    (dict(survival_prob=1.5), "survival_prob"),
    (dict(survival_prob=-0.1), "survival_prob"),
    (dict(survival_prob="high"), "survival_prob"),
    (dict(survival_rule="cosine"), "survival_rule.*'linear', 'uniform'"),
    (dict(gate_mode="row"), "gate_mode.*'batch', 'sample', 'off'"),
    (dict(scaling="none"), "scaling.*'expectation', 'inverted'"),
    (dict(shortcut="B"), "shortcut.*'zero_pad', 'projection'"),
    (dict(drop_path_rate=1.0), "drop_path_rate"),
    (dict(drop_path_rate=0.2, survival_prob=0.5), "disagree"),
    (dict(survival_prob=True), "survival_prob"),
    (dict(gate_seed="abc"), "gate_seed"),
    (dict(gate_seed=2**70), "gate_seed"),
    (dict(global_pool="bogus"), "global_pool"),
    (dict(drop_rate=1.5), "drop_rate"),
    (dict(num_classes=-3), "num_classes"),
])
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        timm.create_model("sd_resnet20_cifar", **kwargs)


@pytest.mark.parametrize("depth", [21, 0, 2, 110.0, "110"])
def test_bad_cifar_depth(depth):
    with pytest.raises(ValueError, match="depth must be 6n\\+2"):
        cifar_stage_depths(depth)


def test_bad_schedule_arguments():
    with pytest.raises(ValueError, match="num_blocks"):
        sdzoo.survival_probs(0, 0.5)
    with pytest.raises(ValueError, match="survival_prob"):
        sdzoo.survival_probs(10, math.nan)


def test_sample_mode_inverted_scaling_divides_by_the_kept_share():
    torch.manual_seed(0)
    blk = timm.create_model("sd_resnet20_cifar", gate_mode="sample", scaling="inverted").layer1[0].train()
    h = torch.randn(5, 16, 8, 8).relu()
    kept = torch.tensor([1, 3])  # 2 of 5 samples run the branch
    out = blk.act2(blk.gate.apply_gate(kept, blk.branch, h, h))
    expected = h.clone()
    expected[kept] = h[kept] + blk.branch(h[kept]) * (5 / 2)  # train-mode BN sees the kept rows only, too
    torch.testing.assert_close(out, F.relu(expected))


# -- every model -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ZOO)
def test_every_model_trains_a_step_and_has_a_cfg(name):
    """timm's sweep in small: every registered model builds, runs forward and backward, and has a cfg."""
    torch.manual_seed(0)
    model = timm.create_model(name, num_classes=3).train()
    cfg = model.pretrained_cfg
    assert isinstance(cfg["input_size"], tuple) and len(cfg["mean"]) == len(cfg["std"]) == 3
    size = 32 if name.endswith("_cifar") else 64  # the ImageNet layout at a small input, as timm's tests do
    out = model(torch.randn(2, 3, size, size))
    assert out.shape == (2, 3) and torch.isfinite(out).all()
    out.mean().backward()
    assert all(p.grad is not None for p in model.parameters())
