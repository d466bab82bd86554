"""The ``sdzoo`` command line: its subcommands, their flags (the scripts' flags, unchanged), help and usage errors,
and the scripts that run the same commands."""
import os
import re
import subprocess
import sys

import pytest

from sdzoo.cli import COMMANDS, SCRIPTS, build_parser, command, main
from sdzoo.training.settings import build_parser as build_train_parser
from helpers import ROOT

# The flags of each script, as they were when the scripts moved into the package: users and docs call them.
FLAGS = {
    "export": ["--atol", "--bench-seconds", "--benchmark", "--calib-data", "--calib-images", "--checkpoint",
               "--checkpoint-folded", "--data-dir", "--dataset", "--gate-mode", "--img-size", "--keep-blocks",
               "--label-names", "--model", "--no-fold", "--num-classes", "--opset", "--output", "--prune-order",
               "--pruned-dir", "--quant-output", "--quantize", "--recalibrate-bn", "--rtol", "--scaling",
               "--survival-prob", "--survival-rule", "--verify-batch-sizes"],
    "push": ["--card-dir", "--card-template", "--commit-message", "--curves", "--endpoint", "--local-dir", "--model",
             "--onnx", "--private", "--repo-id", "--timeout"],
    "bench": ["--batch-size", "--channels-last", "--convert", "--device", "--drop-path-rate", "--flop-steps",
              "--img-size", "--infer-iters", "--json", "--model", "--no-compile", "--seed", "--skip-inference",
              "--skip-training", "--steps", "--survival-prob", "--uniform-rate", "--variants", "--warmup"],
    "coverage": ["--backend", "--compile", "--drop-path-rate", "--every", "--filter", "--forward", "--json", "--quiet",
                 "--steps", "--time-limit"],
    "demo": ["--device", "--epochs", "--output", "--repo-id", "--seed"],
    "depth-sweep": ["--bench-seconds", "--data-dir", "--dataset", "--depths", "--model", "--orders", "--output",
                    "--recalibrate-bn", "--rounds", "--threads", "--twin"],
    # the trainer's flags live in sdzoo.training.settings: the command has all of them
    "train": sorted(set(re.findall(r"(--[a-z][\w-]*)", build_train_parser().format_usage()))),
    # the comparison's own, and every flag of the trainer, which it passes on to each run
    "compare": ["--output", "--seeds", "--device", "--jobs", "--threads", "--dataset", "--epochs", "--survival-prob"],
}


def usage_flags(help_text: str):
    """The long flags of a command, as its usage line lists them."""
    usage = help_text.split("\n\n")[0]
    return set(re.findall(r"(--[a-z][\w-]*)", usage))


def help_of(call, capsys) -> str:
    with pytest.raises(SystemExit) as exit_info:
        call()
    out = capsys.readouterr().out
    assert exit_info.value.code == 0, out
    return out


def test_every_command_has_its_flags():
    assert set(FLAGS) == set(COMMANDS)


def test_sdzoo_help_lists_every_command(capsys):
    out = help_of(lambda: main(["--help"]), capsys)
    assert out.startswith("usage: sdzoo")
    for name in COMMANDS:
        assert re.search(rf"^\s+{re.escape(name)}\b", out, re.M), name


@pytest.mark.parametrize("name", list(COMMANDS))
def test_each_command_help_lists_its_flags(name, capsys):
    run = help_of(lambda: main([name, "--help"]), capsys)
    sub = help_of(lambda: build_parser().parse_args([name, "--help"]), capsys)
    own = command(name).build_parser().format_help()
    assert all(re.match(rf"usage: sdzoo {name}\s", text) for text in (run, sub))
    flags = usage_flags(own)
    assert usage_flags(run) == usage_flags(sub) == flags  # the subcommand has exactly the command's flags
    missing = [flag for flag in FLAGS[name] if flag not in flags]
    assert not missing, f"sdzoo {name} lost {missing}"
    if name not in ("train", "compare"):  # the trainer's flags are its own: checked by membership above
        assert flags == set(FLAGS[name]), f"sdzoo {name}: new flags {sorted(flags - set(FLAGS[name]))}"


def test_the_subcommands_parse_what_the_scripts_take():
    # what the docs show: scripts/X.py ARGS parses as sdzoo SCRIPTS["X.py"] ARGS
    args = build_parser().parse_args([SCRIPTS["export_onnx.py"], "--model", "local-dir:runs/r110", "--output",
                                      "r110.onnx", "--quantize", "int8", "--keep-blocks", "40"])
    assert (args.command, args.model, args.quantize, args.keep_blocks) == ("export", "local-dir:runs/r110", "int8", 40)
    args = build_parser().parse_args([SCRIPTS["compare.py"], "--output", "runs/c", "--seeds", "1", "2", "--dataset",
                                      "fashion_mnist", "--epochs", "15"])
    assert (str(args.output), args.seeds, args.dataset, args.epochs) == ("runs/c", [1, 2], "fashion_mnist", 15)
    with pytest.raises(SystemExit) as exit_info:
        build_parser().parse_args(["push", "--model", "runs/r", "--repo-id", "o/n", "--no-such-flag"])
    assert exit_info.value.code == 2


def test_an_unknown_command_exits_2_and_names_it(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["frobnicate", "--model", "x"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2
    assert "sdzoo: error: argument COMMAND: invalid choice: 'frobnicate'" in err and "export" in err


def test_no_command_exits_2(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([])
    assert exit_info.value.code == 2 and "required: COMMAND" in capsys.readouterr().err


def test_a_command_reports_a_wrong_flag_under_its_name(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["demo", "--epochs", "0", "--output", str(tmp_path / "x")])
    assert exit_info.value.code == 2 and "sdzoo demo: error: --epochs must be a positive integer" in \
        capsys.readouterr().err
    assert not (tmp_path / "x").exists()
    # a wrong argument found after parsing: the same one line, the same status
    code = main(["push", "--model", "hf-hub:o/n", "--repo-id", "o/n", "--local-dir", str(tmp_path / "y")])
    assert code == 2 and "--model must be a local run folder" in capsys.readouterr().err


def test_every_script_is_a_wrapper_of_its_command():
    scripts = sorted(p.name for p in (ROOT / "scripts").glob("*.py") if p.name != "refusal_costs.py")
    assert scripts == sorted(SCRIPTS)
    for script, name in SCRIPTS.items():
        text = (ROOT / "scripts" / script).read_text()
        module = command(name).__name__
        assert f"from {module} import main" in text and "sys.exit(main())" in text, script
        assert len(text.splitlines()) <= 16, f"scripts/{script} holds more than a wrapper"


def test_refusal_costs_uses_no_private_sdzoo_name():
    text = (ROOT / "scripts" / "refusal_costs.py").read_text()
    assert not re.findall(r"sdzoo(?:\.\w+)*\._\w+|from sdzoo[\w.]* import [^\n]*\b_\w+", text)


def test_python_m_sdzoo_help():
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join(
        [str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]))
    proc = subprocess.run([sys.executable, "-m", "sdzoo", "--help"], capture_output=True, text=True, timeout=300,
                          env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.startswith("usage: sdzoo") and all(name in proc.stdout for name in COMMANDS)


def test_sdzoo_train_loads_no_other_command():
    """Each torchrun rank and each run of `sdzoo compare` starts `sdzoo train`: it imports its own command only,
    not onnx, onnxruntime and the Hub upload of the others."""
    code = ("import sys, sdzoo.cli, sdzoo.cli.train; "
            "print(sorted(m for m in ('onnx', 'onnxruntime', 'sdzoo.hub.upload', 'sdzoo.cli.bench') "
            "if m in sys.modules))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 0 and proc.stdout.strip() == "[]", proc.stdout + proc.stderr
