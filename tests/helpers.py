"""Small helpers shared by the test files."""
import hashlib
import json
import os
import secrets
import subprocess
import sys
from pathlib import Path

import timm
import torch
from timm.models import save_for_hf

from sdzoo.files.run_folder import CONFIG_NAME, WEIGHTS_NAME, save_model_config
from sdzoo.files.weights import save_weights

ROOT = Path(__file__).resolve().parents[1]

# The Hub token of the tests' FakeHub: random, so that a leak is found by a search for it, not by luck.
TOKEN = "hf_sdzoo_test_" + secrets.token_hex(12)
TRAIN_SCRIPT = ROOT / "scripts" / "train.py"
# The trainer's flags for a quick run: the digits, on the CPU, one thread, no progress output.
DIGITS_CPU = ["--dataset", "digits", "--batch-size", "128", "--device", "cpu", "--quiet", "--threads", "1"]
# The stochastic-depth settings of make_run's models.
SURVIVAL = dict(survival_prob=0.7, survival_rule="linear", gate_seed=3)


def run_two_processes(script: Path, *args, timeout: float = 600) -> subprocess.CompletedProcess:
    """``torchrun --standalone --nproc_per_node 2 SCRIPT ARGS`` (gloo on the CPU), one thread a process."""
    return subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script),
         *map(str, args)],
        capture_output=True, text=True, timeout=timeout, env=dict(os.environ, OMP_NUM_THREADS="1"))


def run_distributed_loop(loop: str, cases, steps: int, out: Path) -> dict:
    """tests/distributed_loops.py's ``loop`` ("ddp" or "fsdp2") on two processes; its result per case."""
    proc = run_two_processes(Path(__file__).with_name("distributed_loops.py"), loop, json.dumps(cases), steps, out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(Path(out).read_text())


def randomize_batchnorm(model: torch.nn.Module) -> torch.nn.Module:
    """Non-trivial BatchNorm statistics and affines, so that a lost buffer or a wrong fold shows in the outputs."""
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.normal_(0.0, 0.2)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.normal_(0.0, 0.2)
    return model


def step_compiled_and_eager(compiled: torch.nn.Module, eager: torch.nn.Module, x: torch.Tensor) -> None:
    """One forward and backward of a compiled model and of its eager twin, whose outputs must agree."""
    out = compiled(x)
    out.sum().backward()
    ref = eager(x)
    ref.sum().backward()
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)


def snapshot(folder: Path) -> dict:
    """Every file of a folder and the sha256 of its bytes."""
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


def exit_code(main, argv):
    """A command line's ``main(argv)`` exit code, from its return value or the SystemExit that argparse raises."""
    try:
        return main(argv)
    except SystemExit as e:
        return e.code


def copy_run_folder(folder: Path, to: Path) -> Path:
    """A copy of a run folder's files (not its lock), for a test that changes them."""
    to.mkdir()
    for p in folder.iterdir():
        if p.is_file() and p.name != ".lock":
            (to / p.name).write_bytes(p.read_bytes())
    return to


def random_resnet20(seed=0, **kwargs) -> torch.nn.Module:
    """sd_resnet20_cifar for 10 classes in eval mode, with random BatchNorm statistics (``randomize_batchnorm``)."""
    torch.manual_seed(seed)
    return randomize_batchnorm(timm.create_model("sd_resnet20_cifar", num_classes=10, **kwargs)).eval()


def write_run_folder(model: torch.nn.Module, path: Path) -> Path:
    """A run folder as the trainer writes it: config.json and model.safetensors with its recorded settings."""
    path.mkdir(parents=True)
    save_model_config(path / CONFIG_NAME, model, dict(input_size=(3, 32, 32), mean=(0.5,) * 3, std=(0.25,) * 3))
    save_weights(path / WEIGHTS_NAME, model)
    return path


def edit_config(folder: Path, change) -> None:
    """``change(config)`` applied to the folder's config.json."""
    config = json.loads((folder / CONFIG_NAME).read_text())
    change(config)
    (folder / CONFIG_NAME).write_text(json.dumps(config))


def make_run(path: Path, name="sd_resnet20_cifar.cifar10", seed=0, summary=True, extras=True, **kwargs):
    """A run folder as the training script writes it, with a model whose BatchNorm statistics are not trivial
    (so that lost buffers would show in the outputs) and a summary whose numbers are drawn at random. The
    weights are written by timm's ``save_for_hf``, so they record no survival settings."""
    torch.manual_seed(seed)
    model = randomize_batchnorm(timm.create_model(name, **{**SURVIVAL, **kwargs})).eval()
    save_for_hf(model, path, safe_serialization=True)
    if summary:
        rng = torch.Generator().manual_seed(seed)
        test_error = round(2.0 + 20.0 * torch.rand(1, generator=rng).item(), 3)
        settings = dict(model=name.split(".")[0], dataset="cifar10", epochs=12, batch_size=128, lr=0.1, momentum=0.9,
                        nesterov=True, weight_decay=1e-4, lr_drops=[0.5, 0.75], data_dir="/home/someone/private-data",
                        output=str(path), **SURVIVAL)
        (path / "summary.json").write_text(json.dumps(dict(
            finished=True, epochs_done=12, best_epoch=9, best_val_error=test_error + 0.5, test_error=test_error,
            test_accuracy=100 - test_error, selection="lowest validation error", settings=settings)))
    if extras:
        (path / "metrics.jsonl").write_text(json.dumps(dict(epoch=1, test_error=50.0)) + "\n")
        (path / "curves.png").write_bytes(b"\x89PNG\r\n\x1a\n" + secrets.token_bytes(64))
    return model
