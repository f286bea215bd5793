"""The sorted-vector L1 of ULD and the hybrids: the L1 distance between two rows of probabilities sorted
in descending order (the shorter zero-padded), with a gradient that needs no sort indices.

`sorted_l1_parts` / `sorted_l1_grad` are the forward and the hand-written gradient (the principled
"start" chunk form uses them directly); `sorted_l1` wraps them as an autograd function for the other
chunk forms.
"""

from __future__ import annotations

import torch


def _sort_desc(x: torch.Tensor, keep: int | None) -> torch.Tensor:
    """Rows of `x` sorted descending (values only), the first `keep` of them (None: all).

    On CPU the full sort runs in NumPy (values only: several times faster than `torch.sort`, which
    also builds indices); `torch.topk` when only the largest `keep` are needed."""
    if keep is not None and keep < x.shape[1]:
        return torch.topk(x, keep, dim=1, sorted=True).values
    if x.device.type == "cpu" and x.dtype in (torch.float32, torch.float64):
        import numpy as np

        return torch.from_numpy(np.ascontiguousarray(np.sort(x.numpy(), axis=1)[:, ::-1]))
    return torch.sort(x, dim=1, descending=True).values


def sorted_l1_parts(ps: torch.Tensor, pt: torch.Tensor, tail_cut: int | None = None):
    """`(l1 [n], s, sgn)`: the sorted-vector L1, the student's sorted values `s` and
    `sgn = sign(s_j - t_j)` at the student's sorted positions (what `sorted_l1_grad` needs).
    Entries are >= 0, so the zero-padded tail of the longer side adds its plain sum."""
    s = _sort_desc(ps, tail_cut)
    t = _sort_desc(pt, tail_cut)
    w0 = min(s.shape[1], t.shape[1])
    diff = s[:, :w0] - t[:, :w0]
    l1 = diff.abs().sum(dim=1) + s[:, w0:].sum(dim=1) + t[:, w0:].sum(dim=1)
    sgn = torch.sign(diff)
    if s.shape[1] > w0:
        sgn = torch.cat([sgn, torch.sign(s[:, w0:])], dim=1)
    return l1, s, sgn


def sorted_l1_grad(ps: torch.Tensor, s: torch.Tensor, sgn: torch.Tensor) -> torch.Tensor:
    """`d L1 / d ps [n, V_s]` without sort indices: along the sorted positions `sgn` is piecewise
    constant (the sorted curves cross a few times), so an element's gradient is the sign of the
    segment its rank falls in, and "rank >= b" is "value < s[b - 1]": a binary search among the few
    segment thresholds instead of an argsort. Tied values take the sign at the first position of
    their run (a valid subgradient)."""
    n, k = s.shape
    # a kept prefix (tail_cut): ranks >= k get sign 0, one more segment
    sgn = torch.nn.functional.pad(sgn, (0, 1)) if k < ps.shape[1] else sgn
    change = sgn[:, 1:] != sgn[:, :-1]  # [n, k'-1]: a new segment starts at position j + 1
    count = change.sum(dim=1)
    m = int(count.max()) if count.numel() else 0
    r, j = change.nonzero(as_tuple=True)
    slot = (torch.cumsum(change.to(torch.int64), dim=1) - 1)[r, j]
    th = torch.full((n, m), float("-inf"), dtype=s.dtype, device=s.device)
    th[r, slot] = s[r, j]  # segment m + 1 holds ranks >= j + 1, i.e. values < s[j]; descending in m
    seg = torch.zeros(n, m + 1, dtype=sgn.dtype, device=sgn.device)
    seg[:, 0] = sgn[:, 0]
    seg[r, slot + 1] = sgn[r, j + 1]
    asc = th.flip(1).contiguous()
    greater = m - torch.searchsorted(asc, ps.contiguous(), right=True)  # thresholds > v
    return seg.gather(1, greater)


class _SortedL1(torch.autograd.Function):
    """`[n]` sorted-vector L1 with a gradient for the first argument only (the teacher is constant)."""

    @staticmethod
    def forward(ctx, ps, pt, tail_cut):
        l1, s, sgn = sorted_l1_parts(ps, pt, tail_cut)
        if ctx.needs_input_grad[0]:
            ctx.save_for_backward(ps, s, sgn)
        return l1

    @staticmethod
    def backward(ctx, grad_out):
        ps, s, sgn = ctx.saved_tensors
        return sorted_l1_grad(ps, s, sgn) * grad_out[:, None], None, None


def sorted_l1(ps: torch.Tensor, pt: torch.Tensor, tail_cut: int | None = None) -> torch.Tensor:
    """`[n]`: L1 between the rows of `ps [n, V_s]` and `pt [n, V_t]` sorted descending, the shorter
    zero-padded; with `tail_cut`, only the `min(tail_cut, width)` largest entries of each side.
    Differentiable in `ps` (`pt` is treated as a constant)."""
    return _SortedL1.apply(ps, pt.detach(), tail_cut)

