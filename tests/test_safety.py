"""Ordinary mistakes lose no trained weights, publish no wrong file and never hang (one test per case).

Each test makes the mistake a user would make and checks that the command stops with a message, and that
what was there before is intact, byte for byte.
"""
import hashlib
import json
import os
import secrets
import subprocess
import sys
import time
from pathlib import Path

import huggingface_hub
import pytest
import timm
import torch
from safetensors.torch import save_file

from sdzoo import hub, onnx_export
from sdzoo import train as sdtrain
from sdzoo.checkpoint import CONFIG_NAME, WEIGHTS_NAME, read_weights_settings, save_weights
from sdzoo.fold import fold_survival

from hub_server import FakeHub
from helpers import ROOT, load_script, randomize_batchnorm

TRAIN = ROOT / "scripts" / "train.py"
TOKEN = "hf_sdzoo_safety_" + secrets.token_hex(12)
FAST = ["--dataset", "digits", "--batch-size", "128", "--device", "cpu", "--quiet", "--threads", "1"]

pytestmark = pytest.mark.filterwarnings("ignore:Use 'content=<...>' to upload raw bytes:DeprecationWarning")


def snapshot(folder: Path):
    """Every file of a folder and the sha256 of its bytes."""
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


def exit_code(fn, *args):
    try:
        return fn(*args)
    except SystemExit as e:
        return e.code


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    """A finished one-epoch run folder (kept read-only by the tests: each copies what it changes)."""
    out = tmp_path_factory.mktemp("run") / "r20"
    assert sdtrain.main([*FAST, "--epochs", "1", "--output", str(out)]) == 0
    return out


def interrupted_run(out: Path, monkeypatch, extra=()):
    """A two-epoch run stopped (as by Ctrl-C) in epoch 2, after the first checkpoint."""
    evaluate = sdtrain.evaluate

    def stop_in_epoch_2(*args, **kwargs):
        if (out / "checkpoint.pt").exists():
            raise KeyboardInterrupt
        return evaluate(*args, **kwargs)

    with monkeypatch.context() as mp:
        mp.setattr(sdtrain, "evaluate", stop_in_epoch_2)
        code = sdtrain.main([*FAST, "--epochs", "2", "--lr-drops", "--output", str(out), *extra])
    assert code == 130
    return out


# 1 -----------------------------------------------------------------------------------------------------
def test_export_refuses_an_output_that_is_one_of_its_inputs(trained_run, tmp_path, capsys):
    script = load_script("export_onnx")
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


# 2 -----------------------------------------------------------------------------------------------------
def test_a_new_run_never_writes_beside_another_runs_config(trained_run, tmp_path, capsys):
    # config.json and the weights are written together, from the same model.
    config = json.loads((trained_run / CONFIG_NAME).read_text())
    recorded = read_weights_settings(trained_run / WEIGHTS_NAME)
    assert {k: config["model_args"][k] for k in recorded["model_args"]} == recorded["model_args"]

    folder = tmp_path / "reused"
    folder.mkdir()
    (folder / CONFIG_NAME).write_bytes((trained_run / CONFIG_NAME).read_bytes())  # p_L = 0.5, no checkpoint
    before = snapshot(folder)
    code = sdtrain.main([*FAST, "--epochs", "1", "--survival-prob", "1.0", "--output", str(folder)])
    assert code == 2
    assert "holds another run's files (config.json)" in capsys.readouterr().err
    assert snapshot(folder) == before


# 3 -----------------------------------------------------------------------------------------------------
def test_push_refuses_an_onnx_file_of_other_weights(trained_run, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    for name in (CONFIG_NAME, WEIGHTS_NAME, "summary.json"):
        (run / name).write_bytes((trained_run / name).read_bytes())
    torch.manual_seed(5)
    stale = randomize_batchnorm(timm.create_model(f"local-dir:{run}", pretrained=False)).eval()
    onnx_export.export_onnx(fold_survival(stale), run / "model.onnx", verify_batch_sizes=(1,))
    with pytest.raises(hub.CheckpointMismatchError, match="does not compute what"):
        hub.publish(run, "tester/r20", local_dir=tmp_path / "hub")
    assert not (tmp_path / "hub").exists()

    model = timm.create_model(f"local-dir:{run}", pretrained=True).eval()
    onnx_export.export_onnx(fold_survival(model), run / "model.onnx", verify_batch_sizes=(1,))
    result = hub.publish(run, "tester/r20", local_dir=tmp_path / "hub")
    assert "model.onnx" in result.files


# 4 -----------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_two_processes_on_one_output_one_is_refused(tmp_path):
    out = tmp_path / "shared"
    cmd = [sys.executable, str(TRAIN), *FAST, "--epochs", "3", "--output", str(out)]
    first = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    deadline = time.monotonic() + 120
    while not (out / ".lock").exists() and first.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    second = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT)
    first_out, first_err = first.communicate(timeout=300)
    assert second.returncode == 2, second.stderr
    assert "another process is writing to" in second.stderr
    assert first.returncode == 0, first_err
    epochs = [json.loads(line)["epoch"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert epochs == [1, 2, 3]
    recorded = read_weights_settings(out / WEIGHTS_NAME)["model_args"]
    config = json.loads((out / CONFIG_NAME).read_text())["model_args"]
    assert {k: config[k] for k in recorded} == recorded


def test_run_digits_creates_each_fresh_folder_atomically(tmp_path):
    fresh_folder = load_script("run_digits").fresh_folder
    first, second = fresh_folder(tmp_path / "digits"), fresh_folder(tmp_path / "digits")
    assert first != second and first.is_dir() and second.is_dir()
    assert [p.name for p in sorted(tmp_path.iterdir())] == ["digits", "digits-2"]


# 5 -----------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_push_exits_within_its_timeout_when_the_hub_never_answers_the_commit(trained_run, tmp_path):
    timeout = 4
    with FakeHub(tokens={TOKEN: "tester"}) as server:
        server.hang("POST", r"/commit/")
        env = dict(os.environ, HF_TOKEN=TOKEN, HF_HOME=str(tmp_path / "hf"), HF_HUB_DISABLE_XET="1",
                   HF_HUB_DISABLE_TELEMETRY="1")
        start = time.monotonic()
        proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "push_to_hub.py"), "--model", str(trained_run),
                               "--repo-id", "tester/hangs", "--endpoint", server.url, "--timeout", str(timeout)],
                              capture_output=True, text=True, env=env, timeout=120, cwd=ROOT)
        end = time.monotonic()
        assert server.hung, "the commit request never reached the server"
        committed_at = server.hung[0][0]
        repos = dict(server.repos)
    assert proc.returncode != 0
    # From the unanswered commit to the exit: the timeout, then deleting the new repo again, then the
    # interpreter's exit (1.5 to 3 s with torch and timm loaded, on two busy cores).
    assert end - committed_at < timeout + 5, (end - committed_at, proc.stderr)
    assert end - start < 60
    assert "did not answer in time" in proc.stderr
    assert "was deleted again" in proc.stderr and "tester/hangs" not in repos  # no empty repo left
    assert TOKEN not in proc.stdout + proc.stderr


# 6 -----------------------------------------------------------------------------------------------------
def test_a_bare_checkpoint_brings_its_survival_settings(tmp_path, capsys):
    script = load_script("export_onnx")
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


# 7 -----------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_mistakes_exit_2_with_a_message_that_names_the_flag_or_file(trained_run, tmp_path, capsys, monkeypatch):
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    train_cases = [
        (["--output", str(a_file)], "is a file"),
        (["--output", str(a_file / "run")], "is a file, not a folder"),
        (["--weight-decay", "1e308"], "--weight-decay"),
        (["--seed", str(2**64)], "--seed"),
        (["--image-size", "100000"], "--image-size"),
        (["--shift", "40"], "--shift 40 must be smaller than the image"),
    ]
    for flags, expected in train_cases:
        code = exit_code(sdtrain.main, [*FAST, "--epochs", "1", *(["--output", str(tmp_path / "r")]
                                                                  if "--output" not in flags else []), *flags])
        assert code == 2 and expected in capsys.readouterr().err, flags
    assert not (tmp_path / "r").exists()

    for name, content in (("list.pt", [1, 2, 3]), ("dict.pt", {"format": 1, "model": {}})):
        torch.save(content, tmp_path / name)
        assert sdtrain.main(["--resume", str(tmp_path / name)]) == 2
        assert "not a checkpoint of this trainer" in capsys.readouterr().err
    torch.save({"obj": Path("elsewhere")}, tmp_path / "pickle.pt")  # a class: refused unloaded
    assert sdtrain.main(["--resume", str(tmp_path / "pickle.pt")]) == 2
    err = capsys.readouterr().err
    assert "nothing in it was run" in err and "weights_only=False" not in err

    export = load_script("export_onnx")
    for flags, expected in ((["--output", str(tmp_path)], "is a directory"),
                            (["--output", str(a_file / "m.onnx")], "is a file"),
                            (["--output", str(tmp_path / "q.onnx"), "--quantize", "int8", "--calib-images", "0"],
                             "--calib-images"),
                            (["--output", str(tmp_path / "q.onnx"), "--benchmark", "--bench-seconds", "0"],
                             "--bench-seconds must be a positive number of seconds")):
        code = exit_code(export.main, ["--model", f"local-dir:{trained_run}", *flags])
        assert code == 2 and expected in capsys.readouterr().err, flags
    assert not (tmp_path / "q.onnx").exists()

    for config, expected in (("{", "is not valid JSON"),
                             (json.dumps(dict(architecture="sd_resnet20_cifar", model_args=[1, 2])),
                              "'model_args' must be a JSON object")):
        broken = tmp_path / "broken"
        broken.mkdir(exist_ok=True)
        (broken / CONFIG_NAME).write_text(config)
        (broken / WEIGHTS_NAME).write_bytes((trained_run / WEIGHTS_NAME).read_bytes())
        code = exit_code(export.main, ["--model", f"local-dir:{broken}", "--output", str(tmp_path / "b.onnx")])
        err = capsys.readouterr().err
        assert code == 2 and expected in err and str(broken / CONFIG_NAME) in err
        with pytest.raises(hub.CheckpointMismatchError, match=expected):
            hub.load_run(broken)

    push = load_script("push_to_hub")
    assert push.main(["--model", str(trained_run), "--repo-id", "tester/t", "--local-dir", str(tmp_path / "h"),
                      "--timeout", "-1"]) == 2
    assert "--timeout must be a positive number of seconds" in capsys.readouterr().err
    assert not (tmp_path / "h").exists()

    benchmark = load_script("benchmark")
    assert exit_code(benchmark.parse_args, ["--json", str(a_file / "b.json")]) == 2
    assert "--json" in capsys.readouterr().err

    # A full disk (here: a file-size limit) while a resumed run writes: exit 2, the checkpoint intact.
    run = interrupted_run(tmp_path / "full", monkeypatch)
    capsys.readouterr()
    before = snapshot(run)
    limit = (run / "checkpoint.pt").stat().st_size // 4

    def limit_file_size():
        import resource
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    proc = subprocess.run([sys.executable, str(TRAIN), "--resume", str(run), "--quiet"], capture_output=True,
                          text=True, timeout=300, cwd=ROOT, preexec_fn=limit_file_size)
    assert proc.returncode == 2, proc.stderr
    assert "cannot write the run folder" in proc.stderr and "Traceback" not in proc.stderr
    after = snapshot(run)
    for name in ("checkpoint.pt", WEIGHTS_NAME, CONFIG_NAME):
        assert after[name] == before[name], name


# 8 -----------------------------------------------------------------------------------------------------
def test_a_resumed_run_may_lower_the_lr_and_interrupts_say_what_is_kept(tmp_path, capsys, monkeypatch):
    with monkeypatch.context() as mp:
        mp.setattr(sdtrain, "evaluate", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt))
        assert sdtrain.main([*FAST, "--epochs", "1", "--output", str(tmp_path / "early")]) == 130
    err = capsys.readouterr().err
    assert "before the first checkpoint: there is nothing to resume" in err and "is kept" not in err

    run = interrupted_run(tmp_path / "run", monkeypatch)
    assert "the last checkpoint" in capsys.readouterr().err
    assert sdtrain.main(["--resume", str(run), "--lr", "0.01", "--quiet"]) == 0
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [1, 2]
    assert records[0]["lr"] == pytest.approx(0.1) and records[1]["lr"] == pytest.approx(0.01)
    assert records[1]["lr_change"]["old"] == 0.1 and records[1]["lr_change"]["new"] == 0.01
    summary = json.loads((run / "summary.json").read_text())
    assert summary["finished"] and summary["settings"]["lr"] == 0.01
    assert [(c["old"], c["new"], c["epoch"]) for c in summary["lr_changes"]] == [(0.1, 0.01, 1)]
    # Any other defining setting still may not change.
    assert sdtrain.main(["--resume", str(run), "--momentum", "0.5"]) == 2


# 9 -----------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_a_repo_id_never_overwrites_a_file_the_project_ships(trained_run, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_DISABLE_XET", True)
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    shipped = snapshot(ROOT / "model_cards")
    cards = tmp_path / "cards"
    cards.mkdir()
    for name in shipped:
        (cards / name).write_bytes((ROOT / "model_cards" / name).read_bytes())
    cli = load_script("push_to_hub")
    with FakeHub(tokens={TOKEN: "tester"}) as server:
        for repo_id in ("tester/README", "tester/template"):
            code = cli.main(["--model", str(trained_run), "--repo-id", repo_id, "--endpoint", server.url,
                             "--card-dir", str(cards)])
            assert code == 2 and "is not a card of" in capsys.readouterr().err
        assert server.repos == {}  # refused before anything was uploaded
        assert snapshot(cards) == shipped
        # By default the card is not saved at all, so nothing in the checkout changes.
        assert cli.main(["--model", str(trained_run), "--repo-id", "tester/README", "--endpoint", server.url]) == 0
        assert "tester/README" in server.repos
        # An earlier card of the same repo may be replaced.
        assert cli.main(["--model", str(trained_run), "--repo-id", "tester/r20", "--endpoint", server.url,
                         "--card-dir", str(cards)]) == 0
        assert cli.main(["--model", str(trained_run), "--repo-id", "tester/r20", "--endpoint", server.url,
                         "--card-dir", str(cards)]) == 0
    assert snapshot(ROOT / "model_cards") == shipped
    assert {k: v for k, v in snapshot(cards).items() if k != "r20.md"} == shipped
