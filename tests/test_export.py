"""Folding p_l into the weights, ONNX export and its checks, and the export CLI."""
import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

import timm
import sdzoo
import sdzoo.export.onnx_export as onnx_export
from sdzoo.fold import can_fold, fold_survival, is_folded
from sdzoo.export.onnx_export import ExportCheckError, export_onnx, op_histogram, read_metadata
import sdzoo.cli.export
from helpers import randomize_batchnorm

RANDOM_OPS = {"RandomUniform", "RandomUniformLike", "RandomNormal", "RandomNormalLike", "Bernoulli", "Multinomial",
              "Dropout"}


def make_model(name="sd_resnet20_cifar", seed=0, **kwargs):
    """A model with non-trivial BatchNorm statistics and affines, so that a wrong fold shows in the outputs."""
    torch.manual_seed(seed)
    model = timm.create_model(name, num_classes=10, **kwargs)
    return randomize_batchnorm(model).eval()


def logits(model, x):
    with torch.no_grad():
        return model(x)


# -- fold -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name,size", [("sd_resnet20_cifar", 32), ("sd_resnet50", 64)])
def test_fold_matches_eval_outputs_and_loads_into_plain_resnet(name, size):
    model = make_model(name, survival_prob=0.5)
    x = torch.randn(3, 3, size, size, generator=torch.Generator().manual_seed(1))
    expected = logits(model, x)

    plain = timm.create_model(name, num_classes=10, gate_mode="off").eval()
    plain.load_state_dict(model.state_dict())
    # Without folding, the plain architecture computes something else: p_l matters.
    assert (logits(plain, x) - expected).abs().max() > 1e-3

    assert fold_survival(model) is model
    torch.testing.assert_close(logits(model, x), expected, rtol=0, atol=1e-5)
    plain.load_state_dict(model.state_dict(), strict=True)
    torch.testing.assert_close(logits(plain, x), expected, rtol=0, atol=1e-5)

    assert is_folded(model) and not can_fold(model)
    assert model.gate_mode == "off" and model.gate_sampler.mode == "off"
    assert model.block_survival_probs() == [1.0] * len(model.residual_blocks())
    assert model.folded_from == dict(survival_prob=0.5, survival_rule="linear", gate_mode="batch",
                                     scaling="expectation")


def test_folded_model_args_rebuild_the_folded_model():
    model = fold_survival(make_model(survival_prob=0.7, survival_rule="uniform"))
    args = json.loads(json.dumps(model._model_args))  # what config.json carries
    assert args["gate_mode"] == "off" and args["folded_from"]["survival_prob"] == 0.7
    rebuilt = timm.create_model("sd_resnet20_cifar", **args).eval()
    rebuilt.load_state_dict(model.state_dict())
    assert rebuilt.folded_from == model.folded_from
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(logits(rebuilt, x), logits(model, x), rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="already folded"):
        fold_survival(rebuilt)


def test_fold_twice_is_refused_and_leaves_weights_alone():
    model = fold_survival(make_model())
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="already folded"):
        fold_survival(model)
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k


def test_fold_inverted_scaling_is_refused():
    model = make_model(scaling="inverted")
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="scaling must be 'expectation'.*nothing to fold"):
        fold_survival(model)
    assert not is_folded(model) and not can_fold(model)
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


# -- export -----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """The same trained weights exported three ways: folded, unfolded, and the plain architecture."""
    out = tmp_path_factory.mktemp("onnx")
    unfolded = make_model(survival_prob=0.7)
    folded = fold_survival(make_model(survival_prob=0.7))
    plain = make_model(gate_mode="off")
    labels = [f"digit {i}" for i in range(10)]
    meta = onnx_export.onnx_metadata(folded, label_names=labels)
    reports = dict(
        folded=export_onnx(folded, out / "folded.onnx", metadata=meta),
        unfolded=export_onnx(unfolded, out / "unfolded.onnx", verify_batch_sizes=(2,)),
        plain=export_onnx(plain, out / "plain.onnx", verify_batch_sizes=(2,)),
    )
    return dict(out=out, unfolded=unfolded, folded=folded, labels=labels, reports=reports)


def test_folded_graph_has_the_operators_of_a_plain_resnet(exported):
    out = exported["out"]
    folded, plain, unfolded = (op_histogram(out / f"{k}.onnx") for k in ("folded", "plain", "unfolded"))
    assert folded == plain
    assert not RANDOM_OPS & set(folded)
    # The unfolded graph multiplies every branch by p_l: the comparison above can tell them apart.
    assert unfolded["Mul"] == len(exported["unfolded"].residual_blocks())
    assert folded["Mul"] == 0


def test_onnxruntime_sessions_take_torchs_thread_count():
    # onnxruntime's own default is a thread a core: beside a busy PyTorch (or a second test worker) the
    # sessions that verify, quantize and time an export would oversubscribe the cores
    identity = onnx.helper.make_model(onnx.helper.make_graph(
        [onnx.helper.make_node("Identity", ["x"], ["y"])], "identity",
        [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1])],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1])]))
    torch.set_num_threads(1)  # the autouse fixture restores the session's count
    session = onnx_export.ort_session(identity.SerializeToString())
    assert session.get_session_options().intra_op_num_threads == 1
    session = onnx_export.ort_session(identity.SerializeToString(), threads=3)
    assert session.get_session_options().intra_op_num_threads == 3


def test_onnxruntime_matches_pytorch_at_several_batch_sizes(exported):
    report = exported["reports"]["folded"]
    assert sorted(report.max_abs_diff) == [1, 3, 16]
    assert max(report.max_abs_diff.values()) <= 1e-4
    session = ort.InferenceSession(str(exported["out"] / "folded.onnx"), providers=["CPUExecutionProvider"])
    generator = torch.Generator().manual_seed(5)
    for batch_size in (1, 3, 16):
        x = torch.randn(batch_size, 3, 32, 32, generator=generator)
        got = session.run(None, {"input": x.numpy()})[0]
        # Against the unfolded stochastic-depth model: the deployed file computes what was trained.
        expected = logits(exported["unfolded"], x).numpy()
        assert got.shape == (batch_size, 10)
        assert np.abs(got - expected).max() <= 1e-4


def test_metadata_and_dynamic_batch(exported):
    path = exported["out"] / "folded.onnx"
    proto = onnx.load(str(path))
    meta = read_metadata(proto)
    assert meta["model_name"] == "sd_resnet20_cifar.cifar10"
    assert json.loads(meta["input_size"]) == [3, 32, 32]
    assert json.loads(meta["mean"]) == pytest.approx(list(exported["folded"].pretrained_cfg["mean"]))
    assert json.loads(meta["std"]) == pytest.approx(list(exported["folded"].pretrained_cfg["std"]))
    assert json.loads(meta["num_classes"]) == 10
    assert json.loads(meta["label_names"]) == exported["labels"]
    assert json.loads(meta["stochastic_depth"]) == dict(
        survival_prob=0.7, survival_rule="linear", gate_mode="batch", scaling="expectation")
    assert meta["folded"] == "true" and meta["sdzoo_version"] == sdzoo.__version__
    assert read_metadata(exported["out"] / "unfolded.onnx")["folded"] == "false"
    opset = {o.domain: o.version for o in proto.opset_import}[""]
    assert opset >= onnx_export.MIN_OPSET
    batch_dim = proto.graph.input[0].type.tensor_type.shape.dim[0]
    assert batch_dim.dim_param and not batch_dim.HasField("dim_value")
    assert not list(path.parent.glob("*.data")) and not list(path.parent.glob(".*.tmp"))


def test_parity_failure_raises_and_keeps_old_file(tmp_path, monkeypatch):
    path = tmp_path / "model.onnx"
    path.write_bytes(b"previous")
    real_run = onnx_export._run_onnx
    monkeypatch.setattr(onnx_export, "_run_onnx", lambda session, x: real_run(session, x) + 1e-3)
    with pytest.raises(ExportCheckError, match="differs from PyTorch by more than atol"):
        export_onnx(make_model(), path, verify_batch_sizes=(1,))
    assert path.read_bytes() == b"previous"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx"]
    # rtol scales the bound with the logits: the same 1e-3 error passes against logits of order 1.
    report = export_onnx(make_model(), path, verify_batch_sizes=(1,), rtol=0.01)
    assert 5e-4 < report.max_abs_diff[1] <= 0.01 * 100
    assert path.read_bytes()[:8] != b"previous"


def test_export_argument_errors(tmp_path):
    model = make_model()
    with pytest.raises(ValueError, match="opset must be an integer from 18"):
        export_onnx(model, tmp_path / "m.onnx", opset=11)
    with pytest.raises(ValueError, match="input_size must be"):
        export_onnx(model, tmp_path / "m.onnx", input_size=(32, 32))
    with pytest.raises(ValueError, match="output directory does not exist"):
        export_onnx(model, tmp_path / "missing" / "m.onnx")
    with pytest.raises(ValueError, match="label_names must name each of the 10 classes"):
        onnx_export.onnx_metadata(model, label_names=["a", "b"])
    assert list(tmp_path.iterdir()) == []


# -- CLI --------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def script():
    return sdzoo.cli.export


@pytest.fixture(scope="module")
def trained_dir(tmp_path_factory):
    """A model saved as the training tools save it (timm's save_for_hf): a local-dir: model."""
    from timm.models import save_for_hf

    out = tmp_path_factory.mktemp("run")
    model = make_model(survival_prob=0.6)
    save_for_hf(model, str(out / "r20"), model_args=model._model_args, safe_serialization=True)
    torch.save({"state_dict": model.state_dict(), "epoch": 1}, out / "r20.pth")
    return dict(dir=out, model=model)


def test_cli_local_dir_with_int8_and_benchmark(script, trained_dir, tmp_path, capsys):
    output = tmp_path / "r20.onnx"
    rc = script.main(["--model", f"local-dir:{trained_dir['dir'] / 'r20'}", "--output", str(output),
                      "--quantize", "int8", "--calib-images", "128", "--benchmark", "--bench-seconds", "0.01",
                      "--label-names", ",".join(str(i) for i in range(10))])
    text = capsys.readouterr().out
    assert rc == 0
    assert "folded p_l into 9 residual branches" in text
    assert "top-1 agreement with fp32" in text and "PyTorch eager" in text and "ort int8" in text
    meta = read_metadata(output)
    assert json.loads(meta["stochastic_depth"])["survival_prob"] == 0.6
    assert json.loads(meta["label_names"]) == [str(i) for i in range(10)]
    int8 = tmp_path / "r20.int8.onnx"
    assert op_histogram(int8)["QuantizeLinear"] > 0
    int8_meta = read_metadata(int8)
    assert int8_meta["model_name"] == meta["model_name"] and "quantization" in int8_meta
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r20.int8.onnx", "r20.onnx"]


def test_cli_folded_run_is_exported_as_is(script, trained_dir, tmp_path, capsys):
    from timm.models import save_for_hf

    folded = fold_survival(make_model(survival_prob=0.6))
    save_for_hf(folded, str(tmp_path / "folded"), safe_serialization=True)
    output = tmp_path / "m.onnx"
    rc = script.main(["--model", f"local-dir:{tmp_path / 'folded'}", "--output", str(output),
                      "--verify-batch-sizes", "2"])
    assert rc == 0
    assert "already folded" in capsys.readouterr().out
    meta = read_metadata(output)
    assert meta["folded"] == "true" and json.loads(meta["stochastic_depth"])["survival_prob"] == 0.6
    session = ort.InferenceSession(str(output), providers=["CPUExecutionProvider"])
    x = torch.randn(2, 3, 32, 32)
    expected = logits(trained_dir["model"], x).numpy()  # the same weights, unfolded, p_L = 0.6
    assert np.abs(session.run(None, {"input": x.numpy()})[0] - expected).max() <= 1e-4


def test_cli_registered_name_with_torch_checkpoint(script, trained_dir, tmp_path, capsys):
    output = tmp_path / "r20.onnx"
    rc = script.main(["--model", "sd_resnet20_cifar", "--checkpoint", str(trained_dir["dir"] / "r20.pth"),
                      "--survival-prob", "0.6", "--survival-rule", "linear", "--scaling", "expectation",
                      "--gate-mode", "batch", "--checkpoint-folded", "no", "--output", str(output),
                      "--verify-batch-sizes", "1,3"])
    assert rc == 0
    session = ort.InferenceSession(str(output), providers=["CPUExecutionProvider"])
    x = torch.randn(4, 3, 32, 32)
    expected = logits(trained_dir["model"], x).numpy()
    assert np.abs(session.run(None, {"input": x.numpy()})[0] - expected).max() <= 1e-4


def test_cli_inverted_scaling_says_nothing_to_fold(script, tmp_path, capsys):
    rc = script.main(["--model", "sd_resnet20_cifar", "--scaling", "inverted", "--output",
                      str(tmp_path / "m.onnx"), "--verify-batch-sizes", "2"])
    assert rc == 0
    assert "nothing to fold: scaling is 'inverted'" in capsys.readouterr().out
    assert read_metadata(tmp_path / "m.onnx")["folded"] == "false"


def cli_error(script, argv, capsys):
    with pytest.raises(SystemExit) as exc:
        script.main(argv)
    return exc.value.code, capsys.readouterr().err


def test_cli_unknown_model(script, tmp_path, capsys):
    code, err = cli_error(script, ["--model", "sd_resnet21_cifar", "--output", str(tmp_path / "m.onnx")], capsys)
    assert code == 2
    assert "--model: unknown model 'sd_resnet21_cifar'" in err and "sd_resnet20_cifar" in err
    code, err = cli_error(script, ["--model", f"local-dir:{tmp_path / 'nowhere'}", "--output",
                                   str(tmp_path / "m.onnx")], capsys)
    assert code == 2 and "--model: no such directory" in err
    assert list(tmp_path.iterdir()) == []


def test_cli_checkpoint_that_does_not_match(script, tmp_path, capsys):
    from safetensors.torch import save_file

    checkpoint = tmp_path / "r20_c100.safetensors"
    save_file(timm.create_model("sd_resnet20_cifar", num_classes=100).state_dict(), str(checkpoint))
    output = tmp_path / "m.onnx"
    code, err = cli_error(script, ["--model", "sd_resnet20_cifar", "--checkpoint", str(checkpoint),
                                   "--output", str(output)], capsys)
    assert code == 2 and "--survival-prob" in err and "--gate-mode off" in err  # never guess p_L
    code, err = cli_error(script, ["--model", "sd_resnet20_cifar", "--checkpoint", str(checkpoint),
                                   "--survival-prob", "0.5", "--survival-rule", "linear", "--scaling", "expectation",
                                   "--gate-mode", "batch", "--checkpoint-folded", "no", "--output", str(output)],
                          capsys)
    assert code == 2  # found in the file's header, before anything is built
    assert f"--checkpoint: {checkpoint} does not fit sd_resnet20_cifar as described by the model arguments: " \
           f"num_classes=10 " \
           f"({checkpoint} holds num_classes=100)" in err
    code, err = cli_error(script, ["--model", "sd_resnet56_cifar", "--checkpoint", str(checkpoint),
                                   "--survival-prob", "1.0", "--survival-rule", "linear", "--scaling", "expectation",
                                   "--gate-mode", "off", "--checkpoint-folded", "no", "--num-classes", "100",
                                   "--output", str(output)], capsys)
    assert code == 2 and f"layers=[9, 9, 9] ({checkpoint} holds layers=[3, 3, 3])" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == [checkpoint.name]


def test_cli_parity_failure_exits_nonzero_without_a_file(script, tmp_path, monkeypatch, capsys):
    real_run = onnx_export._run_onnx
    monkeypatch.setattr(onnx_export, "_run_onnx", lambda session, x: real_run(session, x) * 1.01 + 1e-3)
    rc = script.main(["--model", "sd_resnet20_cifar", "--output", str(tmp_path / "m.onnx"),
                      "--verify-batch-sizes", "1"])
    assert rc == 1
    err = capsys.readouterr().err
    assert "differs from PyTorch by more than atol=0.0001" in err and "no file written" in err
    assert list(tmp_path.iterdir()) == []


def test_folded_weights_never_load_where_p_l_would_apply_twice_and_fold_knows_their_source(tmp_path):
    """A folded state dict says so in its ``_metadata`` (no tensor does): it does not load into a model that
    multiplies by p_l, not even after torch.save, while a plain ResNet at eval takes it; fold_survival then
    refuses weights whose source said folded. A safetensors file without sdzoo's metadata says nothing: it
    loads, and folding it warns that nothing can tell."""
    import io
    import warnings

    from safetensors.torch import save_file

    from sdzoo.files.weights import WeightsError

    folded = fold_survival(make_model(survival_prob=0.5))
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    buffer = io.BytesIO()
    torch.save(folded.state_dict(), buffer)
    for state in (folded.state_dict(), torch.load(io.BytesIO(buffer.getvalue()), weights_only=True)):
        unfolded = make_model(survival_prob=0.5)
        before = {k: v.clone() for k, v in unfolded.state_dict().items()}
        with pytest.raises(WeightsError, match="an unfolded model, while the state dict's weights are folded"):
            unfolded.load_state_dict(state, strict=True)
        assert all(torch.equal(before[k], v) for k, v in unfolded.state_dict().items())  # nothing was loaded
    with pytest.raises(WeightsError, match="while the state dict's weights are not folded"):
        fold_survival(make_model(survival_prob=0.5)).load_state_dict(make_model(seed=1).state_dict())

    plain = timm.create_model("sd_resnet20_cifar", num_classes=10, gate_mode="off").eval()
    plain.load_state_dict(folded.state_dict(), strict=True)
    torch.testing.assert_close(logits(plain, x), logits(folded, x), rtol=0, atol=1e-5)
    assert plain.weights_provenance.folded
    with pytest.raises(ValueError, match="weights are folded already: they came from a state dict of an sdzoo model"):
        fold_survival(plain)

    save_file({k: v.contiguous() for k, v in folded.state_dict().items()}, tmp_path / "bare.safetensors")
    loaded = timm.create_model("sd_resnet20_cifar", num_classes=10, survival_prob=0.5, pretrained=True,
                               pretrained_cfg_overlay=dict(file=str(tmp_path / "bare.safetensors")))
    assert loaded.weights_provenance.folded is None  # what cannot be known
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fold_survival(loaded)
    assert any("does not say whether they are folded" in str(w.message) for w in caught)
