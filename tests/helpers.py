"""Small helpers shared by the test files."""
import json
import os
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


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
