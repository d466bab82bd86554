"""The main job and the benchmark, end to end on small settings."""
import json
import subprocess
import sys

import pytest
import timm
import torch

import sdzoo.cli.bench
import sdzoo.cli.coverage
import sdzoo.cli.demo
from helpers import ROOT


def run_script(*args, timeout=600):
    return subprocess.run([sys.executable, *map(str, args)], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout)


@pytest.mark.slow
@pytest.mark.timeout(900)  # the script in a subprocess (up to 600 s)
def test_run_digits_does_the_whole_job(tmp_path):
    out = tmp_path / "digits"
    out.mkdir()  # taken: the job must not overwrite it, but use digits-2
    result = run_script("scripts/run_digits.py", "--output", out, "--epochs", "1", "--device", "cpu")
    assert result.returncode == 0, result.stderr[-3000:]
    root = tmp_path / "digits-2"
    assert not any(out.iterdir())
    sd, constant, hub = root / "stochastic_depth", root / "constant_depth", root / "hub"
    for path in [sd / "model.safetensors", sd / "config.json", sd / "summary.json", sd / "curves.png",
                 sd / "model.onnx", constant / "model.safetensors", hub / "README.md", hub / "model.onnx",
                 hub / "model.safetensors", hub / "config.json"]:
        assert path.is_file(), f"missing {path}"
        assert str(path.parent) in result.stdout or str(path) in result.stdout
    for label in ("constant depth (PyTorch)", "stochastic depth, folded (onnxruntime)"):
        assert label in result.stdout
    # the printed PyTorch accuracy of the stochastic-depth run is what its own summary says
    summary = json.loads((sd / "summary.json").read_text())
    assert f"| stochastic depth, p_L = 0.5 (PyTorch) | {summary['test_accuracy']:.2f}% |" in result.stdout
    loaded = timm.create_model(f"local-dir:{sd}", pretrained=True)
    assert loaded.survival_prob == 0.5 and loaded.gate_mode == "batch"
    constant_model = timm.create_model(f"local-dir:{constant}", pretrained=True)
    assert constant_model.gate_mode == "off"


@pytest.mark.slow
@pytest.mark.timeout(900)  # the script in a subprocess (up to 600 s)
def test_benchmark_table_and_json(tmp_path):
    out = tmp_path / "bench.json"
    result = run_script("scripts/benchmark.py", "--model", "sd_resnet20_cifar", "--batch-size", "8",
                        "--steps", "2", "--warmup", "0", "--flop-steps", "8", "--device", "cpu",
                        "--skip-inference", "--json", out)
    assert result.returncode == 0, result.stderr[-3000:]
    data = json.loads(out.read_text())
    rows = {r["variant"]: r for r in data["training"] if r["setting"] == "cpu"}
    assert set(rows) == {"constant depth", "sdzoo batch", "sdzoo batch, no grads", "sdzoo sample",
                         "timm DropPath", "torchvision SD batch", "torchvision SD row"}
    # zero gradients or none: the same draws (same seed), the same executed FLOPs
    assert rows["sdzoo batch, no grads"]["flop_ratio"] == pytest.approx(rows["sdzoo batch"]["flop_ratio"])
    # masks save nothing; the real skip saves about what the schedule predicts (ResNet-20: 6.5 of 9 blocks)
    for masked in ("timm DropPath", "torchvision SD batch", "torchvision SD row"):
        assert rows[masked]["flop_ratio"] == pytest.approx(1.0)
    assert rows["sdzoo batch"]["flop_ratio"] < 0.95
    assert rows["sdzoo sample"]["flop_ratio"] == pytest.approx(rows["sdzoo batch"]["flop_ratio"], abs=0.12)
    gpu_rows = [r for r in data["training"] if r["setting"] != "cpu"]
    if not torch.cuda.is_available():
        assert gpu_rows and all(r["step_ms"] is None for r in gpu_rows)
        assert "not run" in result.stdout
    assert "| cpu | sdzoo batch |" in result.stdout and "Machine:" in result.stdout


@pytest.mark.parametrize("args,flag", [
    (["--batch-size", "0"], "--batch-size"),
    (["--model", "resnet50"], "--model"),
    (["--survival-prob", "0"], "--survival-prob"),
])
def test_benchmark_bad_flags(args, flag, capsys):
    with pytest.raises(SystemExit) as exit_info:
        sdzoo.cli.bench.main(args)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and flag in err and "Traceback" not in err


def test_run_digits_bad_flags(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        sdzoo.cli.demo.main(["--epochs", "0", "--output", str(tmp_path / "x")])
    assert exit_info.value.code == 2 and "--epochs" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_coverage_survey_trains_the_skip_side_of_every_branch(monkeypatch):
    # A random draw at drop_path_rate 0.1 skips few branches, if any: --forward also trains with all of them
    # skipped, where a conversion can fail (it once did, for Swin's shifted-window attention).
    import sdzoo
    from sdzoo.convert import DropPathGate
    from sdzoo.gate import ResidualGate

    script = sdzoo.cli.coverage
    skipped = set()
    real_skip = ResidualGate._skip

    def counting_skip(self, *args, **kwargs):
        skipped.add(id(self))
        return real_skip(self, *args, **kwargs)

    monkeypatch.setattr(ResidualGate, "_skip", counting_skip)
    results = script.survey(["resnet26"], 0.1, True, lambda *progress: None)
    assert results["resnet26"]["batch"] == results["resnet26"]["sample"] == "ok"
    converted = timm.create_model("resnet26", drop_path_rate=0.1, device="meta")
    sdzoo.convert_drop_path(converted, mode="batch", min_drop_rate=0.0)
    gates = [m for m in converted.modules() if isinstance(m, DropPathGate)]
    assert gates and len(skipped) == len(gates)  # sample mode runs every branch, on fewer samples
