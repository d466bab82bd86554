"""Depth on demand: sdzoo.prune, its metadata, the export's pruning flags, the depth sweep and the card."""
import copy
import json
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

import timm
from sdzoo.files.weights import read_weights_settings, save_weights
from sdzoo.fold import fold_survival
from sdzoo.files.hf_config import write_config
from sdzoo.export.onnx_export import export_onnx, op_histogram, read_metadata
from sdzoo.prune import block_names, blocks_to_keep, greedy_removals, prune_blocks
import sdzoo.cli.depth_sweep
import sdzoo.cli.export
import sdzoo.cli.push
from helpers import randomize_batchnorm

X = torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(1))


def make_model(seed=0, **kwargs):
    torch.manual_seed(seed)
    return randomize_batchnorm(timm.create_model("sd_resnet20_cifar", num_classes=10, **kwargs)).eval()


def logits(model, x=X):
    with torch.no_grad():
        return model.eval()(x)


def without_branches(model, names):
    """The unpruned eval model with the branches of ``names`` forced off: those blocks return their shortcut."""
    model = copy.deepcopy(model)
    for name in names:
        model.get_submodule(name).gate.forward = lambda branch, shortcut, *inputs: shortcut
    return model


def split(n, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 16, 16, generator=g), torch.randint(0, 10, (n,), generator=g)


# -- exactness ------------------------------------------------------------------------------------------------
def test_keeping_every_block_gives_the_folded_model_and_leaves_the_model_unchanged():
    model = make_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    pruned = prune_blocks(model, 9)
    torch.testing.assert_close(logits(pruned), logits(fold_survival(copy.deepcopy(model))), rtol=0, atol=1e-5)
    assert model.folded_from is None and model.gate_mode == "batch"  # the model itself is not folded
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert pruned.gate_mode == "off" and pruned.folded_from["survival_prob"] == 0.5
    assert pruned.pruned_from["kept"] == block_names(model)


@pytest.mark.parametrize("name,kwargs", [
    ("layer1.1", {}), ("layer3.2", {}), ("layer2.1", dict(survival_rule="uniform", survival_prob=0.6)),
    ("layer1.0", dict(layers=(2, 1, 1), shortcut="projection")),  # the first block of layer1 keeps no shape
])
def test_removing_one_block_equals_forcing_its_branch_off(name, kwargs):
    model = make_model(**kwargs)
    kept = [n for n in block_names(model) if n != name]
    if name == "layer1.0":  # every stage keeps its first block: remove the second one of layer1 instead
        name, kept = "layer1.1", [n for n in block_names(model) if n != "layer1.1"]
    pruned = prune_blocks(model, None, order=kept)
    expected = logits(without_branches(fold_survival(copy.deepcopy(model)), [name]))
    torch.testing.assert_close(logits(pruned), expected, rtol=0, atol=1e-5)
    assert logits(pruned).sub(logits(model)).abs().max() > 1e-3  # the block did contribute something


def test_bottleneck_layout_prunes_too():
    torch.manual_seed(0)
    model = randomize_batchnorm(timm.create_model("sd_resnet50", layers=(2, 2, 1, 1), widths=(4, 4, 4, 4),
                                                  num_classes=5)).eval()
    x = torch.randn(2, 3, 32, 32)
    pruned = prune_blocks(model, 4)  # survival: layer2.1, then layer1.1 go... the deepest removable ones
    assert pruned.pruned_from["kept"] == ["layer1.0", "layer2.0", "layer3.0", "layer4.0"]
    expected = logits(without_branches(fold_survival(copy.deepcopy(model)), ["layer1.1", "layer2.1"]), x)
    torch.testing.assert_close(logits(pruned, x), expected, rtol=0, atol=1e-5)


def test_constant_depth_and_inverted_models_prune_to_the_same_blocks():
    sd = make_model()
    constant = make_model(gate_mode="off")
    inverted = make_model(scaling="inverted")
    for keep in (3, 5, 8):
        expected = blocks_to_keep(sd, keep)[0]
        assert blocks_to_keep(constant, keep)[0] == expected == blocks_to_keep(inverted, keep)[0]
    pruned = prune_blocks(inverted, 8)  # no p_l in the eval network: the weights are taken as they are
    torch.testing.assert_close(logits(pruned), logits(without_branches(inverted, ["layer3.2"])), rtol=0, atol=1e-5)


# -- orders --------------------------------------------------------------------------------------------------
def test_survival_order_drops_the_lowest_p_first_ties_to_the_later_block():
    model = make_model()
    assert blocks_to_keep(model, 6)[0] == ["layer1.0", "layer1.1", "layer1.2", "layer2.0", "layer2.1", "layer3.0"]
    uniform = make_model(survival_rule="uniform")  # every p_l equal: the later blocks go first
    assert blocks_to_keep(uniform, 6)[0] == blocks_to_keep(model, 6)[0]


def test_evenly_spaces_the_kept_blocks_within_each_stage():
    model = make_model(layers=(6, 2, 2))
    # 5 of 10 blocks: stage shares 3, 1, 1; in a stage of 6 keeping 3, fairseq's 0, 2, 4.
    assert blocks_to_keep(model, 5, "evenly")[0] == ["layer1.0", "layer1.2", "layer1.4", "layer2.0", "layer3.0"]
    assert blocks_to_keep(model, 10, "evenly")[0] == block_names(model)


def test_greedy_removes_the_block_whose_removal_raises_the_validation_loss_least():
    model = make_model()
    images, labels = split(16, 2)
    removed, evaluations = greedy_removals(model, {"val": (images, labels)}, down_to=7)
    assert evaluations == 6 + 5 and len(removed) == 2
    folded = fold_survival(copy.deepcopy(model))
    losses = {name: float(F.cross_entropy(logits(without_branches(folded, [name]), images), labels))
              for name in block_names(model) if not name.endswith(".0")}
    assert removed[0] == min(losses, key=losses.get)
    pruned = prune_blocks(model, 8, "greedy", {"val": (images, labels)})
    assert pruned.pruned_from["evaluations"] == 6 and pruned.pruned_from["order"] == "greedy"
    assert [n for n in block_names(model) if n not in pruned.pruned_from["kept"]] == removed[:1]


def test_recalibrate_bn_reestimates_every_batchnorm_on_the_training_images():
    model = make_model()
    train, _ = split(64, 3)
    pruned = prune_blocks(model, 5, data={"train": train}, recalibrate_bn=64)
    with torch.no_grad():
        stem = pruned.conv1(train)
    torch.testing.assert_close(pruned.bn1.running_mean, stem.mean((0, 2, 3)), rtol=0, atol=1e-5)
    assert pruned.pruned_from["recalibrate_bn"] == 64 and not pruned.bn1.training
    unchanged = prune_blocks(model, 5)
    assert not torch.allclose(unchanged.layer3[0].bn1.running_mean, pruned.layer3[0].bn1.running_mean)


def test_a_pruned_model_pruned_again_is_the_source_pruned_once():
    model = make_model()
    once = prune_blocks(model, 7, "evenly")
    twice = prune_blocks(once, 5)
    assert len(block_names(twice)) == 5 and set(twice.pruned_from["kept"]) < set(once.pruned_from["kept"])
    assert twice.pruned_from["layers"] == [3, 3, 3] and twice.pruned_from["previous"]["order"] == "evenly"
    direct = prune_blocks(model, None, twice.pruned_from["kept"])  # the record names the source's blocks
    torch.testing.assert_close(logits(twice), logits(direct), rtol=0, atol=1e-6)


# -- metadata --------------------------------------------------------------------------------------------------
def test_pruned_model_rebuilds_by_name_from_its_files(tmp_path):
    pruned = prune_blocks(make_model(), 5, "evenly")
    save_weights(tmp_path / "model.safetensors", pruned)
    config = write_config(tmp_path / "config.json", pruned)
    assert config["model_args"]["layers"] == [2, 2, 1] and config["model_args"]["pruned_from"] == pruned.pruned_from
    recorded = read_weights_settings(tmp_path / "model.safetensors")["model_args"]
    assert recorded["layers"] == [2, 2, 1] and recorded["pruned_from"]["kept"] == pruned.pruned_from["kept"]
    loaded = timm.create_model(f"local-dir:{tmp_path}", pretrained=True)
    assert loaded.pruned_from == pruned.pruned_from and loaded.folded_from == pruned.folded_from
    torch.testing.assert_close(logits(loaded), logits(pruned), rtol=0, atol=0)
    # The architecture at full depth does not take these weights: a wrong model never loads.
    with pytest.raises(Exception, match="layers"):
        timm.create_model("sd_resnet20_cifar", pretrained=True, num_classes=10, folded_from=pruned.folded_from,
                          pretrained_cfg_overlay=dict(file=str(tmp_path / "model.safetensors")))


# -- bad input -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("keep,match", [
    (0, "keep must be at least 3, the first block of each stage"), (-1, "keep must be at least 3"),
    (2, r"at least 3.*layer1\.0, layer2\.0, layer3\.0"), (10, "keep must be at most 9"),
    (2.5, "keep must be an integer"), ("3", "keep must be an integer"), (True, "keep must be an integer"),
])
def test_bad_keep_is_refused(keep, match):
    with pytest.raises(ValueError, match=match):
        prune_blocks(make_model(), keep)


@pytest.mark.parametrize("kwargs,match", [
    (dict(order="deepest"), "order must be one of 'survival', 'evenly', 'greedy' or a list"),
    (dict(keep=None, order=["layer1.0", "layer2.0", "layer3.0", "layer4.0"]), "unknown block name.*layer4.0"),
    (dict(keep=None, order=["layer1.0", "layer2.0"]), "missing layer3.0"),
    (dict(keep=4, order=["layer1.0", "layer2.0", "layer3.0"]), "keep must be the number of blocks named"),
    (dict(order="greedy"), "data must be a mapping with 'val'"),
    (dict(order="greedy", data={"train": torch.zeros(2, 3, 16, 16)}), "data must be a mapping with 'val'"),
    (dict(recalibrate_bn=8), "data must be a mapping with 'train'"),
    (dict(recalibrate_bn=-1), "recalibrate_bn must be a number"),
    (dict(recalibrate_bn=9, data={"train": torch.zeros(8, 3, 16, 16)}), "recalibrate_bn must be at most 8"),
])
def test_bad_order_and_data_are_refused(kwargs, match):
    kwargs = dict(dict(keep=5), **kwargs)
    with pytest.raises(ValueError, match=match):
        prune_blocks(make_model(), **kwargs)


def test_models_without_blocks_to_prune_or_with_contradicting_settings_are_refused():
    with pytest.raises(ValueError, match="no residual block to prune"):
        prune_blocks(make_model(layers=(1, 1, 1)), 3)
    with pytest.raises(ValueError, match="must be an sdzoo stochastic-depth ResNet"):
        prune_blocks(timm.create_model("resnet10t"), 3)
    folded = fold_survival(make_model())
    folded.survival_settings = replace(folded.survival_settings, folded_from=None)  # weights folded, record not
    folded.survival_settings = replace(folded.survival_settings, gate_mode="batch")
    with pytest.raises(ValueError, match="its gates hold other p_l"):
        prune_blocks(folded, 5)
    folded_from = dict(survival_prob=0.5, survival_rule="linear", scaling="expectation", gate_mode="batch")
    bad_records = ((dict(layers=[3, 3, "x"], kept=["layer1.0", "layer2.0", "layer3.0"]), "pruned_from\\['layers'\\]"),
                   (dict(layers=[3, 3, 3], kept=["layer1.0", "layer2.0", "layer9.0"]), "pruned_from\\['kept'\\]"),
                   (dict(layers=[3, 3, 3], kept=["layer1.0", "layer1.0", "layer3.0"]), "pruned_from\\['kept'\\]"))
    for record, match in bad_records:
        with pytest.raises(ValueError, match=match):  # a config.json's record is checked before anything is built
            timm.create_model("sd_resnet20_cifar", layers=(1, 1, 1), folded_from=folded_from,
                              pruned_from=dict(record, architecture="sd_resnet20_cifar"))
    with pytest.raises(ValueError, match="pruned_from needs folded_from"):
        timm.create_model("sd_resnet20_cifar", layers=(1, 1, 1), pruned_from=dict(
            architecture="sd_resnet20_cifar", layers=[3, 3, 3], kept=["layer1.0", "layer2.0", "layer3.0"]))


# -- export, sweep and card -------------------------------------------------------------------------------------
@pytest.mark.parametrize("extra,match", [
    (["--keep-blocks", "0"], "--keep-blocks: keep must be at least 3"),
    (["--keep-blocks", "2"], "--keep-blocks: keep must be at least 3"),
    (["--keep-blocks", "x"], "invalid int value"),
    (["--keep-blocks", "12"], "--keep-blocks: keep must be at most 9"),
    (["--keep-blocks", "5", "--prune-order", "deepest"], "--prune-order: order: unknown block name"),
    (["--prune-order", "layer1.0,layer2.0"], "--prune-order: order: the first block of each stage"),
    (["--recalibrate-bn", "10"], "--recalibrate-bn applies to a pruned export"),
    (["--keep-blocks", "5", "--no-fold"], "--no-fold: a pruned model is folded"),
    (["--keep-blocks", "5", "--recalibrate-bn", "-3"], "--recalibrate-bn: recalibrate_bn must be"),
])
def test_export_refuses_bad_pruning_flags_and_writes_nothing(trained_run, tmp_path, cli, extra, match):
    export = sdzoo.cli.export
    out = tmp_path / "m.onnx"
    result = cli(export.main, ["--model", f"local-dir:{trained_run}", "--output", out, *extra])
    assert result.code == 2, result.err
    assert match in result.err
    assert list(tmp_path.iterdir()) == []


def test_export_refuses_greedy_for_a_bare_checkpoint_without_a_data_set(trained_run, tmp_path, cli):
    export = sdzoo.cli.export
    result = cli(export.main, ["--model", "sd_resnet20_cifar", "--checkpoint", trained_run / "model.safetensors",
                               "--output", tmp_path / "m.onnx", "--keep-blocks", "5", "--prune-order", "greedy"])
    assert result.code == 2 and "give --dataset" in result.err
    assert list(tmp_path.iterdir()) == []


def test_pruned_weights_alone_rebuild_the_pruned_model_in_the_export(tmp_path, cli):
    pruned = prune_blocks(make_model(), 5)
    save_weights(tmp_path / "model.safetensors", pruned)  # their metadata records layers and pruned_from
    out = tmp_path / "m.onnx"
    result = cli(sdzoo.cli.export.main, ["--model", "sd_resnet20_cifar", "--checkpoint",
                                                   tmp_path / "model.safetensors", "--output", out,
                                                   "--keep-blocks", "6"])
    assert result.code == 2 and "--keep-blocks: keep must be at most 5" in result.err  # built: 5 blocks
    assert not out.exists()


@pytest.mark.slow
def test_export_prunes_a_run_and_publishes_it_with_a_pruned_card(trained_run, tmp_path, cli):
    export, push = sdzoo.cli.export, sdzoo.cli.push
    out, folder = tmp_path / "p.onnx", tmp_path / "pruned"
    result = cli(export.main, ["--model", f"local-dir:{trained_run}", "--output", out, "--keep-blocks", "5",
                               "--prune-order", "greedy", "--recalibrate-bn", "256", "--pruned-dir", folder,
                               "--bench-seconds", "0.05"])
    assert result.code == 0, result.err
    assert "18 evaluations" in result.out and "batch 16" in result.out
    meta = json.loads(read_metadata(out)["pruned_from"])
    # The graph is a plain ResNet's with 5 blocks: that of the architecture built with those layers, unpruned.
    layers = [sum(name.startswith(f"layer{s}.") for name in meta["kept"]) for s in (1, 2, 3)]
    plain = timm.create_model("sd_resnet20_cifar", num_classes=10, layers=layers, gate_mode="off").eval()
    export_onnx(plain, tmp_path / "plain.onnx", input_size=(3, 16, 16))
    assert op_histogram(out) == op_histogram(tmp_path / "plain.onnx") and op_histogram(out)["Add"] == 5
    assert meta["order"] == "greedy" and meta["recalibrate_bn"] == 256 and len(meta["kept"]) == 5
    (folder / "summary.json").write_text((trained_run / "summary.json").read_text())  # the full run's results
    pruning = json.loads((folder / "pruning.json").read_text())
    hub_dir = tmp_path / "hub"
    result = cli(push.main, ["--model", folder, "--repo-id", "org/pruned", "--onnx", out, "--local-dir", hub_dir])
    assert result.code == 0, result.err
    card = (hub_dir / "README.md").read_text()
    full = json.loads((trained_run / "summary.json").read_text())
    assert "Pruned after training" in card and ", ".join(meta["kept"]) in card
    assert f"| test accuracy, PyTorch (%) | {pruning['acc_torch']:.2f} |" in card
    assert f"{full['test_error']:.2f}" not in card and "model-index" not in card
    assert not (hub_dir / "summary.json").exists()


@pytest.mark.slow
def test_depth_sweep_measures_a_run_and_its_twin_pruned_the_same_way(trained_run, tmp_path, cli):
    from sdzoo.export.depth import accuracy, run_settings, run_splits

    sweep = sdzoo.cli.depth_sweep
    out = tmp_path / "sweep"
    result = cli(sweep.main, ["--model", trained_run, "--twin", trained_run, "--output", out, "--depths", "4",
                              "--orders", "survival", "evenly", "--bench-seconds", "0.01", "--rounds", "1"])
    assert result.code == 0, result.err
    rows = json.loads((out / "sweep.json").read_text())["rows"]
    assert [(r["model"], r["order"], r["blocks"]) for r in rows] == [
        (m, o, 4) for m in ("stochastic depth", "twin") for o in ("survival", "evenly")]
    model = timm.create_model(f"local-dir:{trained_run}", pretrained=True)
    test = run_splits(run_settings(str(trained_run)), model.pretrained_cfg["mean"], model.pretrained_cfg["std"])["test"]
    pruned = prune_blocks(model, 4)
    assert rows[0]["kept"] == pruned.pruned_from["kept"] and rows[0]["acc_torch"] == accuracy(pruned, *test)
    assert all(abs(r["acc_torch"] - r["acc_ort"]) <= 100 / len(test[1]) + 1e-9 for r in rows)
    assert rows[0]["params"] == sum(p.numel() for p in pruned.parameters()) and rows[0]["ms_b32"] > rows[0]["ms_b1"] > 0
    assert (out / "sweep.png").stat().st_size > 0
    assert "| stochastic depth | survival | 4 |" in (out / "sweep.md").read_text()
    bad = cli(sweep.main, ["--model", trained_run, "--output", tmp_path / "bad", "--depths", "2"])
    assert bad.code == 2 and "--depths must be from 3" in bad.err and not (tmp_path / "bad").exists()


@pytest.mark.slow
def test_a_hub_repo_brings_its_validation_split_for_greedy(trained_run, tmp_path, monkeypatch):
    import os
    import subprocess
    import sys

    import huggingface_hub
    from hub_server import FakeHub
    from sdzoo.export.depth import run_splits
    from sdzoo.hub.model_card import published_summary

    token = "hf_sdzoo_prune_test"
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_DISABLE_XET", True)
    with FakeHub(tokens={token: "tester"}, orgs={"tester": ["owner"]}) as server:
        api = huggingface_hub.HfApi(endpoint=server.url, token=token)
        api.create_repo("owner/r20")
        summary = published_summary(json.loads((trained_run / "summary.json").read_text()))  # what publish uploads
        api.upload_file(path_or_fileobj=json.dumps(summary).encode(), path_in_repo="summary.json", repo_id="owner/r20")
        env = {k: v for k, v in os.environ.items() if k not in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_HUB_OFFLINE")}
        env.update(HF_ENDPOINT=server.url, HF_HOME=str(tmp_path / "hf"), HF_HUB_DISABLE_XET="1",
                   HF_HUB_DISABLE_TELEMETRY="1", OMP_NUM_THREADS="1", SDZOO_DISABLE_AUTOLOAD="1")
        child = subprocess.run([sys.executable, "-c", "import json, sys; from sdzoo.export.depth import run_settings; "
                                "print(json.dumps(run_settings(sys.argv[1])))", "hf-hub:owner/r20"],
                               env=env, capture_output=True, text=True, timeout=120)
    assert child.returncode == 0, child.stderr[-2000:]
    settings = json.loads(child.stdout)
    model = timm.create_model(f"local-dir:{trained_run}", pretrained=True)
    splits = run_splits(settings, model.pretrained_cfg["mean"], model.pretrained_cfg["std"])
    assert settings["dataset"] == "digits" and [len(splits[k][1]) for k in ("train", "val", "test")] == [1257, 180, 360]
    assert prune_blocks(model, 8, "greedy", splits).pruned_from["evaluations"] == 6
