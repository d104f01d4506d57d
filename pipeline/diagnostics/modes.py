"""Eval mode for a read-only look at a model, with every submodule's own training flag put back afterwards."""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from torch import nn


@contextmanager
def eval_mode(*modules: nn.Module) -> Iterator[None]:
    """Eval mode inside (torch's SN then leaves its power iteration alone, BatchNorm uses running statistics, no
    style mixing); afterwards each submodule gets its own flag back, not its parent's (G_ema stays in eval)."""
    flags = [(m, m.training) for module in modules for m in module.modules()]
    try:
        for module in modules:
            module.eval()
        yield
    finally:
        for m, training in flags:
            m.training = training  # not m.train(): that would recurse into children already restored
