"""Distributed training on PyTorch's own engine: two processes, gloo on 127.0.0.1, `DistributedDataParallel`, for
every positional layer.

Each rank trains on one half of a batch; DDP averages the gradients, which is the gradient of the mean loss over
the whole batch. So after a few optimiser steps every parameter, the positional table included, must equal that of
one process trained on the whole batch, in float64 to 1e-10. One pair of processes trains every layer in turn (a
process start costs more than the training); the tests then compare layer by layer. They stop by themselves: the
processes are joined with a deadline and killed past it.
"""
import os
import socket
import tempfile
import time
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from additive_pos_attn import AdditiveRelMultiheadAttention
from additive_pos_attn.additive import AdditivePosMultiheadAttention
from additive_pos_attn.alibi import ALiBiMultiheadAttention
from additive_pos_attn.rotary import RoPEMultiheadAttention

WORLD_SIZE, STEPS, DEADLINE_S = 2, 4, 120
B, T, D, H, MAX_LEN = 4, 6, 8, 2, 16
# Each kind of layer, built in float64, and its positional table (None: rotary and ALiBi have none; ALiBi's fixed
# slopes are a buffer, which DDP broadcasts from rank 0). The relative table is shorter than the offsets, so its end rows
# are shared.
LAYERS = {'additive': (lambda: AdditivePosMultiheadAttention(D, H, max_len=MAX_LEN, dtype=torch.float64), 'pos_emb'),
          'relative': (lambda: AdditiveRelMultiheadAttention(D, H, max_distance=3, dtype=torch.float64), 'rel_bias'),
          'rotary': (lambda: RoPEMultiheadAttention(D, H, dtype=torch.float64), None),
          'alibi': (lambda: ALiBiMultiheadAttention(D, H, dtype=torch.float64), None)}


class TinyModel(nn.Module):
    "Causal self-attention with per-sample positions, then a linear read-out: enough to move every parameter."
    def __init__(self, kind):
        super().__init__()
        make, table = LAYERS[kind]
        self.attn = make()
        self.head = nn.Linear(D, 1, dtype=torch.float64)
        if table:
            with torch.no_grad(): getattr(self.attn, table).normal_(std=0.5)

    def forward(self, x, positions):
        out, _ = self.attn(x, x, x, q_positions=positions, k_positions=positions, is_causal=True)
        return self.head(out).squeeze(-1)


def batch():
    "The whole batch: inputs, per-sample positions (left-padded offsets) and targets."
    g = torch.Generator().manual_seed(1)
    x = torch.randn(B, T, D, generator=g, dtype=torch.float64)
    positions = torch.arange(T) + torch.tensor([0, 3, 7, 10])[:, None]
    return x, positions, torch.randn(B, T, generator=g, dtype=torch.float64)


def train(model, x, positions, y):
    "A few SGD steps with momentum on the mean squared error over the given (part of the) batch."
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    for _ in range(STEPS):
        opt.zero_grad()
        nn.functional.mse_loss(model(x, positions), y).backward()
        opt.step()
    return model


def fresh_model(kind):
    torch.manual_seed(0)
    return TinyModel(kind)


def _worker(rank, port, out_dir):
    "One rank: train the DDP-wrapped model of each kind on its half of the batch and save its parameters."
    torch.set_num_threads(1)
    dist.init_process_group('gloo', init_method=f'tcp://127.0.0.1:{port}', rank=rank, world_size=WORLD_SIZE,
                            timeout=timedelta(seconds=DEADLINE_S))
    try:
        x, positions, y = (t.chunk(WORLD_SIZE)[rank] for t in batch())
        for kind in LAYERS:
            model = nn.parallel.DistributedDataParallel(fresh_model(kind))
            train(model, x, positions, y)
            torch.save({n: p.detach() for n, p in model.module.named_parameters()}, os.path.join(out_dir, f'{kind}-rank{rank}.pt'))
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


@pytest.fixture(scope='module')
def ddp_parameters():
    "`{kind: [parameters of rank 0, of rank 1]}` after DDP training."
    start = time.perf_counter()
    ctx = mp.get_context('spawn')
    with tempfile.TemporaryDirectory() as out_dir:
        port = _free_port()
        procs = [ctx.Process(target=_worker, args=(rank, port, out_dir)) for rank in range(WORLD_SIZE)]
        for p in procs: p.start()
        deadline = time.monotonic() + DEADLINE_S
        for p in procs: p.join(timeout=max(0.0, deadline - time.monotonic()))
        hung = [p for p in procs if p.is_alive()]
        for p in hung: p.kill()
        for p in procs: p.join(timeout=10)
        assert not hung, f"DDP ranks did not finish within {DEADLINE_S} s and were killed"
        assert [p.exitcode for p in procs] == [0] * WORLD_SIZE, f"exit codes {[p.exitcode for p in procs]}"
        parameters = {kind: [torch.load(os.path.join(out_dir, f'{kind}-rank{r}.pt')) for r in range(WORLD_SIZE)] for kind in LAYERS}
    print(f"DDP training ran in {time.perf_counter() - start:.1f} s")
    return parameters


@pytest.mark.slow
@pytest.mark.parametrize('kind', list(LAYERS))
def test_ddp_matches_single_process(ddp_parameters, kind):
    ranks = ddp_parameters[kind]
    reference = dict(train(fresh_model(kind), *batch()).named_parameters())
    initial = dict(fresh_model(kind).named_parameters())
    table = LAYERS[kind][1]
    assert set(ranks[0]) == set(reference) and (table is None or f'attn.{table}' in reference)
    for name, param in reference.items():
        assert not torch.equal(param, initial[name]), f"{name} did not train"
        for r, state in enumerate(ranks):
            torch.testing.assert_close(state[name], param.detach(), rtol=0, atol=1e-10, msg=lambda m: f"rank {r} {name}: {m}")
