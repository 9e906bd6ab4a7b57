"""Distributed training on PyTorch's own engine: two processes, gloo on 127.0.0.1, `DistributedDataParallel`.

Each rank trains on one half of a batch; DDP averages the gradients, which is the gradient of the mean loss over
the whole batch. So after a few optimiser steps every parameter, the positional table included, must equal that of
one process trained on the whole batch, in float64 to 1e-10. The test stops by itself: the processes are joined
with a deadline and killed past it.
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

from additive_pos_attn.additive import AdditivePosMultiheadAttention

WORLD_SIZE, STEPS, DEADLINE_S = 2, 4, 120
B, T, D, H, MAX_LEN = 4, 6, 8, 2, 16


class TinyModel(nn.Module):
    "Causal self-attention with per-sample positions, then a linear read-out: enough to move every parameter."
    def __init__(self):
        super().__init__()
        self.attn = AdditivePosMultiheadAttention(D, H, max_len=MAX_LEN, dtype=torch.float64)
        self.head = nn.Linear(D, 1, dtype=torch.float64)
        with torch.no_grad(): self.attn.pos_emb.normal_(std=0.5)

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


def fresh_model():
    torch.manual_seed(0)
    return TinyModel()


def _worker(rank, port, out_dir):
    "One rank: train the DDP-wrapped model on its half of the batch and save its parameters."
    torch.set_num_threads(1)
    dist.init_process_group('gloo', init_method=f'tcp://127.0.0.1:{port}', rank=rank, world_size=WORLD_SIZE,
                            timeout=timedelta(seconds=DEADLINE_S))
    try:
        model = nn.parallel.DistributedDataParallel(fresh_model())
        x, positions, y = (t.chunk(WORLD_SIZE)[rank] for t in batch())
        train(model, x, positions, y)
        torch.save({n: p.detach() for n, p in model.module.named_parameters()}, os.path.join(out_dir, f'rank{rank}.pt'))
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_ddp_matches_single_process():
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
        ranks = [torch.load(os.path.join(out_dir, f'rank{r}.pt')) for r in range(WORLD_SIZE)]

    reference = dict(train(fresh_model(), *batch()).named_parameters())
    initial = dict(fresh_model().named_parameters())
    assert set(ranks[0]) == set(reference) and 'attn.pos_emb' in reference
    for name, param in reference.items():
        assert not torch.equal(param, initial[name]), f"{name} did not train"
        for r, state in enumerate(ranks):
            torch.testing.assert_close(state[name], param.detach(), rtol=0, atol=1e-10, msg=lambda m: f"rank {r} {name}: {m}")
    print(f"DDP test ran in {time.perf_counter() - start:.1f} s")
