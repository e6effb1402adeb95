"""RMSprop under torch's own scaling engines: DDP, ZeroRedundancyOptimizer, FSDP2 + DCP.

Each test spawns two CPU processes (gloo) that write their results to a
temporary folder; the test process compares them, bit for bit, with single-process training
on the full batch, and resumed runs with uninterrupted ones.
"""

import gc
import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from rmsprop import RMSprop

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()), reason="needs torch.distributed gloo"),
]

WORLD_SIZE = 2
STEPS = 4
RESUME_AT = 2
FLAG_COMBOS = [
    {"foreach": False},
    {"foreach": True},
    {"momentum": 0.9, "centered": True, "weight_decay": 0.01, "foreach": True},
    {"momentum": 0.9, "nesterov": True, "lr_in_momentum": True, "eps_in_sqrt": True, "foreach": False},
    {"bias_correction": True, "decoupled_weight_decay": True, "weight_decay": 0.1, "maximize": True, "foreach": True},
    # The default path: the fused kernel on plain tensors, a clean fallback on DTensors.
    {"momentum": 0.9, "centered": True, "weight_decay": 0.01},
]


def _model(seed: int = 0) -> torch.nn.Sequential:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 4))


def _full_batches() -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    return [torch.randn(8, 6, generator=generator) for _ in range(STEPS)]


def _shard(batch: torch.Tensor, rank: int) -> torch.Tensor:
    """This rank's equal share of the batch: with mean losses, averaged grads are the full batch's."""
    return batch.chunk(WORLD_SIZE)[rank]


def _loss(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    return (model(x) - 1).pow(2).mean()


def _train(model, optimizer, batches) -> None:
    for x in batches:
        optimizer.zero_grad()
        _loss(model, x).backward()
        optimizer.step()


def _single_process_params(flags: dict) -> list[torch.Tensor]:
    """Training in this process on the full batches, with the gradient computed as DDP and FSDP compute it.

    Each rank differentiates the mean loss over its shard; the ranks' gradients
    are summed and divided by the world size (2: exact). The full batch's mean
    loss has the same gradient mathematically, but not in the last bit, and
    momentum with Nesterov amplifies a last-bit difference over the steps
    beyond any tolerance fp32 rounding of the step itself would justify.
    """
    model = _model()
    optimizer = RMSprop(model.parameters(), lr=0.01, **flags)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the ranks run
    try:
        for x in _full_batches():
            shard_grads = []
            for rank in range(WORLD_SIZE):
                model.zero_grad()
                _loss(model, _shard(x, rank)).backward()
                shard_grads.append([p.grad.clone() for p in model.parameters()])
            for p, *grads in zip(model.parameters(), *shard_grads, strict=True):
                p.grad = torch.stack(grads).sum(dim=0) / WORLD_SIZE
            optimizer.step()
    finally:
        torch.set_num_threads(threads)
    return [p.detach() for p in model.parameters()]


def _spawn(run, tmp_path: Path) -> list:
    """``run(rank, out)`` in each of WORLD_SIZE processes; what each returned, by rank."""
    mp.spawn(_worker, args=(run, str(tmp_path / "init"), str(tmp_path)), nprocs=WORLD_SIZE, join=True)
    return [torch.load(tmp_path / f"rank{rank}.pt", weights_only=True) for rank in range(WORLD_SIZE)]


def _worker(rank: int, run, init_file: str, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD_SIZE)
    torch.save(run(rank, out), os.path.join(out, f"rank{rank}.pt"))
    # DDP and ZeRO objects are gone with run's frame; free any cycles too, then
    # let every rank finish before gloo is torn down.
    gc.collect()
    dist.barrier()
    dist.destroy_process_group()


def _assert_same(actual: list[torch.Tensor], expected: list[torch.Tensor], what: str) -> None:
    """Bit for bit: the reference computes what the ranks compute, in the same order."""
    assert len(actual) == len(expected)
    for a, e in zip(actual, expected):
        torch.testing.assert_close(a, e, rtol=0, atol=0, msg=lambda m: f"{what}: {m}")


def _ddp_run(rank: int, out: str) -> list:
    from torch.nn.parallel import DistributedDataParallel

    results = []
    for flags in FLAG_COMBOS:
        model = DistributedDataParallel(_model())
        _train(model, RMSprop(model.parameters(), lr=0.01, **flags), [_shard(x, rank) for x in _full_batches()])
        results.append([p.detach().clone() for p in model.module.parameters()])
    return results


def test_ddp_equals_single_process_full_batch(tmp_path):
    for rank, results in enumerate(_spawn(_ddp_run, tmp_path)):
        for flags, params in zip(FLAG_COMBOS, results, strict=True):
            _assert_same(params, _single_process_params(flags), f"DDP rank {rank}, {flags}")


ZERO_FLAGS = {"momentum": 0.9, "centered": True, "lr_in_momentum": True, "weight_decay": 0.01, "foreach": True}


def _zero_optimizer(model):
    from torch.distributed.optim import ZeroRedundancyOptimizer

    return ZeroRedundancyOptimizer(model.parameters(), optimizer_class=RMSprop, lr=0.01, **ZERO_FLAGS)


def _zero_run(rank: int, out: str) -> dict:
    from torch.nn.parallel import DistributedDataParallel

    batches = [_shard(x, rank) for x in _full_batches()]
    checkpoint_path = os.path.join(out, "zero_checkpoint.pt")

    model = DistributedDataParallel(_model())
    optimizer = _zero_optimizer(model)
    _train(model, optimizer, batches[:RESUME_AT])
    optimizer.consolidate_state_dict(to=0)
    if rank == 0:
        torch.save({"model": model.module.state_dict(), "optimizer": optimizer.state_dict()}, checkpoint_path)
    dist.barrier()
    _train(model, optimizer, batches[RESUME_AT:])
    uninterrupted = [p.detach().clone() for p in model.module.parameters()]

    checkpoint = torch.load(checkpoint_path, weights_only=True)
    fresh = _model(seed=7)
    fresh.load_state_dict(checkpoint["model"])
    fresh = DistributedDataParallel(fresh)
    fresh_optimizer = _zero_optimizer(fresh)
    fresh_optimizer.load_state_dict(checkpoint["optimizer"])
    _train(fresh, fresh_optimizer, batches[RESUME_AT:])
    resumed = [p.detach().clone() for p in fresh.module.parameters()]
    return {"uninterrupted": uninterrupted, "resumed": resumed}


def test_zero_redundancy_optimizer_trains_consolidates_and_resumes(tmp_path):
    results = _spawn(_zero_run, tmp_path)
    expected = _single_process_params(ZERO_FLAGS)
    for rank, result in enumerate(results):
        _assert_same(result["uninterrupted"], expected, f"ZeRO rank {rank}")
        for resumed, uninterrupted in zip(result["resumed"], result["uninterrupted"], strict=True):
            assert torch.equal(resumed, uninterrupted), f"ZeRO rank {rank}: resumed run differs"
    # The consolidated state holds every parameter's full state, under our keys.
    saved_state = torch.load(tmp_path / "zero_checkpoint.pt", weights_only=True)["optimizer"]["state"]
    assert sorted(saved_state) == list(range(len(expected)))
    for p_state, param in zip(saved_state.values(), expected, strict=True):
        assert p_state.keys() == {"step", "square_avg", "momentum_buffer", "grad_avg"}
        assert p_state["square_avg"].shape == param.shape


FSDP_FLAG_COMBOS = FLAG_COMBOS[2:]


def _sharded_model(seed: int) -> torch.nn.Sequential:
    from torch.distributed.fsdp import fully_shard

    model = _model(seed)
    for layer in model:
        if isinstance(layer, torch.nn.Linear):
            fully_shard(layer)
    fully_shard(model)
    return model


def _full_params(model) -> list[torch.Tensor]:
    return [p.full_tensor().detach().clone() for p in model.parameters()]


def _fsdp_run(rank: int, out: str) -> list:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
    from torch.distributed.tensor import DTensor

    batches = [_shard(x, rank) for x in _full_batches()]
    results = []
    for index, flags in enumerate(FSDP_FLAG_COMBOS):
        checkpoint_dir = os.path.join(out, f"dcp_{index}")
        model = _sharded_model(seed=0)
        optimizer = RMSprop(model.parameters(), lr=0.01, **flags)
        _train(model, optimizer, batches[:RESUME_AT])
        assert all(isinstance(v, DTensor) for s in optimizer.state.values() for k, v in s.items() if k != "step")
        model_state, optimizer_state = get_state_dict(model, optimizer)
        dcp.save({"model": model_state, "optimizer": optimizer_state}, checkpoint_id=checkpoint_dir)
        _train(model, optimizer, batches[RESUME_AT:])
        uninterrupted = _full_params(model)

        fresh = _sharded_model(seed=7)
        fresh_optimizer = RMSprop(fresh.parameters(), lr=0.01, **flags)
        model_state, optimizer_state = get_state_dict(fresh, fresh_optimizer)
        loaded = {"model": model_state, "optimizer": optimizer_state}
        dcp.load(loaded, checkpoint_id=checkpoint_dir)
        set_state_dict(fresh, fresh_optimizer, model_state_dict=loaded["model"], optim_state_dict=loaded["optimizer"])
        _train(fresh, fresh_optimizer, batches[RESUME_AT:])
        results.append({"uninterrupted": uninterrupted, "resumed": _full_params(fresh)})
    return results


def test_fsdp2_trains_and_resumes_through_distributed_checkpoint(tmp_path):
    for rank, results in enumerate(_spawn(_fsdp_run, tmp_path)):
        for flags, result in zip(FSDP_FLAG_COMBOS, results, strict=True):
            # On DTensors the fused kernel steps aside for torch's paths: the reference takes them too.
            reference_flags = {"fused": False, **flags}
            _assert_same(result["uninterrupted"], _single_process_params(reference_flags), f"FSDP2 rank {rank}, {flags}")
            for resumed, uninterrupted in zip(result["resumed"], result["uninterrupted"], strict=True):
                assert torch.equal(resumed, uninterrupted), f"FSDP2 rank {rank}, {flags}: resumed run differs"
