"""Fixtures and markers shared by the test files.

``trained_run`` is the one run folder of the trainer that the test modules share; ``cli`` runs a script's
``main`` as its command line would (exit code, stdout, stderr); ``hub_token`` is helpers.TOKEN, a random
token, so that a leak is found by a search for it, not by luck; ``hub_client`` keeps the Hub client off any
real login and off Xet. ``gpu`` tests are skipped where CUDA is not available, so the
suite passes on a CPU-only machine (``.ci/gpu`` runs them where a GPU is); ``network`` marks the tests that may
fetch a package with pip (timm's sdist).

The suite runs on two pytest-xdist workers (``pytest_cmdline_main`` below). Each worker holds one torch thread,
and so does each process a test starts (OMP_NUM_THREADS, unless set), so that two workers share the machine's
cores instead of each spinning up a thread for every core; the workers share one ``trained_run``: the first to
need it trains it.
"""
import os
from collections import namedtuple

import huggingface_hub.constants
import pytest
import torch
from filelock import FileLock

from sdzoo.training import train as sdtrain

from helpers import TOKEN

Result = namedtuple("Result", "code out err")

TRAINED_RUN_ARGS = ["--dataset", "digits", "--model", "sd_resnet20_cifar", "--batch-size", "64", "--epochs", "8",
                    "--device", "cpu", "--quiet", "--threads", "1"]


UNDER_XDIST = "PYTEST_XDIST_WORKER" in os.environ
if UNDER_XDIST:
    torch.set_num_threads(1)
    # and one for each process a test starts (scripts, torchrun ranks), unless the command line's environment
    # says otherwise: a process at one thread a core beside a busy worker runs many times slower
    os.environ.setdefault("OMP_NUM_THREADS", "1")
THREADS = torch.get_num_threads()


@pytest.hookimpl(tryfirst=True)  # before xdist's own hook, which starts the workers that -n asks for
def pytest_cmdline_main(config):
    """``-n 2 --dist worksteal`` unless the command line says otherwise: -n 0 or -p no:xdist runs in one process,
    as --pdb needs. Here and not in addopts: where pytest-xdist is not installed (.ci/gpu uses the machine's own
    Python, which may lack it) an -n in addopts would be an unknown option; here the suite runs in one process.
    worksteal: a worker that runs out of tests takes some of the other's, so one long test leaves no core idle."""
    if (not config.pluginmanager.hasplugin("xdist") or hasattr(config, "workerinput")
            or config.option.numprocesses is not None or config.option.usepdb or config.option.collectonly):
        return
    config.option.numprocesses = 2
    if config.option.dist == "no":
        config.option.dist = "worksteal"


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    no_gpu = pytest.mark.skip(reason="needs a CUDA GPU (run .ci/gpu where one is)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(no_gpu)


@pytest.fixture(autouse=True)
def _torch_threads():
    """Each test starts with the session's torch thread count: the trainer's --threads sets the process's for
    good, and a worker left at 2 threads would contend with the other worker for the 2 cores."""
    torch.set_num_threads(THREADS)
    yield


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory):
    """A finished run folder of the trainer: sd_resnet20_cifar, eight epochs on the digits (about 15 s; about
    85% test accuracy). Tests only read it: each copies what it changes."""
    # Under xdist each worker has its own basetemp; their parent is this session's, which the workers share.
    root = tmp_path_factory.getbasetemp()
    if UNDER_XDIST:
        root = root.parent
    out, done = root / "trained" / "r20", root / "trained.done"
    with FileLock(str(root / "trained.lock")):  # the other worker waits here while the first trains
        if not done.exists():
            assert sdtrain.main([*TRAINED_RUN_ARGS, "--output", str(out)]) == 0
            done.touch()
    return out


@pytest.fixture
def cli(capsys):
    """``cli(main, argv)``: a script's ``main`` run in process as from its command line; its exit code (from
    the return value or a SystemExit, as argparse raises it), stdout and stderr."""
    def run(main, argv):
        capsys.readouterr()
        try:
            code = main(list(map(str, argv)))
        except SystemExit as e:
            code = e.code
        out, err = capsys.readouterr()
        return Result(code, out, err)
    return run


@pytest.fixture(scope="session")
def hub_token():
    return TOKEN


@pytest.fixture
def hub_client(monkeypatch, tmp_path):
    """The Hub client as a user has it, minus Xet (the test server speaks LFS) and minus any real login."""
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_DISABLE_XET", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_TOKEN_PATH", str(tmp_path / "no-stored-token"))
    for var in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_OIDC_RESOURCE"):
        monkeypatch.delenv(var, raising=False)
