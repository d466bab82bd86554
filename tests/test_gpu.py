"""The paths a GPU user takes: CUDA, channels_last, Inductor, bf16 autocast and the trainer on ``--device cuda``.

Every test here is marked ``gpu`` and is skipped where CUDA is not available (tests/conftest.py), so the suite
passes on a CPU-only machine. ``.ci/gpu`` runs them on a machine with a GPU.
"""
import copy
import os
import subprocess
import sys

import pytest
import timm
import torch

import sdzoo

from helpers import ROOT

pytestmark = pytest.mark.gpu

CUDA = torch.device("cuda")


def zoo_model(gate_mode, **kwargs):
    torch.manual_seed(0)
    return timm.create_model("sd_resnet20_cifar", survival_prob=0.5, gate_mode=gate_mode, **kwargs)


@pytest.mark.parametrize("gate_mode", ["batch", "sample"])
def test_channels_last_survives_every_block_forward_and_backward(gate_mode):
    model = zoo_model(gate_mode).to(CUDA, memory_format=torch.channels_last).train()
    layouts = []
    hooks = [block.register_forward_hook(
        lambda m, a, out: layouts.append(out.is_contiguous(memory_format=torch.channels_last)))
        for block in model.modules() if isinstance(block, sdzoo.gate.ResidualGate)]
    x = torch.randn(64, 3, 32, 32, device=CUDA).contiguous(memory_format=torch.channels_last)
    model(x).sum().backward()
    for h in hooks:
        h.remove()
    assert layouts and all(layouts), f"{layouts.count(False)} of {len(layouts)} blocks left channels_last"
    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d) and m.weight.grad is not None]
    assert convs and all(torch.isfinite(m.weight.grad).all() for m in convs)


@pytest.mark.parametrize("gate_mode", ["batch", "sample"])
def test_inductor_at_channels_last_matches_eager_without_recompiles(gate_mode):
    from torch._dynamo.testing import CompileCounterWithBackend
    torch._dynamo.reset()
    model = zoo_model(gate_mode).to(CUDA, memory_format=torch.channels_last).train()
    eager = copy.deepcopy(model)
    counter = CompileCounterWithBackend("inductor")
    compiled = torch.compile(model, backend=counter)
    frames = []
    for _ in range(4):
        x = torch.randn(32, 3, 32, 32, device=CUDA).contiguous(memory_format=torch.channels_last)
        out, ref = compiled(x), eager(x)
        out.sum().backward()
        ref.sum().backward()
        torch.testing.assert_close(out, ref, rtol=2e-3, atol=2e-3)
        frames.append(counter.frame_count)
    assert model.gate_sampler.step == eager.gate_sampler.step == 4
    assert frames[-1] == frames[0], f"recompiled during training: frame counts {frames}"


def test_a_converted_timm_model_trains_under_bf16_autocast_and_inductor():
    torch.manual_seed(0)
    model = sdzoo.convert_drop_path(timm.create_model("vit_tiny_patch16_224", img_size=32, depth=4, num_classes=10,
                                                      drop_path_rate=0.3), mode="batch", seed=0).to(CUDA).train()
    compiled = torch.compile(model, fullgraph=True)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    for _ in range(3):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = compiled(torch.randn(16, 3, 32, 32, device=CUDA)).float().logsumexp(-1).mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        assert torch.isfinite(loss)
    assert all(torch.isfinite(p).all() for p in model.parameters())


@pytest.mark.timeout(900)  # the trainer in a subprocess (up to 600 s)
def test_the_trainer_runs_an_epoch_on_the_gpu(tmp_path):
    out = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "train.py"), "--dataset", "digits", "--model", "sd_resnet20_cifar",
         "--epochs", "1", "--batch-size", "128", "--device", "cuda", "--quiet", "--output", str(out)],
        capture_output=True, text=True, timeout=600, cwd=ROOT, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert (out / "model.safetensors").is_file() and (out / "summary.json").is_file()
