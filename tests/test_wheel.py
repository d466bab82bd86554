"""The wheel as users get it: built from the sources, installed (not editable) into a fresh virtual environment,
then its ``sdzoo`` command trains, exports and checks a model, and timm finds the zoo without ``import sdzoo``.

The new environment borrows this interpreter's dependencies (torch, timm, ...) through one plain path line in a
.pth file: site.py adds that folder to sys.path but runs none of the .pth files in it, so the editable sdzoo of
a development install stays out, and the sdzoo that runs is the wheel's."""
import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

from helpers import ROOT

pytestmark = pytest.mark.slow

# What the wheel is built from: the package, its start-up hook, and what the build reads.
SOURCES = ["sdzoo", "_sdzoo_autoload.py", "setup.py", "pyproject.toml", "README.md"]


def build_wheel(tmp: Path) -> Path:
    """The wheel of a copy of the sources (the build writes build/ and *.egg-info beside them)."""
    src, dist = tmp / "src", tmp / "dist"
    for name in SOURCES:
        if (ROOT / name).is_dir():
            shutil.copytree(ROOT / name, src / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            src.mkdir(exist_ok=True)
            shutil.copy2(ROOT / name, src / name)
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
                           "-q", str(src), "-w", str(dist)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    wheels = list(dist.glob("sdzoo-*.whl"))
    assert len(wheels) == 1, wheels
    return wheels[0]


def make_venv(folder: Path) -> Path:
    """A virtual environment of the base interpreter whose dependencies are this interpreter's; its python."""
    subprocess.run([sys._base_executable, "-m", "venv", "--without-pip", str(folder)], check=True, timeout=300)
    python = folder / "bin" / "python"
    site = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    borrowed = dict.fromkeys([sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]])
    Path(site, "deps.pth").write_text("".join(f"{path}\n" for path in borrowed))
    return python


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("wheel")
    wheel = build_wheel(tmp)
    python = make_venv(tmp / "venv")
    proc = subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "--no-index",
                           "-q", str(wheel)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    # no PYTHONPATH (a checkout on it would shadow the wheel), and a working folder outside the checkout
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "SDZOO_DISABLE_AUTOLOAD")}
    env.update(OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    work = tmp / "work"
    work.mkdir()

    def run(*args, timeout=600):
        return subprocess.run([str(a) for a in args], capture_output=True, text=True, env=env, cwd=work,
                              timeout=timeout)

    return dict(wheel=wheel, python=python, bin=python.parent, run=run, work=work)


def test_the_wheel_holds_the_command_the_card_template_and_the_start_up_hook(installed):
    with zipfile.ZipFile(installed["wheel"]) as wheel:
        names = set(wheel.namelist())
        entry_points = next(wheel.read(n).decode() for n in names if n.endswith(".dist-info/entry_points.txt"))
    for name in ("sdzoo/hub/model_card_template.md", "sdzoo-autoload.pth", "_sdzoo_autoload.py",
                 "sdzoo/cli/__init__.py", "sdzoo/__main__.py"):
        assert name in names, name
    assert "[console_scripts]\nsdzoo = sdzoo.cli:main" in entry_points


def test_the_installed_sdzoo_is_the_wheels(installed):
    proc = installed["run"](installed["python"], "-c", "import sdzoo; print(sdzoo.__file__)")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert Path(proc.stdout.strip()).is_relative_to(installed["python"].parent.parent), proc.stdout
    assert (installed["bin"] / "sdzoo").is_file()


def test_timm_finds_the_zoo_without_import_sdzoo(installed):
    code = ("import sys, timm; m = timm.create_model('sd_resnet20_cifar'); "
            "print(type(m).__name__, sys.modules['sdzoo'].__file__)")
    proc = installed["run"](installed["python"], "-c", code)
    assert proc.returncode == 0, proc.stderr[-3000:]
    name, where = proc.stdout.split()
    assert name == "SDResNet" and Path(where).is_relative_to(installed["python"].parent.parent)


def test_the_sdzoo_command_trains_and_exports(installed):
    run, sdzoo = installed["run"], installed["bin"] / "sdzoo"
    proc = run(sdzoo, "--help")
    assert proc.returncode == 0 and proc.stdout.startswith("usage: sdzoo"), proc.stderr[-3000:]
    folder = installed["work"] / "run"
    proc = run(sdzoo, "train", "--dataset", "digits", "--epochs", "1", "--output", folder, "--quiet")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (folder / "model.safetensors").is_file() and (folder / "config.json").is_file()
    onnx = installed["work"] / "model.onnx"
    # the export keeps the file only after onnxruntime agreed with PyTorch (exit 1 and no file otherwise)
    proc = run(sdzoo, "export", "--model", f"local-dir:{folder}", "--output", onnx)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert onnx.is_file() and "onnxruntime" in proc.stdout
    proc = run(sdzoo, "export", "--model", f"local-dir:{folder}", "--output", onnx, "--img-size", "0")
    assert proc.returncode == 2 and "sdzoo export: error: --img-size" in proc.stderr
    proc = run(installed["python"], "-m", "sdzoo", "demo", "--epochs", "0")
    assert proc.returncode == 2 and "--epochs" in proc.stderr
