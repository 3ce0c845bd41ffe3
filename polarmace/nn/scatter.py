"""Scatter-sum with a pure-torch implementation (index_add_) and an optional torch_scatter path.

`scatter_sum(src, index, dim_size)` sums rows of `src` into `dim_size` bins along dim 0. Both
paths are differentiable to all orders; the torch_scatter one is used only in eager mode (it is
not needed for speed on CPU, where index_add is as fast).
"""

from __future__ import annotations

import torch

try:  # optional
    import torch_scatter as _torch_scatter  # type: ignore

    _HAS_TORCH_SCATTER = True
except (ImportError, OSError):  # absent, or built against another torch
    _torch_scatter = None
    _HAS_TORCH_SCATTER = False


@torch.jit.unused
def _scatter_sum_torch_scatter(src: torch.Tensor, index: torch.Tensor, dim_size: int) -> torch.Tensor:
    return _torch_scatter.scatter_sum(src, index, dim=0, dim_size=dim_size)  # pragma: no cover


def scatter_sum(src: torch.Tensor, index: torch.Tensor, dim_size: int, use_torch_scatter: bool = False) -> torch.Tensor:
    """out[b] = Σ_{e: index[e] = b} src[e] along dim 0; out has dim_size rows."""
    if use_torch_scatter and _HAS_TORCH_SCATTER and not torch.jit.is_scripting():
        return _scatter_sum_torch_scatter(src, index, dim_size)
    shape = [dim_size] + list(src.shape[1:])
    return torch.zeros(shape, dtype=src.dtype, device=src.device).index_add(0, index, src)
