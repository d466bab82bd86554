"""convert_drop_path: a real skip for timm's ResNet, ConvNeXt and ViT built with drop_path_rate; drop-rate warmup.

FLOPs and gradients are counted on the meta device: torch.utils.flop_counter counts from shapes, and the
gates are drawn for real (on the CPU, from the model's generator), so a step costs no compute.
"""
import copy
import json
import math
import textwrap

import pytest
import torch
import timm
from timm.layers import DropPath
from torch.utils.flop_counter import FlopCounterMode

import sdzoo
from sdzoo.convert import DropPathGate
from sdzoo.gate import kept_per_sample_count, set_drop_rate_factor
from sdzoo.survival import drop_warmup_factor

from helpers import randomize_batchnorm, run_two_processes, step_compiled_and_eager

MODELS = ["resnet26", "convnext_atto", "vit_tiny_patch16_224"]
MODES = ["sample", "batch"]
SIZE = 32


def build(name, rate=0.4, device=None, **kwargs):
    size = dict(img_size=SIZE) if name.startswith("vit_") else {}
    return timm.create_model(name, drop_path_rate=rate, num_classes=10, device=device, **size, **kwargs)


def gates_of(model):
    return [(n, m) for n, m in model.named_modules() if isinstance(m, DropPathGate)]


# -- eval outputs and the training forward ---------------------------------------------------------------
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", MODELS)
def test_eval_outputs_equal_and_open_gates_are_timms_forward(name, mode):
    torch.manual_seed(0)
    reference = randomize_batchnorm(build(name)).eval()
    converted = sdzoo.convert_drop_path(copy.deepcopy(reference), mode=mode, min_drop_rate=0.0)
    assert list(converted.state_dict()) == list(reference.state_dict())
    x = torch.randn(3, 3, SIZE, SIZE)
    with torch.no_grad():
        assert torch.equal(converted(x), reference(x))
        # Training with every gate open (warmup factor 0) is timm's network without drop path.
        plain = build(name, rate=0.0).train()
        plain.load_state_dict(reference.state_dict())
        set_drop_rate_factor(converted.train(), 0.0)
        torch.testing.assert_close(converted(x), plain(x), rtol=1e-5, atol=1e-5)


def test_each_branch_keeps_timms_rate_and_vit_gates_attention_and_mlp_apart():
    reference = build("vit_tiny_patch16_224", device="meta")
    rates = {n: m.drop_prob for n, m in reference.named_modules() if isinstance(m, DropPath)}
    converted = sdzoo.convert_drop_path(reference, min_drop_rate=0.0)
    gates = dict(gates_of(converted))
    assert {n: g.drop_prob for n, g in gates.items()} == pytest.approx(rates)
    assert "blocks.5.drop_path1" in gates and "blocks.5.drop_path2" in gates
    assert gates["blocks.5.drop_path1"].index != gates["blocks.5.drop_path2"].index
    assert len(converted.drop_path_sampler.survival_probs) == len(rates) == 22  # blocks.0 has rate 0


# -- executed FLOPs ------------------------------------------------------------------------------------------
def branch_flops(reference, counts, forward_counts):
    """Training FLOPs of each DropPath'd branch of the unconverted model (forward and backward), by the
    slot's name: a ResNet / ConvNeXt block less its shortcut, a ViT block's attention or MLP.

    The counter attributes backward FLOPs to modules by the modules it sees active, which is exact for a
    block as a whole and for a ViT block's attention and MLP (in sequence), but not between a branch and a
    parallel projection shortcut. So a shortcut's training FLOPs are taken as 3x its forward FLOPs (a
    conv's forward, input gradient and weight gradient are the same count; the block input needs a
    gradient).
    """
    root = type(reference).__name__
    total = {name: sum(ops.values()) for name, ops in counts.items()}
    forward = {name: sum(ops.values()) for name, ops in forward_counts.items()}
    flops = {}
    for name, module in reference.named_modules():
        if not isinstance(module, DropPath):
            continue
        block, slot = name.rsplit(".", 1)
        key = f"{root}.{block}"
        if slot == "drop_path1":
            flops[name] = total[f"{key}.attn"]
        elif slot == "drop_path2":
            flops[name] = total[f"{key}.mlp"]
        else:
            flops[name] = total[key] - 3 * (forward.get(f"{key}.downsample", 0) + forward.get(f"{key}.shortcut", 0))
    return flops


def training_flops(model, x):
    with FlopCounterMode(display=False) as counter:
        model(x).sum().backward()
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops(), counter.get_flop_counts()


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", MODELS)
def test_executed_flops_fall_as_the_rates_predict(name, mode):
    batch = 8
    reference = build(name, device="meta").train()
    x = torch.randn(batch, 3, SIZE, SIZE, device="meta")
    mask_flops, counts = training_flops(reference, x)
    with FlopCounterMode(display=False) as forward_counter, torch.no_grad():
        reference(x)
    per_branch = branch_flops(reference, counts, forward_counter.get_flop_counts())
    converted = sdzoo.convert_drop_path(reference, mode=mode, seed=3, min_drop_rate=0.0)
    keep = {n: g.survival_prob for n, g in gates_of(converted)}
    assert set(keep) == set(per_branch)
    if mode == "sample":
        # Deterministic: branch b runs on k_b = round(p_b B) of the B samples, and its FLOPs are linear in
        # the samples it runs on, so the prediction is exact (up to float sums of the counts).
        steps = 2
        predicted = mask_flops - sum((1 - kept_per_sample_count(keep[n], batch) / batch) * f
                                     for n, f in per_branch.items())
        tolerance = 1e-6 * mask_flops
    else:
        # Random: each branch runs with probability p_b. Over N steps the mean has standard deviation
        # sqrt(sum p_b (1 - p_b) F_b^2 / N); 4 of them is a false failure once in ~16,000 runs.
        steps = 30
        predicted = mask_flops - sum((1 - keep[n]) * f for n, f in per_branch.items())
        tolerance = 4 * math.sqrt(sum(keep[n] * (1 - keep[n]) * f ** 2 for n, f in per_branch.items()) / steps)
    measured = sum(training_flops(converted, x)[0] for _ in range(steps)) / steps
    assert measured < mask_flops
    assert abs(measured - predicted) <= tolerance, (measured / mask_flops, predicted / mask_flops)
    # the saving is real: at drop_path_rate 0.4 these models drop a sizeable share of their compute
    assert predicted / mask_flops < 0.95


# -- gradients -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", MODELS)
def test_every_parameter_gets_a_gradient(name, mode):
    model = sdzoo.convert_drop_path(build(name, device="meta").train(), mode=mode, min_drop_rate=0.0)
    x = torch.randn(4, 3, SIZE, SIZE, device="meta")
    skipped = False
    for _ in range(8):  # until a step skips a whole branch (batch) or drops samples (sample: every step)
        model(x).sum().backward()
        missing = [n for n, p in model.named_parameters() if p.grad is None]
        assert not missing, f"no gradient for {missing[:5]}"
        gates = model.drop_path_sampler.gates
        skipped = any(g.numel() < 4 for g in gates) if mode == "sample" else any(float(g) == 0 for g in gates)
        model.zero_grad(set_to_none=True)
        if skipped:
            break
    assert skipped, "no branch was dropped: the test did not test the skip"


def test_gates_are_seeded():
    def draws(seed):
        model = sdzoo.convert_drop_path(build("resnet26", device="meta").train(), mode="batch", seed=seed)
        x = torch.randn(2, 3, SIZE, SIZE, device="meta")
        out = []
        for _ in range(6):
            with torch.no_grad():
                model(x)
            out.append(torch.stack(model.drop_path_sampler.gates))
        return torch.stack(out)
    assert torch.equal(draws(5), draws(5))
    assert not torch.equal(draws(5), draws(6))


# -- errors -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("model,match", [
    (lambda: timm.create_model("resnet18", device="meta"), "nothing to convert"),
    (lambda: timm.create_model("efficientnet_b0", drop_path_rate=0.2, device="meta"), "no adapter"),
])
def test_unsupported_models_are_refused_with_what_is_supported(model, match):
    with pytest.raises(ValueError, match=match) as error:
        sdzoo.convert_drop_path(model())
    assert "ResNet" in str(error.value) and "ConvNeXt" in str(error.value) and "ViT" in str(error.value)


@pytest.mark.parametrize("kwargs,match", [
    (dict(mode="row"), "mode must be one of 'sample', 'batch'"),
    (dict(min_drop_rate=1.5), "min_drop_rate"),
    (dict(seed=-1), "seed"),
])
def test_bad_arguments_name_themselves(kwargs, match):
    with pytest.raises(ValueError, match=match):
        sdzoo.convert_drop_path(build("resnet26", device="meta"), **kwargs)


def test_branches_below_the_break_even_stay_timms_mask():
    model = sdzoo.convert_drop_path(build("vit_tiny_patch16_224", device="meta"), min_drop_rate=0.1)
    for name, module in model.named_modules():
        if isinstance(module, (DropPath, DropPathGate)):
            assert isinstance(module, DropPathGate) == (module.drop_prob >= 0.1), name
    masks = [m for m in model.modules() if isinstance(m, DropPath)]
    targets = [m.drop_prob for m in masks]
    assert masks and set_drop_rate_factor(model, 0.5) == 1  # the warmup ramps the masks too
    assert [m.drop_prob for m in masks] == pytest.approx([0.5 * t for t in targets])


# -- warmup ----------------------------------------------------------------------------------------------
def test_warmup_ramp_sets_the_rates_in_effect():
    total, fraction = 100, 0.2
    assert [drop_warmup_factor(s, total, fraction) for s in (0, 5, 10, 20, 50)] == [0.0, 0.25, 0.5, 1.0, 1.0]
    assert drop_warmup_factor(0, total, 0.0) == 1.0
    with pytest.raises(ValueError, match="warmup_fraction"):
        drop_warmup_factor(0, total, 1.5)
    model = sdzoo.convert_drop_path(build("resnet26", device="meta").train(), mode="sample", min_drop_rate=0)
    zoo = timm.create_model("sd_resnet20_cifar", device="meta").train()
    targets = [1 - p for p in model.drop_path_sampler.survival_probs]
    x = torch.randn(16, 3, SIZE, SIZE, device="meta")
    for step in (0, 5, 10, 20, 50):
        factor = drop_warmup_factor(step, total, fraction)
        assert set_drop_rate_factor(model, factor) == 1 and set_drop_rate_factor(zoo, factor) == 1
        rates = [1 - p for p in model.drop_path_sampler.current_survival_probs()]
        assert rates == pytest.approx([factor * r for r in targets])
        with torch.no_grad():
            model(x)
        # the draws use them: sample mode runs each branch on round(p B) samples
        assert [g.numel() for g in model.drop_path_sampler.gates] == [kept_per_sample_count(1 - r, 16) for r in rates]
        assert zoo.gate_sampler.current_survival_probs() == pytest.approx(
            [1 - factor * (1 - p) for p in zoo.block_survival_probs()])


@pytest.mark.parametrize("kind", ["zoo batch", "converted batch", "converted sample"])
def test_warmup_moves_the_rates_without_recompiling(kind):
    from torch._dynamo.testing import CompileCounterWithBackend
    torch._dynamo.reset()
    torch.manual_seed(0)
    if kind == "zoo batch":
        model = timm.create_model("sd_resnet20_cifar", scaling="inverted", gate_seed=4).train()
    else:
        model = sdzoo.convert_drop_path(build("vit_tiny_patch16_224", depth=2), mode=kind.split()[1], seed=4,
                                        min_drop_rate=0).train()
    eager = copy.deepcopy(model)
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(model, backend=counter)
    x = torch.randn(8, 3, SIZE, SIZE)
    frames = []
    for step in range(6):  # the factor moves 0, 0.33, 0.67, 1, 1, 1
        factor = drop_warmup_factor(step, 6, 0.5)
        set_drop_rate_factor(model, factor)
        set_drop_rate_factor(eager, factor)
        step_compiled_and_eager(compiled, eager, x)
        frames.append(counter.frame_count)
    assert frames[-1] == frames[0], f"recompiled while the rates moved: frame counts {frames}"


# -- a plain DDP loop --------------------------------------------------------------------------------------
PLAIN_DDP_LOOP = textwrap.dedent("""
    # A plain DDP loop (no find_unused_parameters) on converted timm models, both modes.
    import json, sys
    import torch, torch.distributed as dist, torch.nn.functional as F
    import timm, sdzoo

    def train(out, steps):
        # a function, as in the DDP tutorial: the models and DDP are freed before the process group goes
        rank = dist.get_rank()
        results = {}
        for name in ("resnet26", "convnext_atto", "vit_tiny_patch16_224"):
            for mode in ("sample", "batch"):
                torch.manual_seed(0)
                size = dict(img_size=32) if name.startswith("vit_") else {}
                model = timm.create_model(name, drop_path_rate=0.4, num_classes=10, **size)
                sdzoo.convert_drop_path(model, mode=mode, seed=1, min_drop_rate=0.0)
                start = [p.detach().clone() for p in model.parameters()]
                ddp = torch.nn.parallel.DistributedDataParallel(model)
                optimizer = torch.optim.SGD(ddp.parameters(), lr=0.01, momentum=0.9)
                data = torch.Generator().manual_seed(100 + rank)
                skipped = 0
                for step in range(steps):
                    x, y = torch.randn(4, 3, 32, 32, generator=data), torch.randint(0, 10, (4,), generator=data)
                    loss = F.cross_entropy(ddp(x), y)
                    optimizer.zero_grad()
                    loss.backward()
                    optimizer.step()
                    gates = model.drop_path_sampler.gates
                    skipped += sum(int(g.numel() < 4) if mode == "sample" else int(float(g) == 0) for g in gates)
                # the weights; BatchNorm statistics are each rank's own until DDP broadcasts rank 0's at a forward
                flat = torch.cat([p.detach().flatten() for p in model.parameters()])
                replicas = [torch.empty_like(flat) for _ in range(dist.get_world_size())]
                dist.all_gather(replicas, flat)
                moved = max((p.detach() - s).abs().max().item() for p, s in zip(model.parameters(), start))
                results[f"{name} {mode}"] = dict(
                    skipped=skipped, moved=moved, loss=loss.item(),
                    replica_max_diff=max((r - replicas[0]).abs().max().item() for r in replicas))
        if rank == 0:
            with open(out, "w") as f:
                json.dump(results, f)

    dist.init_process_group("gloo")
    train(sys.argv[1], int(sys.argv[2]))
    print(f"rank {dist.get_rank()}: trained", file=sys.stderr, flush=True)  # where a failure happened
    dist.barrier()  # no rank closes its connections while another still uses them
    dist.destroy_process_group()
""")


@pytest.mark.slow
def test_plain_ddp_loop_trains_converted_models(tmp_path):
    script = tmp_path / "loop.py"
    script.write_text(PLAIN_DDP_LOOP)
    out = tmp_path / "result.json"
    proc = run_two_processes(script, out, 2)  # DDP refuses the second step when a parameter had no gradient
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(out.read_text())
    assert len(results) == 6
    for case, r in results.items():
        assert r["skipped"] > 0, f"{case}: nothing was dropped, the loop did not test the skip"
        assert r["replica_max_diff"] == 0.0, case
        assert r["moved"] > 0 and math.isfinite(r["loss"]), case
