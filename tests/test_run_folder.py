"""The run folder and the files a command writes: a new run never writes beside another run's files, two
processes never write one folder, fresh folders are made atomically, and a writer killed mid-write leaves no
temporary behind while a live writer's stays.
"""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import sdzoo.cli.demo
from sdzoo.files.disk import remove_abandoned_temporaries, staged_file
from sdzoo.files.run_folder import CONFIG_NAME, WEIGHTS_NAME
from sdzoo.files.weights import read_weights_settings
from sdzoo.training import train as sdtrain

from helpers import DIGITS_CPU, ROOT, TRAIN_SCRIPT, random_resnet20, snapshot, write_run_folder


def test_a_new_run_never_writes_beside_another_runs_config(trained_run, tmp_path, capsys):
    # config.json and the weights are written together, from the same model.
    config = json.loads((trained_run / CONFIG_NAME).read_text())
    recorded = read_weights_settings(trained_run / WEIGHTS_NAME)
    assert {k: config["model_args"][k] for k in recorded["model_args"]} == recorded["model_args"]

    folder = tmp_path / "reused"
    folder.mkdir()
    (folder / CONFIG_NAME).write_bytes((trained_run / CONFIG_NAME).read_bytes())  # p_L = 0.5, no checkpoint
    before = snapshot(folder)
    code = sdtrain.main([*DIGITS_CPU, "--epochs", "1", "--survival-prob", "1.0", "--output", str(folder)])
    assert code == 2
    assert "holds another run's files (config.json)" in capsys.readouterr().err
    assert snapshot(folder) == before


@pytest.mark.slow
@pytest.mark.timeout(900)  # two trainings in subprocesses (up to 300 s each)
def test_two_processes_on_one_output_one_is_refused(tmp_path):
    out = tmp_path / "shared"
    cmd = [sys.executable, str(TRAIN_SCRIPT), *DIGITS_CPU, "--epochs", "3", "--output", str(out)]
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


def test_temporaries_of_a_live_writer_stay_and_a_killed_ones_go(tmp_path):
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
@pytest.mark.timeout(900)  # two exports in subprocesses (up to 240 and 300 s)
def test_a_sigkill_during_int8_quantization_leaves_no_hidden_file(tmp_path):
    folder = write_run_folder(random_resnet20(), tmp_path / "run")
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


def test_a_run_refused_before_it_wrote_anything_leaves_no_folder_behind(tmp_path, capsys):
    refused = ["--dataset", "cifar10", "--data-dir", str(tmp_path / "no-data"), "--no-download"]
    assert sdtrain.main([*refused, "--output", str(tmp_path / "new")]) == 2
    assert "CIFAR-10 not found" in capsys.readouterr().err
    assert not (tmp_path / "new").exists()  # it made the folder, and took it away with its lock
    (tmp_path / "mine").mkdir()  # a folder the user made stays, empty as it was
    assert sdtrain.main([*refused, "--output", str(tmp_path / "mine")]) == 2
    assert (tmp_path / "mine").is_dir() and list((tmp_path / "mine").iterdir()) == []
