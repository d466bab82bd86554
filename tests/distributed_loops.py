"""Distributed training loops as users write them, for the tests to run under torchrun (gloo, on the CPU).

    torchrun --standalone --nproc_per_node 2 tests/distributed_loops.py {ddp,fsdp2} CASES STEPS OUT

``ddp`` is a plain DDP loop, as in the PyTorch DDP tutorial and timm's train.py: no
``find_unused_parameters`` (DDP then refuses the second step if a parameter had no gradient), in which rank 1
runs one extra training forward after the first step (a debug print, a validation pass that forgot
``model.eval()``): the ranks must still draw the same gates. ``fsdp2`` shards each transformer block and then
the root with ``fully_shard``. CASES is a JSON list of
``{"model": NAME, "kwargs": {...}, "size": 32, "convert": null | "sample" | "batch",
"convert_through_ddp": false}``;
rank 0 writes one result per case to OUT. sdzoo is imported only to convert: the zoo's own models come
through timm's registry (the start-up hook), as in a user's script.
"""
import json
import sys

import torch
import torch.distributed as dist
import torch.nn.functional as F
import timm

BATCH = 4


def build(case):
    torch.manual_seed(0)
    return timm.create_model(case["model"], num_classes=10, **case.get("kwargs", {}))


def convert(module, case):
    import sdzoo
    sdzoo.convert_drop_path(module, mode=case["convert"], seed=1, min_drop_rate=0.0)


def last_gates(model):
    """The gates of the last training forward: the zoo's ``gate_sampler`` or a converted model's."""
    return (getattr(model, "gate_sampler", None) or model.drop_path_sampler).last_draw[0]


def skipped(gates) -> int:
    """Branches skipped (batch mode) or run on fewer than all samples (sample mode)."""
    return sum(int(g.numel() < BATCH) if g.dim() else int(float(g) == 0) for g in gates if g is not None)


def steps_of(model, wrapped, size, steps, after_step=None):
    """``steps`` SGD steps on each rank's own random data; the number of branches skipped, the last loss and
    each step's gates. ``after_step(step, x)`` runs after each step."""
    optimizer = torch.optim.SGD(wrapped.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4)
    data = torch.Generator().manual_seed(100 + dist.get_rank())  # each rank its own part of the data
    skipped_branches, draws = 0, []
    for _ in range(steps):
        x, y = torch.randn(BATCH, 3, size, size, generator=data), torch.randint(0, 10, (BATCH,), generator=data)
        loss = F.cross_entropy(wrapped(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        skipped_branches += skipped(last_gates(model))
        draws.append([None if g is None else g.tolist() for g in last_gates(model)])
        if after_step is not None:
            after_step(len(draws) - 1, x)
    return skipped_branches, loss.item(), draws


def ddp_case(case, size, steps):
    model = build(case)
    start = [p.detach().clone() for p in model.parameters()]
    if case.get("convert_through_ddp"):  # a user converting the DDP wrapper itself
        wrapped = torch.nn.parallel.DistributedDataParallel(model)
        convert(wrapped, case)
    else:
        if case.get("convert"):
            convert(model, case)
        wrapped = torch.nn.parallel.DistributedDataParallel(model)
    def debug_print(step, x):
        if step == 0 and dist.get_rank() == 1:  # rank 1 only, in training mode
            print("debug:", model(x).shape, file=sys.stderr)

    skipped, loss, draws = steps_of(model, wrapped, size, steps, debug_print)
    all_draws = [None] * dist.get_world_size()
    dist.all_gather_object(all_draws, draws)
    # the weights; BatchNorm statistics are each rank's own until DDP broadcasts rank 0's at a forward
    flat = torch.cat([p.detach().flatten() for p in model.parameters()])
    replicas = [torch.empty_like(flat) for _ in range(dist.get_world_size())]
    dist.all_gather(replicas, flat)
    moved = max((p.detach() - s).abs().max().item() for p, s in zip(model.parameters(), start))
    return dict(skipped=skipped, moved=moved, loss=loss, same_draws=all(d == all_draws[0] for d in all_draws),
                replica_max_diff=max((r - replicas[0]).abs().max().item() for r in replicas))


def fsdp2_case(case, size, steps):
    from torch.distributed.fsdp import fully_shard

    model = build(case)
    convert(model, case)
    for block in model.blocks:
        fully_shard(block)
    fully_shard(model)
    skipped, loss, draws = steps_of(model, model, size, steps)
    all_draws = [None] * dist.get_world_size()
    dist.all_gather_object(all_draws, draws)
    full = {n: p.full_tensor() for n, p in model.named_parameters()}  # the sharded weights, gathered
    return dict(same_draws=all(d == all_draws[0] for d in all_draws), skipped=skipped, loss=loss,
                finite=all(bool(t.isfinite().all()) for t in full.values()))


def main(loop, cases, steps, out):
    # a function, as in the DDP tutorial: the models and wrappers are freed before the process group goes
    run_case = dict(ddp=ddp_case, fsdp2=fsdp2_case)[loop]
    results = {}
    for case in cases:
        results[f"{case['model']} {case.get('convert') or 'zoo'}"] = run_case(case, case.get("size", 32), steps)
    if dist.get_rank() == 0:
        with open(out, "w") as f:
            json.dump(results, f)


if __name__ == "__main__":
    dist.init_process_group("gloo")
    main(sys.argv[1], json.loads(sys.argv[2]), int(sys.argv[3]), sys.argv[4])
    print(f"rank {dist.get_rank()}: trained", file=sys.stderr, flush=True)  # where a failure happened
    dist.barrier()  # no rank closes its connections while another still uses them
    dist.destroy_process_group()
