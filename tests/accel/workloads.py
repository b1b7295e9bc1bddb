"""Small models and training loops that the fake-npu tests run on "npu" and on CPU, to compare losses.

Imported by the snippets that tests/accel/test_fake_npu.py runs in fresh interpreters (after fake_npu.install()).
Everything is fp32 and seeded, so the CPU run is the reference for the npu run.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Callable, Iterable, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

VOCAB, DIM, HEADS, SEQ = 64, 32, 4, 16
STEPS = 4
GLOBAL_BATCH = 4


class Attention(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.norm = nn.RMSNorm(DIM)
        self.qkv = nn.Linear(DIM, 3 * DIM, bias=False)
        self.proj = nn.Linear(DIM, DIM, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        q, k, v = self.qkv(self.norm(x)).view(b, t, 3, HEADS, -1).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return x + self.proj(a.transpose(1, 2).reshape(b, t, -1))


class MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.norm = nn.RMSNorm(DIM)
        self.up = nn.Linear(DIM, 4 * DIM)
        self.down = nn.Linear(4 * DIM, DIM)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.down(F.silu(self.up(self.norm(x))))


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.attn = Attention()
        self.mlp = MLP()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.attn(x))


class Embed(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(VOCAB, DIM)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.emb(idx)


class Head(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.norm = nn.RMSNorm(DIM)
        self.out = nn.Linear(DIM, VOCAB, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.norm(x))


def tiny_lm() -> nn.Sequential:
    """Embedding, two transformer blocks (RMSNorm, SDPA, SiLU MLP), head: a Sequential, easy to cut into stages."""
    torch.manual_seed(0)
    return nn.Sequential(Embed(), Block(), Block(), Head())


def loss_fn(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.reshape(-1, logits.size(-1)), targets.reshape(-1))


def batches(steps: int = STEPS, batch: int = GLOBAL_BATCH) -> torch.Tensor:
    """Token batches, steps x batch x (SEQ + 1), the same in every process."""
    generator = torch.Generator().manual_seed(1)
    return torch.randint(0, VOCAB, (steps, batch, SEQ + 1), generator=generator)


def optimizer(params: Iterable[torch.nn.Parameter], foreach: Optional[bool] = None) -> torch.optim.Optimizer:
    return torch.optim.AdamW(params, lr=1e-2, weight_decay=0.1, foreach=foreach)


def train(model: nn.Module, device: str, data: Optional[torch.Tensor] = None,
          step_loss: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
          foreach: Optional[bool] = None) -> list[float]:
    """Plain training: AdamW, one batch a step; returns the losses."""
    data = batches() if data is None else data
    opt = optimizer(model.parameters(), foreach)
    losses = []
    for batch in data:
        batch = batch.to(device)
        loss = loss_fn(model(batch[:, :-1]), batch[:, 1:])
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(step_loss(loss.detach()).item() if step_loss else loss.item())
    return losses


def reference_losses() -> list[float]:
    """The single-process CPU run every distributed run is compared with (full global batch)."""
    return train(tiny_lm(), "cpu")


def report(**values: object) -> None:
    """The snippet's result: one JSON line that the test parses."""
    print("RESULT " + json.dumps(values), flush=True)


def finish(code: int = 0) -> None:
    """End a rank: gloo worker threads can abort the interpreter at exit after distributed work."""
    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
