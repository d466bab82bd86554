"""Fashion-MNIST: its idx files (gzipped and raw, in --data-dir and torchvision's layout, and the refusals of bad
ones), the .fashion_mnist cfg tag, short real training runs with and without stochastic depth, their export with
int8 calibration on its own images, and the comparison command (results, table, figure, resume after a kill).

The tests of the file format write small idx files themselves; those that need the real data set read the Debian
package's files and are skipped, naming the package, where it is not installed.
"""
import dataclasses
import gzip
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from sdzoo.training.data import FASHION_MNIST_FILES, DataError, load_data, read_fashion_mnist
from sdzoo.datasets import DATASETS

import sdzoo.cli.export
from helpers import ROOT

SPEC = DATASETS["fashion_mnist"]
HAVE_REAL_DATA = all(os.path.isfile(os.path.join(SPEC.system_dir, name + ".gz"))
                     for pair in FASHION_MNIST_FILES.values() for name in pair)
needs_real_data = pytest.mark.skipif(
    not HAVE_REAL_DATA, reason=f"needs Fashion-MNIST: apt-get install {SPEC.system_package}")


def write_idx(path: Path, array: np.ndarray, gz: bool = False, magic: int = None) -> Path:
    """``array`` (uint8) as an idx file; ``.gz`` appended and gzipped with ``gz``."""
    magic = (0x08 << 8 | array.ndim) if magic is None else magic
    data = magic.to_bytes(4, "big") + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    data += np.ascontiguousarray(array, dtype=np.uint8).tobytes()
    path = Path(str(path) + (".gz" if gz else ""))
    path.parent.mkdir(parents=True, exist_ok=True)
    with (gzip.open if gz else open)(path, "wb") as f:
        f.write(data)
    return path


def write_fashion_files(folder: Path, splits, gz: bool = False) -> None:
    """The four idx files of ``splits`` ({'train': (images, labels), 'test': ...}) in ``folder``."""
    for split, (images, labels) in splits.items():
        image_name, label_name = FASHION_MNIST_FILES[split]
        write_idx(folder / image_name, images, gz)
        write_idx(folder / label_name, labels, gz)


def fake_splits(train: int = 40, test: int = 12, seed: int = 0):
    """Random 28x28 images whose label is drawn into them (a bright band at a row set by the class)."""
    rng = np.random.default_rng(seed)

    def split(n):
        labels = rng.integers(0, 10, n).astype(np.uint8)
        images = rng.integers(0, 60, (n, 28, 28)).astype(np.uint8)
        for image, label in zip(images, labels):
            image[2 * label:2 * label + 6] += 150
        return images, labels
    return {"train": split(train), "test": split(test)}


# -- the idx files -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("gz", [True, False], ids=["gzipped", "raw"])
@pytest.mark.parametrize("layout", ["data-dir", "torchvision"])
def test_idx_files_load_gzipped_or_raw_in_both_layouts(tmp_path, gz, layout):
    splits = fake_splits()
    write_fashion_files(tmp_path / "FashionMNIST" / "raw" if layout == "torchvision" else tmp_path, splits, gz)
    data = load_data("fashion_mnist", str(tmp_path), val_size=10, split_seed=1, shift=4, hflip=True)
    train_images, train_labels = splits["train"]
    assert (len(data.train), len(data.val.labels), len(data.test.labels)) == (30, 10, 12)
    assert data.train.images.shape == (30, 1, 28, 28) and data.train.images.dtype == torch.uint8
    assert torch.equal(data.test.images[:, 0], torch.from_numpy(splits["test"][0]))
    assert torch.equal(data.test.labels, torch.from_numpy(splits["test"][1]).long())
    # train and validation together are the training files' images, each once
    both = torch.cat([data.train.images, data.val.images])[:, 0].flatten(1)
    expected = torch.from_numpy(train_images).flatten(1)
    assert torch.equal(torch.unique(both, dim=0), torch.unique(expected, dim=0))
    assert data.in_chans == 1 and data.classes[0] == "T-shirt/top" and data.num_classes == 10
    assert data.data_config()["input_size"] == (1, 28, 28)
    assert (data.data_config()["mean"], data.data_config()["std"]) == (SPEC.mean, SPEC.std)
    again = load_data("fashion_mnist", str(tmp_path), val_size=10, split_seed=1)
    assert torch.equal(again.val.labels, data.val.labels)  # a fixed split


def _bad_files(case: str, folder: Path) -> str:
    """Write the four files with one fault; returns the name of the file the error must name."""
    splits = fake_splits()
    write_fashion_files(folder, splits)
    images, labels = FASHION_MNIST_FILES["train"]
    if case == "magic":  # a labels file where the images should be
        write_idx(folder / images, splits["train"][0], magic=0x00000801)
        return images
    if case == "truncated":
        data = (folder / images).read_bytes()
        (folder / images).write_bytes(data[:-100])
        return images
    if case == "truncated-gzip":
        os.remove(folder / labels)
        data = write_idx(folder / labels, splits["train"][1], gz=True).read_bytes()
        (folder / (labels + ".gz")).write_bytes(data[:len(data) // 2])
        return labels + ".gz"
    if case == "count":
        write_idx(folder / labels, splits["train"][1][:-1])
        return labels
    if case == "missing":
        os.remove(folder / labels)
        return labels
    raise AssertionError(case)


@pytest.mark.parametrize("case", ["magic", "truncated", "truncated-gzip", "count", "missing"])
def test_bad_idx_files_are_refused_naming_the_file(tmp_path, case):
    name = _bad_files(case, tmp_path)
    with pytest.raises(DataError) as err:
        load_data("fashion_mnist", str(tmp_path), val_size=10)
    assert name in str(err.value)
    if case == "magic":
        assert "magic number 0x00000803" in str(err.value)


def test_missing_files_say_where_they_were_looked_for_and_how_to_get_them(tmp_path, monkeypatch):
    monkeypatch.setitem(DATASETS, "fashion_mnist", dataclasses.replace(SPEC, system_dir=str(tmp_path / "system")))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    for data_dir, places in ((str(tmp_path / "mine"), ["mine", "mine/FashionMNIST/raw"]),
                             (None, ["home/data", "home/data/FashionMNIST/raw", "system"])):
        with pytest.raises(DataError) as err:
            load_data("fashion_mnist", data_dir, val_size=10)
        message = str(err.value)
        for place in places:
            assert str(tmp_path / place) in message
        assert f"apt-get install {SPEC.system_package}" in message and "FashionMNIST(ROOT, download=True)" in message
    # a --data-dir is where the files must be: the system folder is read only without one
    write_fashion_files(tmp_path / "system", fake_splits(), gz=True)
    assert len(load_data("fashion_mnist", None, val_size=10)) == 30
    with pytest.raises(DataError):
        load_data("fashion_mnist", str(tmp_path / "mine"), val_size=10)


def test_the_trainer_refuses_bad_files_with_exit_2_naming_the_file(tmp_path, cli):
    from sdzoo.training.train import main

    name = _bad_files("truncated", tmp_path / "data")
    result = cli(main, ["--dataset", "fashion_mnist", "--data-dir", tmp_path / "data", "--output", tmp_path / "run",
                        "--device", "cpu", "--quiet"])
    assert result.code == 2 and name in result.err and "Traceback" not in result.err


def test_cfg_tag_describes_the_preprocessing_and_claims_no_weights():
    import timm
    from timm.data import resolve_data_config

    from sdzoo.files.pretrained import NoPretrainedWeightsError

    model = timm.create_model("sd_resnet20_cifar.fashion_mnist")
    config = resolve_data_config({}, model=model)
    assert model.in_chans == 1 and model.conv1.in_channels == 1
    assert config["input_size"] == (1, 28, 28) and config["mean"] == SPEC.mean and config["std"] == SPEC.std
    assert model(torch.zeros(2, 1, 28, 28)).shape == (2, 10)
    assert timm.get_pretrained_cfg("sd_resnet20_cifar.fashion_mnist").pool_size == (7, 7)
    with pytest.raises(NoPretrainedWeightsError):
        timm.create_model("sd_resnet20_cifar.fashion_mnist", pretrained=True)


@needs_real_data
def test_real_files_have_the_registry_statistics_and_the_recipe_splits():
    from sdzoo.training.recipes import RECIPES

    data = load_data("fashion_mnist", SPEC.system_dir, val_size=RECIPES["fashion_mnist"].val_size)
    sizes = {"train": len(data.train), "val": len(data.val.labels), "test": len(data.test.labels)}
    assert sizes == SPEC.split_sizes
    # the statistics of all 60,000 training images, from the histogram of their grey levels
    images = torch.cat([data.train.images, data.val.images])
    counts = torch.bincount(images.flatten(), minlength=256).double()
    levels = torch.arange(256, dtype=torch.float64) / 255
    mean = (counts * levels).sum() / counts.sum()
    std = ((counts * (levels - mean) ** 2).sum() / (counts.sum() - 1)).sqrt()
    assert (mean.item(), std.item()) == (pytest.approx(SPEC.mean[0], abs=1e-4), pytest.approx(SPEC.std[0], abs=1e-4))
    labels = torch.cat([data.train.labels, data.val.labels])
    assert torch.equal(torch.bincount(labels), torch.full((10,), 6000))


# -- short real training runs ----------------------------------------------------------------------------------
# Both settings train at once (the comparison's two processes), seed 0, on a fixed subset: the first 640 training
# images (64 of them held out), 4 epochs of batch 32 (72 steps, lr / 10 after epochs 2 and 3), evaluated once,
# after the last step, on all 10,000 test images. Measured: test accuracy 46.61% with stochastic depth and 56.44%
# at constant depth (chance is 10%; so few steps leave BatchNorm's running statistics behind the weights, most of
# all where blocks are skipped); the floors leave a margin for other machines' arithmetic.
REAL_RUN_ARGS = ["--seeds", "0", "--dataset", "fashion_mnist", "--val-size", "64", "--epochs", "4",
                 "--batch-size", "32", "--eval-every-steps", "100000", "--record-gates"]
SUBSET = 640
ACCURACY_FLOOR = {"stochastic_depth": 35.0, "constant_depth": 45.0}


@pytest.fixture(scope="module")
def real_runs(tmp_path_factory):
    from sdzoo.training import compare

    root = tmp_path_factory.mktemp("fmnist")
    train = read_fashion_mnist(SPEC.system_dir, "train")
    test = read_fashion_mnist(SPEC.system_dir, "test")
    write_fashion_files(root / "data", {"train": (train.images[:SUBSET, 0].numpy(), train.labels[:SUBSET].numpy()),
                                        "test": (test.images[:, 0].numpy(), test.labels.numpy())})
    code = compare.main(["--output", str(root / "compare"), "--data-dir", str(root / "data"), *REAL_RUN_ARGS])
    assert code == 0
    return json.loads((root / "compare" / compare.RESULTS_NAME).read_text()), root


@needs_real_data
@pytest.mark.slow
@pytest.mark.timeout(900)  # the first user of real_runs: two trainings on Fashion-MNIST
def test_short_real_runs_learn_and_skip_blocks_as_scheduled(real_runs):
    import timm
    from torch.utils.flop_counter import FlopCounterMode

    results, _ = real_runs
    runs = {run["setting"]: run for run in results["runs"]}
    for setting, run in runs.items():
        accuracy = 100 - run["test_error"]
        print(f"{setting}: test accuracy {accuracy:.2f}% on 10,000 images")
        assert run["finished"] and accuracy > ACCURACY_FLOOR[setting], (setting, accuracy)
    summary = json.loads((Path(runs["stochastic_depth"]["folder"]) / "summary.json").read_text())
    assert summary["test_set"] == "test"
    # The executed FLOPs of the stochastic-depth run, from the gates it drew, against its schedule's expectation:
    # each block's forward FLOPs counted at 28x28, weighted by the fraction of steps it ran.
    model = timm.create_model("sd_resnet20_cifar.fashion_mnist").eval()
    with FlopCounterMode(display=False) as counter:
        model(torch.zeros(1, 1, 28, 28))
    by_module = counter.get_flop_counts()
    names = {id(module): name for name, module in model.named_modules()}
    block_flops = np.array([sum(by_module[f"SDResNet.{names[id(block)]}"].values())
                            for block in model.residual_blocks()], dtype=np.float64)
    total = counter.get_total_flops()
    gates = np.array([[int(g) for g in line.split()[1:]] for line in
                      (Path(runs["stochastic_depth"]["folder"]) / "gates_rank0.txt").read_text().splitlines()])
    assert len(gates) == 72 and gates.shape[1] == 9
    executed = (total - block_flops @ (1 - gates.mean(0))) / total
    scheduled = (total - block_flops @ (1 - np.array(model.block_survival_probs()))) / total
    print(f"executed FLOPs {executed:.3f} of constant depth's; the schedule's {scheduled:.3f}")
    assert scheduled == pytest.approx(0.73, abs=0.02)  # linear decay to p_L = 0.5 over 9 blocks
    assert executed == pytest.approx(scheduled, abs=0.05)
    assert runs["constant_depth"]["mean_depth"] == 9.0


@needs_real_data
@pytest.mark.slow
@pytest.mark.timeout(900)  # the first user of real_runs: two trainings on Fashion-MNIST
def test_fashion_mnist_run_exports_with_int8_calibrated_on_its_own_images(real_runs, tmp_path, capsys):
    from sdzoo.export.calibration import calibration_images
    from sdzoo.export.onnx_export import predict_onnx

    results, _ = real_runs
    folder = next(run["folder"] for run in results["runs"] if run["setting"] == "stochastic_depth")
    output = tmp_path / "fmnist.onnx"
    export = sdzoo.cli.export
    code = export.main(["--model", f"local-dir:{folder}", "--output", str(output), "--quantize", "int8",
                        "--calib-images", "64"])
    text = capsys.readouterr().out
    assert code == 0, text
    assert "calibrated on 64 images" in text and "top-1 agreement with fp32 on 10000 held-out images" in text
    meta = {p.key: p.value for p in __import__("onnx").load(str(output), load_external_data=False).metadata_props}
    assert json.loads(meta["input_size"]) == [1, 28, 28]
    # PyTorch's accuracy on the 10,000 test images is the run's own, measured as it trained
    run = next(run for run in results["runs"] if run["setting"] == "stochastic_depth")
    torch_accuracy = 100 - run["test_error"]
    images, labels = calibration_images("fashion_mnist", [1, 28, 28], SPEC.mean, SPEC.std, split="test")
    ort_accuracy = 100 * (predict_onnx(output, images).argmax(1) == labels).mean()
    print(f"test accuracy: PyTorch {torch_accuracy:.2f}%, onnxruntime {ort_accuracy:.2f}%")
    assert ort_accuracy == pytest.approx(torch_accuracy, abs=0.011)  # at most one of 10,000 borderline images


# -- the comparison --------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_compare_writes_results_table_and_figure_and_resumes_after_a_kill(tmp_path, cli):
    from sdzoo.training import compare

    write_fashion_files(tmp_path / "data", fake_splits(train=96, test=32), gz=True)
    output = tmp_path / "compare"
    args = ["--output", output, "--seeds", "3", "--dataset", "fashion_mnist", "--data-dir", tmp_path / "data",
            "--val-size", "32", "--epochs", "2", "--batch-size", "16", "--checkpoint-every-steps", "1"]
    # one run at a time (one trainer starts before the kill), then both at once
    process = subprocess.Popen([sys.executable, str(ROOT / "scripts" / "compare.py"), *map(str, args), "--jobs", "1"],
                               start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not list(output.glob("*/checkpoint.pt")) and time.monotonic() < deadline:
        time.sleep(0.02)
    os.killpg(process.pid, signal.SIGKILL)  # the comparison and its trainers, at once
    process.wait()
    summaries = [output / f"{setting}-seed3" / "summary.json" for setting in compare.SETTINGS]
    assert not all(p.exists() and json.loads(p.read_text())["finished"] for p in summaries)  # it was cut short

    result = cli(compare.main, args)
    assert result.code == 0, result.err
    assert "continued" in result.out
    results = json.loads((output / compare.RESULTS_NAME).read_text())
    assert [(r["setting"], r["seed"], r["finished"], r["epochs"]) for r in results["runs"]] == [
        ("constant_depth", 3, True, 2), ("stochastic_depth", 3, True, 2)]
    for run in results["runs"]:
        lines = (Path(run["folder"]) / "metrics.jsonl").read_text().splitlines()
        epochs = [json.loads(line)["epoch"] for line in lines]
        assert epochs == [1, 2]  # each epoch recorded once, the resumed one too
        assert len(run["test_error_curve"]) == 2 and run["first_stage_grad_curve"][0][1] > 0
    assert results["time_ratio"] > 0 and results["paper"]["stochastic_depth"]["test_error"] == 5.25
    table = (output / compare.TABLE_NAME).read_text()
    assert "| stochastic depth |" in table and "| constant depth |" in table and "5.25" in table
    assert (output / compare.FIGURE_NAME).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # again: every run is done, nothing trains, the same results
    again = cli(compare.main, args)
    assert again.code == 0 and "(2 done)" in again.out and "started" not in again.out
    # a folder of a run of other settings is refused
    other = cli(compare.main, [*args[:-6], "--epochs", "3", *args[-4:]])
    assert other.code == 2 and "other settings" in other.err and "epochs" in other.err


def test_compare_refuses_the_flags_it_sets_itself(tmp_path, cli):
    from sdzoo.training import compare

    for flag in ("--gate-mode", "--seed", "--resume", "--quiet"):
        result = cli(compare.main, ["--output", tmp_path, "--dataset", "fashion_mnist", flag, "1"])
        assert result.code == 2 and flag in result.err and "set by the comparison" in result.err
    result = cli(compare.main, ["--output", tmp_path, "--dataset", "no_such_data"])
    assert result.code == 2 and "--dataset" in result.err


def test_a_run_without_a_data_dir_is_measured_on_the_system_packages_files(tmp_path, monkeypatch):
    """The depth sweep and the pruned export read a run's data set as the run did: a run that named no
    --data-dir (summary.json's data_dir null) read the package's folder, and so do they."""
    from sdzoo.export.depth import run_splits

    monkeypatch.setitem(DATASETS, "fashion_mnist", dataclasses.replace(SPEC, system_dir=str(tmp_path / "system")))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    write_fashion_files(tmp_path / "system", fake_splits(), gz=True)
    settings = {"dataset": "fashion_mnist", "data_dir": None, "val_size": 10, "split_seed": 1, "image_size": 28}
    splits = run_splits(settings, SPEC.mean, SPEC.std)
    assert {k: len(v[1]) for k, v in splits.items()} == {"train": 30, "val": 10, "test": 12}
