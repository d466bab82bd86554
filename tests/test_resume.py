"""--resume: a checkpoint.pt of something else, of another run or tampered with is refused before any work,
naming the file and the value, and the folder is left byte for byte; a full disk keeps the checkpoint intact;
a resumed run may lower the lr, and an interrupt says what is kept.
"""
import io
import json
import os
import resource
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sdzoo.files.run_folder import CONFIG_NAME, WEIGHTS_NAME
from sdzoo.training import train as sdtrain

from helpers import DIGITS_CPU, ROOT, TRAIN_SCRIPT, copy_run_folder, snapshot


@pytest.fixture(scope="module")
def interrupted(tmp_path_factory):
    """One interrupted run for the tests that only tamper with a copy of it (``copy_run_folder``)."""
    with pytest.MonkeyPatch.context() as mp:
        return interrupted_run(tmp_path_factory.mktemp("interrupted") / "run", mp)


def interrupted_run(out: Path, monkeypatch, extra=()):
    """A two-epoch run stopped (as by Ctrl-C) in epoch 2, after the first checkpoint."""
    evaluate = sdtrain.evaluate

    def stop_in_epoch_2(*args, **kwargs):
        if (out / "checkpoint.pt").exists():
            raise KeyboardInterrupt
        return evaluate(*args, **kwargs)

    with monkeypatch.context() as mp:
        mp.setattr(sdtrain, "evaluate", stop_in_epoch_2)
        code = sdtrain.main([*DIGITS_CPU, "--epochs", "2", "--lr-drops", "--output", str(out), *extra])
    assert code == 130
    return out


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


@pytest.mark.slow
@pytest.mark.timeout(600)  # a training, then its resume in a subprocess (up to 300 s)
def test_a_full_disk_while_resuming_exits_2_with_the_checkpoint_intact(tmp_path, capsys, monkeypatch):
    # a file-size limit stands in for a full disk
    run = interrupted_run(tmp_path / "full", monkeypatch)
    capsys.readouterr()
    before = snapshot(run)
    limit = (run / "checkpoint.pt").stat().st_size // 4

    def limit_file_size():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    proc = subprocess.run([sys.executable, str(TRAIN_SCRIPT), "--resume", str(run), "--quiet"], capture_output=True,
                          text=True, timeout=300, cwd=ROOT, preexec_fn=limit_file_size,
                          env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert proc.returncode == 2, proc.stderr
    assert "cannot write the run folder" in proc.stderr and "Traceback" not in proc.stderr
    after = snapshot(run)
    for name in ("checkpoint.pt", WEIGHTS_NAME, CONFIG_NAME):
        assert after[name] == before[name], name


def test_a_resumed_run_may_lower_the_lr_and_interrupts_say_what_is_kept(tmp_path, capsys, monkeypatch):
    with monkeypatch.context() as mp:
        mp.setattr(sdtrain, "evaluate", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt))
        assert sdtrain.main([*DIGITS_CPU, "--epochs", "1", "--output", str(tmp_path / "early")]) == 130
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


def test_resume_refuses_another_runs_checkpoint_and_touches_nothing(tmp_path, capsys, monkeypatch, interrupted):
    ours = copy_run_folder(interrupted, tmp_path / "ours")
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


def test_tampered_model_or_optimizer_state_is_a_clear_error(tmp_path, capsys, interrupted):
    run = copy_run_folder(interrupted, tmp_path / "run")
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
    (_set(("optimizer", "param_groups", 0, "initial_lr"), [0.1]), "the optimizer state's setting 'initial_lr'"),
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
    run = copy_run_folder(interrupted, tmp_path / "run")
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
    run = copy_run_folder(trained_run, tmp_path / "run")
    original = (run / "checkpoint.pt").read_bytes()
    for tamper, expected in WRONG_VALUES[2:]:
        code, err, changed = resume_tampered(run, original, tamper, capsys)
        assert code == 2 and expected in err and not changed, (tamper.__name__, err)  # summary.json as it was
