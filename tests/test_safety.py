"""Ordinary mistakes lose no trained weights, publish no wrong file and never hang (one test per case).

Each test makes the mistake a user would make and checks that the command stops with a message, and that
what was there before is intact, byte for byte.
"""
import hashlib
import io
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import huggingface_hub
import pytest
import timm
import torch
from safetensors.torch import save_file

from sdzoo.hub import upload as hub
from sdzoo.export import onnx_export
from sdzoo.training import train as sdtrain
from sdzoo.files.run_folder import CONFIG_NAME, WEIGHTS_NAME, save_model_config
from sdzoo.files.weights import read_weights_settings, save_weights
from sdzoo.fold import fold_survival
from sdzoo.files.weights import MissingWeightsError, WeightsError

from hub_server import FakeHub
import sdzoo.cli.bench
import sdzoo.cli.demo
import sdzoo.cli.export
import sdzoo.cli.push
from helpers import ROOT, randomize_batchnorm

TRAIN = ROOT / "scripts" / "train.py"
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
def interrupted(tmp_path_factory):
    """One interrupted run for the tests that only tamper with a copy of it (``copy_of``)."""
    with pytest.MonkeyPatch.context() as mp:
        return interrupted_run(tmp_path_factory.mktemp("interrupted") / "run", mp)


def copy_of(folder: Path, to: Path) -> Path:
    to.mkdir()
    for p in folder.iterdir():
        if p.is_file() and p.name != ".lock":
            (to / p.name).write_bytes(p.read_bytes())
    return to


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
    fresh_folder = sdzoo.cli.demo.fresh_folder
    first, second = fresh_folder(tmp_path / "digits"), fresh_folder(tmp_path / "digits")
    assert first != second and first.is_dir() and second.is_dir()
    assert [p.name for p in sorted(tmp_path.iterdir())] == ["digits", "digits-2"]


# 5 -----------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_push_exits_within_its_timeout_when_the_hub_never_answers_the_commit(trained_run, tmp_path, hub_token):
    timeout = 4
    with FakeHub(tokens={hub_token: "tester"}) as server:
        server.hang("POST", r"/commit/")
        env = dict(os.environ, HF_TOKEN=hub_token, HF_HOME=str(tmp_path / "hf"), HF_HUB_DISABLE_XET="1",
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
    assert hub_token not in proc.stdout + proc.stderr


# 6 -----------------------------------------------------------------------------------------------------
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


# 7 -----------------------------------------------------------------------------------------------------
# Mistakes exit 2 with a message that names the flag or file, and leave nothing behind: one case a test.
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
    result = cli(sdtrain.main, [*FAST, "--epochs", "1", *output, *flags])
    assert result.code == 2 and expected in result.err, flags
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("name,content", [("list.pt", [1, 2, 3]), ("dict.pt", {"format": 1, "model": {}})])
def test_resume_of_a_torch_file_of_something_else_exits_2(name, content, tmp_path, capsys):
    torch.save(content, tmp_path / name)
    assert sdtrain.main(["--resume", str(tmp_path / name)]) == 2
    assert "not a checkpoint of this trainer" in capsys.readouterr().err


def test_resume_of_a_pickled_class_is_refused_unloaded(tmp_path, capsys):
    torch.save({"obj": Path("elsewhere")}, tmp_path / "pickle.pt")
    assert sdtrain.main(["--resume", str(tmp_path / "pickle.pt")]) == 2
    err = capsys.readouterr().err
    assert "nothing in it was run" in err and "weights_only=False" not in err


EXPORT_FLAG_MISTAKES = [
    (["--output", "{tmp_path}"], "is a directory"),
    (["--output", "{a_file}/m.onnx"], "is a file"),
    (["--output", "{tmp_path}/q.onnx", "--quantize", "int8", "--calib-images", "0"], "--calib-images"),
    (["--output", "{tmp_path}/q.onnx", "--benchmark", "--bench-seconds", "0"],
     "--bench-seconds must be a positive number of seconds"),
]


@pytest.mark.parametrize("flags,expected", EXPORT_FLAG_MISTAKES, ids=[e for _, e in EXPORT_FLAG_MISTAKES])
def test_export_flag_mistakes_exit_2_naming_the_flag(flags, expected, trained_run, a_file, tmp_path, cli):
    flags = [f.format(a_file=a_file, tmp_path=tmp_path) for f in flags]
    result = cli(sdzoo.cli.export.main, ["--model", f"local-dir:{trained_run}", *flags])
    assert result.code == 2 and expected in result.err, flags
    assert not (tmp_path / "q.onnx").exists()


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


def test_push_timeout_must_be_positive(trained_run, tmp_path, cli):
    result = cli(sdzoo.cli.push.main, ["--model", trained_run, "--repo-id", "tester/t", "--local-dir",
                                                    tmp_path / "h", "--timeout", "-1"])
    assert result.code == 2 and "--timeout must be a positive number of seconds" in result.err
    assert not (tmp_path / "h").exists()


def test_benchmark_json_path_under_a_file_exits_2(a_file, cli):
    result = cli(sdzoo.cli.bench.parse_args, ["--json", a_file / "b.json"])
    assert result.code == 2 and "--json" in result.err


@pytest.mark.slow
def test_a_full_disk_while_resuming_exits_2_with_the_checkpoint_intact(tmp_path, capsys, monkeypatch):
    # a file-size limit stands in for a full disk
    run = interrupted_run(tmp_path / "full", monkeypatch)
    capsys.readouterr()
    before = snapshot(run)
    limit = (run / "checkpoint.pt").stat().st_size // 4

    def limit_file_size():
        import resource
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    proc = subprocess.run([sys.executable, str(TRAIN), "--resume", str(run), "--quiet"], capture_output=True,
                          text=True, timeout=300, cwd=ROOT, preexec_fn=limit_file_size,
                          env=dict(os.environ, OMP_NUM_THREADS="1"))
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
def test_a_repo_id_never_overwrites_a_file_the_project_ships(trained_run, tmp_path, monkeypatch, capsys, hub_token):
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_DISABLE_XET", True)
    monkeypatch.setenv("HF_TOKEN", hub_token)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    shipped = snapshot(ROOT / "model_cards")
    cards = tmp_path / "cards"
    cards.mkdir()
    for name in shipped:
        (cards / name).write_bytes((ROOT / "model_cards" / name).read_bytes())
    cli = sdzoo.cli.push
    with FakeHub(tokens={hub_token: "tester"}) as server:
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


# == No wrong model ever loads, publishes or exports with exit 0 ==========================================
def folder_of(model, path: Path) -> Path:
    """A run folder as the trainer writes it: config.json and model.safetensors with its recorded settings."""
    path.mkdir(parents=True)
    save_model_config(path / CONFIG_NAME, model, dict(input_size=(3, 32, 32), mean=(0.5,) * 3, std=(0.25,) * 3))
    save_weights(path / WEIGHTS_NAME, model)
    return path


def edit_config(path: Path, change):
    config = json.loads((path / CONFIG_NAME).read_text())
    change(config)
    (path / CONFIG_NAME).write_text(json.dumps(config))


def trained_model(seed=0, **kwargs):
    torch.manual_seed(seed)
    return randomize_batchnorm(timm.create_model("sd_resnet20_cifar", num_classes=10, **kwargs)).eval()


X = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(3))


def logits(model):
    with torch.no_grad():
        return model.eval()(X)


def refused_everywhere(folder: Path, tmp_path: Path, capsys, expected: str):
    """local-dir: loading, load_run, publishing and exporting all refuse the folder, and leave no file."""
    before = snapshot(folder)
    with pytest.raises(WeightsError, match=expected):
        timm.create_model(f"local-dir:{folder}", pretrained=True)
    with pytest.raises(hub.CheckpointMismatchError, match=expected):
        hub.load_run(folder)
    with pytest.raises(hub.CheckpointMismatchError, match=expected):
        hub.publish(folder, "tester/wrong", local_dir=tmp_path / "hub")
    code = exit_code(sdzoo.cli.export.main, ["--model", f"local-dir:{folder}", "--output",
                                                       str(tmp_path / "wrong.onnx")])
    err = capsys.readouterr().err
    assert code == 2 and re.search(expected, err) and "Traceback" not in err
    assert not (tmp_path / "hub").exists() and not (tmp_path / "wrong.onnx").exists()
    assert snapshot(folder) == before


# 21.1 ----------------------------------------------------------------------------------------------------
def test_21_1_a_config_with_other_classes_never_loads_a_random_head(tmp_path, capsys):
    model = trained_model(survival_prob=0.7)
    folder = folder_of(model, tmp_path / "run")
    torch.testing.assert_close(logits(timm.create_model(f"local-dir:{folder}", pretrained=True)), logits(model),
                               rtol=0, atol=0)
    # model_args (today's config.json), the top level (timm's own place for it) and the pretrained cfg.
    for where, change in (("model_args", lambda c: (c["model_args"].update(num_classes=100), c.update(num_classes=100))),
                          ("top level", lambda c: (c["model_args"].pop("num_classes", None), c.update(num_classes=100)))):
        wrong = tmp_path / where.replace(" ", "_")
        wrong.mkdir()
        for name in (CONFIG_NAME, WEIGHTS_NAME):
            (wrong / name).write_bytes((folder / name).read_bytes())
        edit_config(wrong, change)
        refused_everywhere(wrong, tmp_path, capsys, r"num_classes=100 \(.*model.safetensors holds num_classes=10\)")
    # model_args keep 10 and the top level says 100: timm would drop the head
    edit_config(folder, lambda c: (c["model_args"].update(num_classes=10), c.update(num_classes=100)))
    refused_everywhere(folder, tmp_path, capsys, r"num_classes=100 for the pretrained cfg and builds num_classes=10|"
                                                 r"model_args\['num_classes'\] = 10 disagrees with num_classes = 100")
    # A caller's own num_classes is no way around it either: never a non-strict head drop.
    edit_config(folder, lambda c: c.update(num_classes=10))
    with pytest.raises(WeightsError, match=r"num_classes=5 \("):
        timm.create_model(f"local-dir:{folder}", pretrained=True, num_classes=5)
    with pytest.raises(WeightsError, match="pretrained_strict must be True"):
        timm.create_model(f"local-dir:{folder}", pretrained=True, pretrained_strict=False)


HOSTILE_HF_CHILD = """
import sys, timm, sdzoo
from sdzoo.files.weights import WeightsError
try:
    timm.create_model("hf-hub:" + sys.argv[1], pretrained=True)
except WeightsError as e:
    print("refused:", e)
else:
    print("loaded")
"""


@pytest.mark.slow
def test_21_1_and_3_a_hub_repo_of_other_classes_or_folded_weights_is_refused_over_hf_hub(tmp_path, monkeypatch,
                                                                                        hub_token):
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_DISABLE_XET", True)
    model = trained_model(survival_prob=0.7)
    wrong_classes = folder_of(model, tmp_path / "classes")
    edit_config(wrong_classes, lambda c: c["model_args"].update(num_classes=100))
    folded_weights = folder_of(model, tmp_path / "folded")
    save_weights(folded_weights / WEIGHTS_NAME, fold_survival(trained_model(survival_prob=0.7)))
    with FakeHub(tokens={hub_token: "tester"}) as server:
        api = huggingface_hub.HfApi(endpoint=server.url, token=hub_token)
        for folder in (wrong_classes, folded_weights):  # uploaded as a hostile repo would be, not by sdzoo
            api.create_repo(f"tester/{folder.name}")
            api.upload_folder(repo_id=f"tester/{folder.name}", folder_path=folder)
        env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGING"))}
        env.update(HF_ENDPOINT=server.url, HF_HOME=str(tmp_path / "hf"), HF_HUB_DISABLE_XET="1",
                   OMP_NUM_THREADS="1", HF_HUB_DISABLE_TELEMETRY="1")
        for folder, expected in ((wrong_classes, "num_classes=100 ("),
                                 (folded_weights, "an unfolded model, while the file's weights are folded")):
            proc = subprocess.run([sys.executable, "-c", HOSTILE_HF_CHILD, f"tester/{folder.name}"], env=env,
                                  capture_output=True, text=True, timeout=300, cwd=ROOT)
            assert proc.returncode == 0, proc.stderr
            assert proc.stdout.startswith("refused:") and expected in proc.stdout, proc.stdout


# 21.2 ----------------------------------------------------------------------------------------------------
def test_21_2_weights_whose_settings_contradict_config_are_refused_naming_both(tmp_path, capsys):
    folder = folder_of(trained_model(survival_prob=0.7), tmp_path / "run")
    edit_config(folder, lambda c: c["model_args"].update(survival_prob=0.3, scaling="inverted"))
    refused_everywhere(folder, tmp_path, capsys,
                       r"survival_prob=0\.3 \(the file's: 0\.7\); scaling='inverted' \(the file's: 'expectation'\)")
    # The evidence survives: the weights' metadata still says what they were trained with.
    assert read_weights_settings(folder / WEIGHTS_NAME)["model_args"]["survival_prob"] == 0.7


# 21.3 ----------------------------------------------------------------------------------------------------
def test_21_3_folded_and_unfolded_weights_never_mix(tmp_path, capsys):
    model = trained_model(survival_prob=0.5)
    expected = logits(model)
    folded = fold_survival(trained_model(survival_prob=0.5))
    folded_file, plain_file = tmp_path / "folded.safetensors", tmp_path / "plain.safetensors"
    save_weights(folded_file, folded)
    save_weights(plain_file, model)
    assert read_weights_settings(folded_file)["model_args"]["folded_from"] == folded.folded_from

    overlay = lambda path: dict(file=str(path))  # noqa: E731  timm's documented way to load a file
    with pytest.raises(WeightsError, match="an unfolded model, while the file's weights are folded"):
        timm.create_model("sd_resnet20_cifar", num_classes=10, pretrained=True, pretrained_cfg_overlay=overlay(folded_file))
    with pytest.raises(WeightsError, match="while the file's weights are not folded"):
        timm.create_model("sd_resnet20_cifar", num_classes=10, folded_from=folded.folded_from, pretrained=True,
                          pretrained_cfg_overlay=overlay(plain_file))
    right = timm.create_model("sd_resnet20_cifar", num_classes=10, folded_from=folded.folded_from, pretrained=True,
                              pretrained_cfg_overlay=overlay(folded_file))
    torch.testing.assert_close(logits(right), expected, rtol=0, atol=1e-5)

    # The export of a folded file never folds it again: what it computes is what the trained model computes.
    script = sdzoo.cli.export
    flags = ["--survival-prob", "0.5", "--survival-rule", "linear", "--scaling", "expectation", "--gate-mode", "batch"]
    code = exit_code(script.main, ["--model", "sd_resnet20_cifar", "--checkpoint", str(folded_file), *flags,
                                   "--output", str(tmp_path / "twice.onnx")])
    assert code == 2 and "--gate-mode batch (the checkpoint's: off)" in capsys.readouterr().err
    bare = tmp_path / "bare.safetensors"  # folded, written elsewhere: nothing in it says so
    save_file(folded.state_dict(), str(bare))
    code = exit_code(script.main, ["--model", "sd_resnet20_cifar", "--checkpoint", str(bare), *flags,
                                   "--output", str(tmp_path / "twice.onnx")])
    assert code == 2 and "--checkpoint-folded" in capsys.readouterr().err
    assert not (tmp_path / "twice.onnx").exists()
    for source, extra in ((folded_file, []), (bare, [*flags, "--checkpoint-folded", "yes"])):
        output = tmp_path / f"{source.stem}.onnx"
        assert script.main(["--model", "sd_resnet20_cifar", "--checkpoint", str(source), *extra, "--output",
                            str(output), "--verify-batch-sizes", "1"]) == 0
        got = onnx_export.predict_onnx(output, X.numpy())
        assert abs(got - expected.numpy()).max() <= 1e-4, source


# 21.4 ----------------------------------------------------------------------------------------------------
def test_21_4_nan_or_infinite_weights_are_never_published_or_exported(tmp_path, capsys):
    for value in (float("nan"), float("inf")):
        model = trained_model()
        model.layer2[1].bn2.weight.data[3] = value
        folder = folder_of(model, tmp_path / f"run_{value}")
        refused_everywhere(folder, tmp_path, capsys, r"holds NaN or infinite values in 1 tensor\(s\) "
                                                     r"\(layer2\.1\.bn2\.weight\)")
        code = exit_code(sdzoo.cli.export.main, [
            "--model", "sd_resnet20_cifar", "--checkpoint", str(folder / WEIGHTS_NAME), "--output",
            str(tmp_path / "nan.onnx")])
        assert code == 2 and "NaN or infinite" in capsys.readouterr().err
        assert not (tmp_path / "nan.onnx").exists()


# 21.5 ----------------------------------------------------------------------------------------------------
def test_21_5_resume_refuses_another_runs_checkpoint_and_touches_nothing(tmp_path, capsys, monkeypatch):
    ours = interrupted_run(tmp_path / "ours", monkeypatch)
    theirs = interrupted_run(tmp_path / "theirs", monkeypatch, extra=("--seed", "7"))
    twin = interrupted_run(tmp_path / "twin", monkeypatch, extra=("--survival-prob", "0.8"))
    capsys.readouterr()
    for other, expected in ((theirs, "its best evaluation"), (twin, "records other settings")):
        (ours / "checkpoint.pt").write_bytes((other / "checkpoint.pt").read_bytes())
        before = snapshot(ours)
        assert sdtrain.main(["--resume", str(ours), "--quiet"]) == 2
        err = capsys.readouterr().err
        assert "is not the last checkpoint of the run in" in err and expected in err, err
        assert snapshot(ours) == before  # history, summary and weights as they were
    # The folder's own checkpoint is no longer there, so nothing resumes; the right pair does.
    (theirs / "summary.json").unlink()
    (theirs / "metrics.jsonl").unlink()
    assert sdtrain.main(["--resume", str(theirs), "--quiet"]) == 2
    assert "the folder has no metrics.jsonl" in capsys.readouterr().err


# 21.9 ----------------------------------------------------------------------------------------------------
def test_21_9_a_hostile_config_is_refused_in_under_a_second(tmp_path):
    import resource

    folder = folder_of(trained_model(), tmp_path / "run")
    hostile = {
        "layers [3, 3, 300000]": lambda c: c["model_args"].update(layers=[3, 3, 300000]),
        "num_classes 2e6": lambda c: c["model_args"].update(num_classes=2_000_000),
        "widths": lambda c: c["model_args"].update(widths=[16, 32, 1_000_000]),
        "in_chans": lambda c: c["model_args"].update(in_chans=100_000),
        "block and stem": lambda c: c["model_args"].update(block="bottleneck", stem="imagenet"),  # within bounds
    }
    original = (folder / CONFIG_NAME).read_text()
    for name, change in hostile.items():
        (folder / CONFIG_NAME).write_text(original)
        edit_config(folder, change)
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        for pretrained in (True, False) if name != "block and stem" else (True,):
            start = time.perf_counter()
            with pytest.raises(ValueError):
                timm.create_model(f"local-dir:{folder}", pretrained=pretrained)
            assert time.perf_counter() - start < 1.0, name
        assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss < 50_000, name  # KiB: nothing large built


# 21.10 / 21.11 / 21.14 / 21.15 ----------------------------------------------------------------------------
def test_21_10_export_input_size_is_bounded(tmp_path, capsys):
    folder = folder_of(trained_model(), tmp_path / "run")
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
        onnx_export.export_onnx(trained_model(), tmp_path / "m.onnx", input_size=(3, 100000, 100000))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


def test_21_11_a_read_only_output_folder_is_found_before_loading(tmp_path, capsys):
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


def test_21_14_a_folder_without_weights_says_so(tmp_path, capsys):
    folder = folder_of(trained_model(), tmp_path / "run")
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


def test_21_15_an_allocation_failure_is_reported_as_memory(tmp_path, capsys, monkeypatch):
    folder = folder_of(trained_model(), tmp_path / "run")
    from sdzoo.models.sd_resnet import SDResNet

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


# 21.13 ---------------------------------------------------------------------------------------------------
def test_21_13_tampered_model_or_optimizer_state_is_a_clear_error(tmp_path, capsys, interrupted):
    run = copy_of(interrupted, tmp_path / "run")
    capsys.readouterr()
    original = torch.load(run / "checkpoint.pt", weights_only=True)
    momentum = next(iter(original["optimizer"]["state"]))

    def momentum_of_other_shape(c):
        c["optimizer"]["state"][momentum]["momentum_buffer"] = torch.zeros(7)

    def lr_that_is_no_number(c):
        c["optimizer"]["param_groups"][0]["lr"] = [0.1]

    def no_optimizer_state(c):
        c["optimizer"] = {"state": {}, "param_groups": []}

    def model_entry_that_is_no_tensor(c):
        c["model"]["conv1.weight"] = "weights"

    def scheduler_garbage(c):
        c["scheduler"] = [1, 2, 3]

    for tamper, expected in ((momentum_of_other_shape, "optimizer state"), (lr_that_is_no_number, "optimizer state"),
                             (no_optimizer_state, "optimizer state"), (scheduler_garbage, "scheduler state"),
                             (model_entry_that_is_no_tensor, "checkpoint.pt")):
        checkpoint = {**original, "model": dict(original["model"]), "optimizer": {
            "state": {k: dict(v) for k, v in original["optimizer"]["state"].items()},
            "param_groups": [dict(g) for g in original["optimizer"]["param_groups"]]}}
        tamper(checkpoint)
        torch.save(checkpoint, run / "checkpoint.pt")
        assert sdtrain.main(["--resume", str(run), "--quiet"]) == 2, tamper.__name__
        err = capsys.readouterr().err
        assert str(run / "checkpoint.pt") in err and expected in err and "Traceback" not in err, (tamper.__name__, err)


# 21.18 ---------------------------------------------------------------------------------------------------
def test_21_18_temporaries_of_a_live_writer_stay_and_a_killed_ones_go(tmp_path):
    from sdzoo.files.disk import remove_abandoned_temporaries, staged_file

    target = tmp_path / "m.int8.onnx"
    with staged_file(target) as live:
        Path(live).write_bytes(b"in progress")
        remove_abandoned_temporaries(target)  # its writer (this process) holds the lock
        assert Path(live).exists()
    abandoned = tmp_path / ".m.int8.onnx.abc123.tmp"  # a killed writer's: its lock went with it
    abandoned.write_bytes(b"half")
    other = tmp_path / ".other.onnx.abc123.tmp"
    other.write_bytes(b"not ours")
    remove_abandoned_temporaries(target)
    assert sorted(p.name for p in tmp_path.iterdir()) == [other.name, target.name]


@pytest.mark.slow
def test_21_18_kill_9_during_int8_quantization_leaves_no_hidden_file(tmp_path):
    import signal

    folder = folder_of(trained_model(), tmp_path / "run")
    out = tmp_path / "out"
    out.mkdir()
    cmd = [sys.executable, str(ROOT / "scripts" / "export_onnx.py"), "--model", f"local-dir:{folder}",
           "--output", str(out / "m.onnx"), "--quantize", "int8", "--verify-batch-sizes", "1"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    # 1024 calibration images keep the first run quantizing long enough to be killed there; the rerun needs few
    proc = subprocess.Popen(cmd + ["--calib-images", "1024"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env=env, cwd=ROOT)
    deadline = time.monotonic() + 240
    while not list(out.glob(".m.int8.onnx.*.tmp")) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    assert proc.poll() is None, "the export ended before quantizing"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert list(out.glob(".m.int8.onnx.*.tmp")), "killed before the int8 file was staged"
    rerun = subprocess.run(cmd + ["--calib-images", "64"], capture_output=True, env=env, cwd=ROOT, timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert sorted(p.name for p in out.iterdir()) == ["m.int8.onnx", "m.onnx"]


def test_21_9_the_parameter_bound_counts_what_the_constructor_builds():
    from sdzoo.files.weights import count_parameters

    for name, kwargs in (("sd_resnet20_cifar", {}), ("sd_resnet56_cifar", dict(shortcut="projection", num_classes=7)),
                         ("sd_resnet50", dict(global_pool="catavgmax", in_chans=1)), ("sd_resnet101", dict(num_classes=0))):
        model = timm.create_model(name, device="meta", **kwargs)
        blocks = model.residual_blocks()
        block = "bottleneck" if hasattr(blocks[0], "conv3") else "basic"
        layers = [len(getattr(model, s)) for s in model.stage_names]
        widths = [getattr(model, s)[0].conv1.out_channels for s in model.stage_names]
        counted = count_parameters(layers, widths, block, model.stem, kwargs.get("shortcut", "zero_pad" if
                                   model.stem == "cifar" else "projection"), model.num_classes, model.in_chans,
                                   kwargs.get("global_pool", "avg"))
        assert counted == sum(p.numel() for p in model.parameters()), name


# -- every restored value of checkpoint.pt -----------------------------------------------------------------
def _set(path, value):
    """A tamper that sets checkpoint[path[0]][path[1]]... to ``value``."""
    def tamper(checkpoint):
        target = checkpoint
        for key in path[:-1]:
            target = target[key]
        target[path[-1]] = value
    tamper.__name__ = "/".join(map(str, path))
    return tamper


WRONG_VALUES = [
    (_set(("global_step",), "12"), "global_step must be an integer >= 0"),
    (_set(("best", "val_error"), "5.0"), "best['val_error'] must be None or a %"),
    (_set(("optimizer", "param_groups", 0, "lr"), "0.1"), "the optimizer state's setting 'lr'"),
    (_set(("optimizer", "param_groups", 0, "momentum"), "0.9"), "the optimizer state's setting 'momentum'"),
    (_set(("scheduler", "milestones"), "garbage"), "the scheduler state's 'milestones'"),
    (_set(("totals", "seen"), [1, 2]), "totals['seen']"),
    (_set(("rng", "gates"), -5), "rng['gates'] must be the gates' step"),
]


def resume_tampered(run, original: bytes, tamper, capsys):
    """--resume of ``run`` with its checkpoint.pt (``original``'s bytes) changed by ``tamper``: the exit code,
    stderr, and whether any file of the folder changed."""
    checkpoint = torch.load(io.BytesIO(original), weights_only=True)
    tamper(checkpoint)
    torch.save(checkpoint, run / "checkpoint.pt")
    before = snapshot(run)
    capsys.readouterr()
    code = sdtrain.main(["--resume", str(run), "--quiet"])
    return code, capsys.readouterr().err, snapshot(run) != before


def test_resume_refuses_each_wrongly_typed_restored_value_before_any_work(tmp_path, capsys, monkeypatch, interrupted):
    """Each value a resume restores, of a wrong type or out of range, is refused when checkpoint.pt is read:
    exit 2 naming the file and the value, no traceback, no file of the folder changed, and no step run (the
    optimizer's lr and the scheduler used to fail at the first step or at the end of the first epoch)."""
    run = copy_of(interrupted, tmp_path / "run")
    original = (run / "checkpoint.pt").read_bytes()
    steps = []
    monkeypatch.setattr(sdtrain, "train_one_step", lambda *a, **k: steps.append(1))
    for tamper, expected in WRONG_VALUES:
        code, err, changed = resume_tampered(run, original, tamper, capsys)
        assert code == 2 and f"{run / 'checkpoint.pt'} is damaged: {expected}" in err, (tamper.__name__, err)
        assert "Traceback" not in err and not changed and not steps, tamper.__name__


def test_resuming_a_finished_run_refuses_a_tampered_state(trained_run, tmp_path, capsys):
    """A finished run has no epoch left to run, and its resume used to rewrite summary.json with exit 0 over a
    tampered optimizer, scheduler, totals or gate state: the checkpoint is checked all the same."""
    run = copy_of(trained_run, tmp_path / "run")
    original = (run / "checkpoint.pt").read_bytes()
    for tamper, expected in WRONG_VALUES[2:]:
        code, err, changed = resume_tampered(run, original, tamper, capsys)
        assert code == 2 and expected in err and not changed, (tamper.__name__, err)  # summary.json as it was


# -- a hostile safetensors header ---------------------------------------------------------------------------
def test_a_safetensors_header_beyond_any_zoo_model_is_refused_unparsed(tmp_path):
    """The header's length (its first 8 bytes) is read first and bounded by what the largest zoo model needs;
    then the tensor count. A 60 MB header is refused without reading it, as is one within the size bound that
    lists more tensors than any sdzoo model has; every door reads headers through the same function."""
    import struct

    from sdzoo.files.weights import MAX_BLOCKS, MAX_HEADER_BYTES, MAX_TENSORS, read_header

    huge = tmp_path / "huge.safetensors"
    huge.write_bytes(struct.pack("<Q", 60_000_000) + b"{" + b" " * 1000)  # the rest of the 60 MB never comes
    with pytest.raises(WeightsError, match=r"header is 60,000,000 bytes, more than the .* refused without reading"):
        read_header(huge)
    entries = ",".join(f'"t{i}":{{"dtype":"F32","shape":[0],"data_offsets":[0,0]}}' for i in range(MAX_TENSORS + 1))
    header = ("{" + entries + "}").encode()
    assert len(header) < MAX_HEADER_BYTES
    many = tmp_path / "many.safetensors"
    many.write_bytes(struct.pack("<Q", len(header)) + header)
    with pytest.raises(WeightsError, match=f"holds {MAX_TENSORS + 1:,} tensors, more than the {MAX_TENSORS:,}"):
        read_header(many)
    # the largest model the bounds allow fits: MAX_BLOCKS bottleneck blocks of 18 tensors, stem and head
    assert MAX_TENSORS > MAX_BLOCKS * 18 + 10
    # a run folder with the huge file is refused by the loaders that read it
    folder = folder_of(trained_model(), tmp_path / "run")
    (folder / WEIGHTS_NAME).write_bytes(huge.read_bytes())
    with pytest.raises(WeightsError, match="refused without reading it"):
        timm.create_model(f"local-dir:{folder}", pretrained=True)
    with pytest.raises(ValueError, match="refused without reading it"):
        read_weights_settings(folder / WEIGHTS_NAME)
