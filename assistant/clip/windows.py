"""Sliding windows on the patch grid and WinCLIP's harmonic aggregation of window scores onto patches.

A window score says "something in these k x k patches is anomalous"; a patch covered by several
windows takes their harmonic mean, which is pulled down by any window that sees the patch as normal,
so only patches that every covering window flags stay high (sharper maps than the arithmetic mean).
"""

from __future__ import annotations

import torch

EPSILON = 1e-12  # keeps 1/score finite when a probability underflows to 0


def window_indices(grid: tuple[int, int], size: int) -> torch.Tensor:
    """[num_windows, size*size] row-major patch indices of every size x size window, stride 1."""
    rows, cols = grid
    if not 1 <= size <= min(rows, cols):
        raise ValueError(f"window size {size} does not fit the {rows}x{cols} patch grid")
    offsets = (torch.arange(size)[:, None] * cols + torch.arange(size)[None, :]).flatten()
    corners = (torch.arange(rows - size + 1)[:, None] * cols + torch.arange(cols - size + 1)[None, :]).flatten()
    return corners[:, None] + offsets[None, :]


def harmonic_mean(values: torch.Tensor, dim: int = 0) -> torch.Tensor:
    return values.shape[dim] / (1.0 / values.clamp_min(EPSILON)).sum(dim)


def harmonic_aggregate(window_scores: torch.Tensor, indices: torch.Tensor, num_patches: int) -> torch.Tensor:
    """[W] window scores -> [num_patches]: harmonic mean over the windows that cover each patch."""
    flat = indices.flatten().to(window_scores.device)
    inverse = (1.0 / window_scores.clamp_min(EPSILON)).repeat_interleave(indices.shape[1])
    totals = window_scores.new_zeros(num_patches).index_add_(0, flat, inverse)
    counts = torch.bincount(flat, minlength=num_patches).to(window_scores.dtype)
    return counts / totals
