"""Usage errors of the command lines: each mistake a user would make exits 2 with a one-line message that names
the flag or file, and leaves nothing behind (one case a test, or a parametrized case).

train (sdzoo.training.train), export_onnx, push_to_hub and benchmark: flags out of range, outputs that are files
or inputs, broken or hostile run folders, an unwritable output folder, a machine out of memory.
"""
import hashlib
import json
import os
import subprocess

import pytest
import timm
import torch
from safetensors.torch import save_file

import sdzoo.cli
import sdzoo.cli.export
import sdzoo.cli.bench
from sdzoo.export import onnx_export
from sdzoo.files.checks import error_line
from sdzoo.files.run_folder import CONFIG_NAME, WEIGHTS_NAME
from sdzoo.files.weights import MissingWeightsError, save_weights
from sdzoo.hub import upload as hub
from sdzoo.models.sd_resnet import SDResNet
from sdzoo.training import train as sdtrain

from helpers import (
    DIGITS_CPU, edit_config, exit_code, random_resnet20, randomize_batchnorm, snapshot,
    write_run_folder)


TRAIN_FLAG_MISTAKES = [
    (["--output", "{a_file}"], "is a file"),
    (["--output", "{a_file}/run"], "is a file, not a folder"),
    (["--weight-decay", "1e308"], "--weight-decay"),
    (["--seed", str(2**64)], "--seed"),
    (["--image-size", "100000"], "--image-size"),
    (["--shift", "40"], "--shift 40 must be smaller than the image"),
]


@pytest.fixture
def a_file(tmp_path):
    """A regular file where a folder is expected."""
    path = tmp_path / "a_file"
    path.write_text("x")
    return path


@pytest.mark.parametrize("flags,expected", TRAIN_FLAG_MISTAKES, ids=[e for _, e in TRAIN_FLAG_MISTAKES])
def test_train_flag_mistakes_exit_2_naming_the_flag(flags, expected, a_file, tmp_path, cli):
    flags = [f.format(a_file=a_file) for f in flags]
    output = [] if "--output" in flags else ["--output", tmp_path / "r"]
    result = cli(sdtrain.main, [*DIGITS_CPU, "--epochs", "1", *output, *flags])
    assert result.code == 2 and expected in result.err, flags
    assert not (tmp_path / "r").exists()


EXPORT_FLAG_MISTAKES = [
    (["--output", "{tmp_path}"], "is a directory"),
    (["--output", "{a_file}/m.onnx"], "is a file"),
    (["--output", "{tmp_path}/q.onnx", "--quantize", "int8", "--calib-images", "0"], "--calib-images"),
    (["--output", "{tmp_path}/q.onnx", "--benchmark", "--bench-seconds", "0"],
     "--bench-seconds must be a positive number of seconds"),
    # written after the export and its measurements, so refused before them
    (["--output", "{tmp_path}/q.onnx", "--keep-blocks", "7", "--pruned-dir", "{a_file}/pruned"],
     "is a file, not a folder"),
]


@pytest.mark.parametrize("flags,expected", EXPORT_FLAG_MISTAKES, ids=[e for _, e in EXPORT_FLAG_MISTAKES])
def test_export_flag_mistakes_exit_2_naming_the_flag(flags, expected, trained_run, a_file, tmp_path, cli):
    flags = [f.format(a_file=a_file, tmp_path=tmp_path) for f in flags]
    result = cli(sdzoo.cli.export.main, ["--model", f"local-dir:{trained_run}", *flags])
    assert result.code == 2 and expected in result.err, flags
    assert not (tmp_path / "q.onnx").exists()


def test_export_refuses_an_output_that_is_one_of_its_inputs(trained_run, tmp_path, capsys):
    script = sdzoo.cli.export
    before = snapshot(trained_run)
    for name in (WEIGHTS_NAME, CONFIG_NAME):
        code = exit_code(script.main, ["--model", f"local-dir:{trained_run}", "--output", str(trained_run / name)])
        assert code == 2 and "would destroy the input" in capsys.readouterr().err
    weights = tmp_path / "w.safetensors"
    weights.write_bytes((trained_run / WEIGHTS_NAME).read_bytes())
    weights_sha = hashlib.sha256(weights.read_bytes()).hexdigest()
    code = exit_code(script.main, ["--model", "sd_resnet20_cifar", "--checkpoint", str(weights), "--output",
                                   str(weights)])
    assert code == 2 and "--checkpoint reads" in capsys.readouterr().err
    assert hashlib.sha256(weights.read_bytes()).hexdigest() == weights_sha

    fp32 = tmp_path / "model.onnx"
    assert script.main(["--model", f"local-dir:{trained_run}", "--output", str(fp32),
                        "--verify-batch-sizes", "1"]) == 0
    fp32_sha = hashlib.sha256(fp32.read_bytes()).hexdigest()
    code = exit_code(script.main, ["--model", f"local-dir:{trained_run}", "--output", str(fp32), "--quantize", "int8",
                                   "--quant-output", str(fp32), "--verify-batch-sizes", "1"])
    assert code == 2 and "--quant-output" in capsys.readouterr().err
    assert hashlib.sha256(fp32.read_bytes()).hexdigest() == fp32_sha
    assert snapshot(trained_run) == before


def test_a_bare_checkpoint_brings_its_survival_settings(tmp_path, capsys):
    script = sdzoo.cli.export
    torch.manual_seed(0)
    model = randomize_batchnorm(timm.create_model("sd_resnet20_cifar", survival_prob=0.5, scaling="inverted"))
    bare = tmp_path / "inverted.safetensors"
    save_weights(bare, model)
    output = tmp_path / "m.onnx"
    assert script.main(["--model", "sd_resnet20_cifar", "--checkpoint", str(bare), "--survival-prob", "0.5",
                        "--output", str(output), "--verify-batch-sizes", "1"]) == 0
    trained = json.loads(onnx_export.read_metadata(output)["stochastic_depth"])
    assert trained["scaling"] == "inverted" and trained["survival_prob"] == 0.5
    assert "nothing to fold" in capsys.readouterr().out

    code = exit_code(script.main, ["--model", "sd_resnet20_cifar", "--checkpoint", str(bare), "--scaling",
                                   "expectation", "--output", str(output)])
    assert code == 2 and "--scaling expectation (the checkpoint's: inverted)" in capsys.readouterr().err

    plain = tmp_path / "plain.safetensors"
    save_file(model.state_dict(), str(plain))  # written elsewhere: no settings in it
    code = exit_code(script.main, ["--model", "sd_resnet20_cifar", "--checkpoint", str(plain), "--survival-prob",
                                   "0.5", "--output", str(tmp_path / "p.onnx")])
    err = capsys.readouterr().err
    assert code == 2 and "--survival-rule, --scaling, --gate-mode" in err
    assert not (tmp_path / "p.onnx").exists()


@pytest.mark.parametrize("config,expected", [
    ("{", "is not valid JSON"),
    (json.dumps(dict(architecture="sd_resnet20_cifar", model_args=[1, 2])), "'model_args' must be a JSON object"),
], ids=["not-json", "model_args-not-an-object"])
def test_a_broken_config_is_named_by_export_and_load_run(config, expected, trained_run, tmp_path, cli):
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / CONFIG_NAME).write_text(config)
    (broken / WEIGHTS_NAME).write_bytes((trained_run / WEIGHTS_NAME).read_bytes())
    result = cli(sdzoo.cli.export.main, ["--model", f"local-dir:{broken}", "--output", tmp_path / "b.onnx"])
    assert result.code == 2 and expected in result.err and str(broken / CONFIG_NAME) in result.err
    with pytest.raises(hub.CheckpointMismatchError, match=expected):
        hub.load_run(broken)


def test_benchmark_json_path_under_a_file_exits_2(a_file, cli):
    result = cli(sdzoo.cli.bench.parse_args, ["--json", a_file / "b.json"])
    assert result.code == 2 and "--json" in result.err


def test_export_input_size_is_bounded(tmp_path, capsys):
    folder = write_run_folder(random_resnet20(), tmp_path / "run")
    script = sdzoo.cli.export
    code = exit_code(script.main, ["--model", f"local-dir:{folder}", "--img-size", "100000",
                                   "--output", str(tmp_path / "m.onnx")])
    err = capsys.readouterr().err
    assert code == 2 and "--img-size must be an integer from 1 to 1024; got 100000" in err
    edit_config(folder, lambda c: c["pretrained_cfg"].update(input_size=[3, 100000, 100000]))
    code = exit_code(script.main, ["--model", f"local-dir:{folder}", "--output", str(tmp_path / "m.onnx")])
    err = capsys.readouterr().err
    assert code == 2 and "100000x100000" in err and "--img-size (at most 1024)" in err
    with pytest.raises(ValueError, match="height and width <= 1024"):
        onnx_export.export_onnx(random_resnet20(), tmp_path / "m.onnx", input_size=(3, 100000, 100000))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


def test_a_read_only_output_folder_is_found_before_loading(tmp_path, capsys):
    read_only = tmp_path / "read_only"
    read_only.mkdir()
    if os.geteuid() == 0:  # root writes through permissions: make the folder immutable instead
        if subprocess.run(["chattr", "+i", str(read_only)], capture_output=True).returncode:
            pytest.skip("as root, a read-only folder needs chattr +i")
    else:
        read_only.chmod(0o555)
    try:
        # A folder with no weights at all: loading it would fail with another message.
        (tmp_path / "empty").mkdir()
        code = exit_code(sdzoo.cli.export.main, ["--model", f"local-dir:{tmp_path / 'empty'}",
                                                           "--output", str(read_only / "m.onnx")])
        err = capsys.readouterr().err
        assert code == 2 and f"--output: cannot write to directory {str(read_only)!r}" in err, err
        assert list(read_only.iterdir()) == []
    finally:
        if os.geteuid() == 0:
            subprocess.run(["chattr", "-i", str(read_only)])
        read_only.chmod(0o755)


def test_a_folder_without_weights_says_so(tmp_path, capsys):
    folder = write_run_folder(random_resnet20(), tmp_path / "run")
    (folder / WEIGHTS_NAME).unlink()
    code = exit_code(sdzoo.cli.export.main, ["--model", f"local-dir:{folder}", "--output",
                                                       str(tmp_path / "m.onnx")])
    err = capsys.readouterr().err
    assert code == 2 and f"{folder} has no model.safetensors (nor another weights file)" in err
    assert "do not match" not in err and "Traceback" not in err
    with pytest.raises(MissingWeightsError):
        timm.create_model(f"local-dir:{folder}", pretrained=True)
    # A torch file that is no state dict of this model is named as such, not as a mismatch of the architecture.
    torch.save({"x": torch.zeros(1)}, folder / "pytorch_model.bin")
    code = exit_code(sdzoo.cli.export.main, ["--model", f"local-dir:{folder}", "--output",
                                                       str(tmp_path / "m.onnx")])
    err = capsys.readouterr().err
    assert code == 2 and "pytorch_model.bin is not an sdzoo ResNet's state dict" in err
    assert not (tmp_path / "m.onnx").exists()


def test_an_allocation_failure_is_reported_as_memory(tmp_path, capsys, monkeypatch):
    folder = write_run_folder(random_resnet20(), tmp_path / "run")
    def out_of_memory(self):  # what torch's CPU allocator raises when a tensor does not fit
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:117] data. DefaultCPUAllocator: not enough memory: "
                           "you tried to allocate 10485760000 bytes.")

    monkeypatch.setattr(SDResNet, "init_weights", out_of_memory)
    code = exit_code(sdzoo.cli.export.main, ["--model", f"local-dir:{folder}", "--output",
                                                       str(tmp_path / "m.onnx")])
    err = capsys.readouterr().err
    assert code == 2 and "not enough memory to build and load" in err and "do not match" not in err
    with pytest.raises(hub.CheckpointMismatchError, match="not enough memory") as info:
        hub.load_run(folder)
    assert "does not fit" not in str(info.value)


def test_an_error_is_quoted_in_one_line_however_long_it_is():
    strict_load = RuntimeError("Error(s) in loading state_dict for SDResNet:\n\tMissing key(s): " + "k, " * 500
                               + "\n\tUnexpected key(s): a\n\tsize mismatch for fc.weight\n\tand more\n")
    assert error_line(ValueError("bad\nsecond line")) == "ValueError: bad"
    assert error_line(OSError()) == "OSError"
    quoted = error_line(strict_load, 60, lines=3)  # each line cut at 60 characters
    assert "\n" not in quoted and quoted.endswith(" ... (2 more lines)")
    assert quoted.startswith("RuntimeError: Error(s) in loading state_dict for SDResNet: Missing key(s): k, k,")
    assert "Unexpected key(s): a" in quoted and len(quoted) < 200



@pytest.mark.parametrize("argv, flag", [
    (["demo", "--output", "{file}/run"], "--output"),
    (["compare", "--output", "{file}/runs", "--seeds", "1"], "--output"),
    (["compare", "--output", "{file}", "--seeds", "1"], "--output"),
    (["depth-sweep", "--model", "local-dir:{tmp}", "--output", "{file}/sweep"], "--output"),
    (["bench", "--json", "{file}/b.json"], "--json"),
    (["coverage", "--json", "{file}/c.json"], "--json"),
    (["push", "--model", "{tmp}", "--repo-id", "tester/t", "--local-dir", "{file}/out"], "--local-dir"),
    (["push", "--model", "{tmp}", "--repo-id", "tester/t", "--local-dir", "{tmp}"], "--local-dir"),
])
def test_an_output_that_cannot_be_written_is_refused_before_any_work(tmp_path, capsys, argv, flag):
    a_file = tmp_path / "a_file"
    a_file.write_text("not a folder")
    argv = [a.format(file=a_file, tmp=tmp_path) for a in argv]
    before = sorted(tmp_path.rglob("*"))
    assert exit_code(sdzoo.cli.main, argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith(f"sdzoo {argv[0]}: error: {flag} ") and "Traceback" not in "".join(err)
    assert sorted(tmp_path.rglob("*")) == before  # nothing trained, written or created


@pytest.mark.parametrize("flags, message", [
    (["--opset", "0"], "--opset must be an integer from "),
    (["--atol", "-1"], "--atol and --rtol must be >= 0"),
])
def test_export_settings_are_checked_before_the_model_is_built(tmp_path, capsys, monkeypatch, flags, message):
    monkeypatch.setattr(timm, "create_model", lambda *a, **k: pytest.fail("the model was built"))
    argv = ["export", "--model", "sd_resnet20_cifar", "--output", str(tmp_path / "m.onnx"), *flags]
    assert exit_code(sdzoo.cli.main, argv) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith(f"sdzoo export: error: {message}")
    assert list(tmp_path.iterdir()) == []
