"""The sorted-vector L1 of ULD and the hybrids: the L1 distance between two rows of non-negative values
(probabilities) sorted in descending order, the shorter zero-padded, and its gradient.

`sorted_l1_signs(ps, pt)` sorts the values of each side once (NumPy on the CPU: values only, several
times faster than `torch.sort`, which also builds indices) and sums `|s_(j) - t_(j)|` over the ranks j.
The gradient with respect to an entry of `ps` is `sigma_j = sign(s_(j) - t_(j))` at the entry's rank
j. Along the ranks `sigma` is piecewise constant (the sorted curves cross a few times), so with the
values `th_1 < th_2 < ...` where it changes (in ascending order), an entry's sign is that of the segment
`#{th_k <= value}`. That count is read from a per-row table indexed by the leading bits of the entry's
floating-point representation (for non-negative floats the bit pattern, read as an integer, is
monotone in the value, so each table bucket is an interval of values): one gather per entry instead of
an argsort or a binary search. Only the entries of buckets that contain a change point (a small
fraction) are placed exactly, by a binary search among their row's change points. Exact, ties aside
(an entry tied with a change point takes a valid subgradient).

`sorted_l1` wraps it as an autograd function (the chunk forms other than "start"). With `tail_cut`
(only the largest entries of each side: the public forms), `sorted_l1` takes the `torch.topk` path,
`sorted_l1_parts` / `sorted_l1_grad`.
"""

from __future__ import annotations

import numpy as np
import torch

TABLE_BITS = 6  # table buckets per octave of value: 2**TABLE_BITS


def _sort_asc(x: torch.Tensor) -> torch.Tensor:
    """The rows of `x` sorted ascending (values only)."""
    if x.device.type == "cpu" and x.dtype in (torch.float32, torch.float64):
        return torch.from_numpy(np.sort(x.detach().numpy(), axis=1))
    return torch.sort(x.detach(), dim=1).values


def _table_keys(x: torch.Tensor) -> tuple[torch.Tensor, int]:
    """`(keys [...] int64, number of buckets)`: a key non-decreasing in the value for non-negative
    `x` (float32: the bit pattern's top bits, covering every float; float64: clamped to the float32
    range). Anything else (-0.0, a NaN with its sign bit set) still gets a key in range."""
    if x.dtype == torch.float32:
        shift = 23 - TABLE_BITS
        keys = torch.bitwise_and(x.view(torch.int32), 0x7FFFFFFF).bitwise_right_shift_(shift)
        return keys.to(torch.int64), 1 << (31 - shift)
    shift = 52 - TABLE_BITS
    base = (1023 - 127) << TABLE_BITS  # float64: [2**-127, 2**2) in buckets, the rest in the end ones
    nb = (129 << TABLE_BITS) + 2
    keys = x.view(torch.int64).bitwise_right_shift(shift).sub_(base - 1).clamp_(0, nb - 1)
    return keys, nb


def _signs_at(ps: torch.Tensor, s: torch.Tensor, sgn: torch.Tensor) -> torch.Tensor:
    """`[n, V]`: `sgn` (the sign at each ascending sorted position of `s`, the sorted `ps`) carried back
    to the entries of `ps` (module doc)."""
    n, V = ps.shape
    dev = ps.device
    change = sgn[:, 1:] != sgn[:, :-1]  # a new segment starts at ascending position j + 1
    r, j = change.nonzero(as_tuple=True)  # row-major: per row, change points ascending
    th = s[r, j + 1]  # [M] the first value of each new segment
    m_row = torch.bincount(r, minlength=n)
    seg_base = torch.cumsum(m_row + 1, 0) - (m_row + 1)  # row r's segments: seg_base[r] + 0 .. m_row[r]
    seg_sign = torch.empty(int(m_row.sum()) + n, dtype=sgn.dtype, device=dev)
    seg_sign[seg_base] = sgn[:, 0]
    k = torch.arange(r.shape[0], device=dev) - (torch.cumsum(m_row, 0) - m_row)[r]  # rank of a change in its row
    seg_sign[seg_base[r] + k + 1] = sgn[r, j + 1]

    # per (row, bucket): change points in lower buckets, and whether the bucket holds one
    keys, nb = _table_keys(ps)
    tk, _ = _table_keys(th)
    cnt = torch.zeros(n, nb, dtype=torch.int64, device=dev).index_put_((r, tk), torch.ones_like(tk), accumulate=True)
    below = torch.cumsum(cnt, 1) - cnt
    table = seg_sign[(seg_base[:, None] + below).view(-1)].view(n, nb)
    table = torch.where(cnt > 0, torch.full_like(table, 2.0), table)  # 2: place exactly
    out = table.gather(1, keys)
    fr, fc = (out == 2.0).nonzero(as_tuple=True)
    if fr.numel():
        v = ps[fr, fc]
        per_row = torch.bincount(fr, minlength=n).tolist()
        m_list = m_row.tolist()
        counts = torch.empty_like(fr)
        e0 = t0 = 0
        for row in range(n):  # a binary search among the row's change points
            e1, t1 = e0 + per_row[row], t0 + m_list[row]
            if e1 > e0:
                counts[e0:e1] = torch.searchsorted(th[t0:t1], v[e0:e1], right=True)
            e0, t0 = e1, t1
        out[fr, fc] = seg_sign[seg_base[fr] + counts]
    return out


def sorted_l1_signs(ps: torch.Tensor, pt: torch.Tensor, want_sign: bool = True, tail_cut: int | None = None):
    """`(l1 [n], sigma [n, V_s] or None)`: the sorted-vector L1 between the rows of `ps [n, V_s]` and
    `pt [n, V_t]` (non-negative; the shorter side zero-padded; with `tail_cut`, the `min(tail_cut,
    width)` largest entries of each side only) and its gradient with respect to `ps` (module doc).
    Not differentiable itself (it is the building block of `sorted_l1` and of the hand-written
    "start" chunk form); a host sync for the change points."""
    pt = pt.to(ps.dtype)
    if tail_cut is not None and tail_cut < max(ps.shape[1], pt.shape[1]):
        l1, s, sgn = sorted_l1_parts(ps, pt, tail_cut)
        return l1, sorted_l1_grad(ps, s, sgn) if want_sign else None
    if ps.shape[1] == 0:
        return pt.sum(dim=1), ps.clone() if want_sign else None
    s, t = _sort_asc(ps), _sort_asc(pt)
    vs, vt = s.shape[1], t.shape[1]
    w0 = min(vs, vt)
    diff = s[:, vs - w0:] - t[:, vt - w0:]  # ascending, aligned at the largest entries
    l1 = diff.abs().sum(dim=1) + s[:, : vs - w0].sum(dim=1) + t[:, : vt - w0].sum(dim=1)
    if not want_sign:
        return l1, None
    sgn = torch.sign(diff)
    if vs > w0:  # the student's smallest entries meet the teacher's zero padding
        sgn = torch.cat([torch.sign(s[:, : vs - w0]), sgn], dim=1)
    return l1, _signs_at(ps, s, sgn)


# --------------------------------------------------------------------------------------------------
# The tail-cut path (largest entries only) and the autograd wrapper


def _sort_desc(x: torch.Tensor, keep: int | None) -> torch.Tensor:
    """Rows of `x` sorted descending (values only), the first `keep` of them (None: all)."""
    if keep is not None and keep < x.shape[1]:
        return torch.topk(x, keep, dim=1, sorted=True).values
    return _sort_asc(x).flip(1)


def sorted_l1_parts(ps: torch.Tensor, pt: torch.Tensor, tail_cut: int | None = None):
    """`(l1 [n], s, sgn)` by sorting: the sorted-vector L1 (of the `tail_cut` largest entries of each
    side), the student's sorted values `s` and `sgn = sign(s_j - t_j)` at the student's sorted
    positions (what `sorted_l1_grad` needs). Entries are >= 0, so the zero-padded tail of the longer
    side adds its plain sum. Used with a tail cut; without one `sorted_l1_signs` is faster."""
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
    """`d L1 / d ps [n, V_s]` from `sorted_l1_parts` without sort indices: along the sorted positions
    `sgn` is piecewise constant (the sorted curves cross a few times), so an element's gradient is the
    sign of the segment its rank falls in, and "rank >= b" is "value < s[b - 1]": a binary search
    among the few segment thresholds instead of an argsort. Tied values take the sign at the first
    position of their run (a valid subgradient)."""
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
        l1, sigma = sorted_l1_signs(ps, pt, ctx.needs_input_grad[0], tail_cut)
        if ctx.needs_input_grad[0]:
            ctx.save_for_backward(sigma)
        return l1

    @staticmethod
    def backward(ctx, grad_out):
        (sigma,) = ctx.saved_tensors
        return sigma * grad_out[:, None], None, None


def sorted_l1(ps: torch.Tensor, pt: torch.Tensor, tail_cut: int | None = None) -> torch.Tensor:
    """`[n]`: L1 between the rows of `ps [n, V_s]` and `pt [n, V_t]` sorted descending, the shorter
    zero-padded; with `tail_cut`, only the `min(tail_cut, width)` largest entries of each side.
    Differentiable in `ps` (`pt` is treated as a constant); both must have the same dtype."""
    return _SortedL1.apply(ps, pt.detach(), tail_cut)
