"""Tiny models and datasets shared by the tests (built from configs; nothing is downloaded)."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn


class RegressionModel(nn.Module):
    """y = a*x + b with an MSE loss: the smallest model that exercises the whole loop."""

    def __init__(self, a: float = 0.0, b: float = 0.0, double_output: bool = False):
        super().__init__()
        self.a = nn.Parameter(torch.tensor(a))
        self.b = nn.Parameter(torch.tensor(b))
        self.double_output = double_output

    def forward(self, input_x, labels=None, **kwargs):
        y = input_x * self.a + self.b
        if labels is None:
            return (y, y) if self.double_output else (y,)
        loss = nn.functional.mse_loss(y, labels)
        return (loss, y, y) if self.double_output else (loss, y)


def regression_data(n: int = 64, seed: int = 0, a: float = 2.0, b: float = 3.0) -> list[dict]:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=n).astype(np.float32)
    noise = rng.normal(scale=0.1, size=n).astype(np.float32)
    return [{"input_x": float(v), "labels": float(a * v + b + e)} for v, e in zip(x, noise)]


def tiny_gpt2(seed: int = 0):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=96, n_positions=32, resid_pdrop=0.0,
                        embd_pdrop=0.0, attn_pdrop=0.0)
    return GPT2LMHeadModel(config)


def lm_data(n: int = 32, seq: int = 16, vocab: int = 96, seed: int = 0, pad_tail: bool = True) -> list[dict]:
    """Token sequences whose labels mask a varying tail with -100 (so token counts differ per batch)."""
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        ids = rng.integers(0, vocab, size=seq).astype(np.int64)
        labels = ids.copy()
        if pad_tail:
            labels[seq - (i % 5):] = -100
        rows.append({"input_ids": ids.tolist(), "labels": labels.tolist()})
    return rows
