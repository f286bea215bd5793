"""The sorted-vector L1 of ULD and the hybrids: the L1 distance between two rows of non-negative values
(probabilities) sorted in descending order, the shorter zero-padded, and its gradient.

`sorted_l1_signs(ps, pt)` sorts the values of each side once (on the CPU with NumPy, in place, values
only: several times faster than `torch.sort`, which also builds indices; the two sides in two threads
when torch has more than one) and sums `|s_(j) - t_(j)|` over the ranks j. The gradient with respect
to an entry of `ps` is `sigma_j = sign(s_(j) - t_(j))` at the entry's rank j. Along the ranks `sigma`
is piecewise constant (the sorted curves cross a few times), so with the values `th_1 < th_2 < ...`
where it changes (ascending), an entry's sign is that of the segment `#{th_k <= value}`. That count is
read from a per-row table indexed by the leading bits of the entry's floating-point representation
(for non-negative floats the bit pattern, read as an integer, is monotone in the value, so each table
bucket is an interval of values): one gather per entry instead of an argsort or a binary search. Only
the entries of buckets that contain a change point (a small fraction) are placed exactly, by a binary
search among their row's change points. Exact, ties aside (an entry tied with a change point takes a
valid subgradient).

`sorted_l1` wraps it as an autograd function (the chunk forms other than "start"). With `tail_cut`
(only the largest entries of each side: the public forms) it takes the `torch.topk` path,
`sorted_l1_parts` / `sorted_l1_grad`. `Workspace` keeps the `[n, V]` temporaries of one loss call for
the next group of rows: fresh pages for every temporary cost about as much as the arithmetic.
"""

from __future__ import annotations

import math
import threading

import numpy as np
import torch

TABLE_BITS = 6  # table buckets per octave of value: 2**TABLE_BITS


class Workspace:
    """Reusable uninitialised buffers, by name: `get(name, shape, dtype, device)` returns a view of a
    kept buffer when one is large enough (the same dtype and device), else a new one it keeps."""

    def __init__(self):
        self._bufs: dict = {}

    def get(self, name: str, shape, dtype, device) -> torch.Tensor:
        numel = math.prod(shape)
        buf = self._bufs.get(name)
        if buf is None or buf.numel() < numel or buf.dtype != dtype or buf.device != torch.device(device):
            buf = torch.empty(numel, dtype=dtype, device=device)
            self._bufs[name] = buf
        return buf[:numel].view(shape)


def _get(work: Workspace | None, name: str, shape, dtype, device) -> torch.Tensor:
    return torch.empty(shape, dtype=dtype, device=device) if work is None else work.get(name, shape, dtype, device)


def _sort_rows_(arrays: list[torch.Tensor]) -> None:
    """Sort the rows of each tensor ascending, in place."""
    if all(a.device.type == "cpu" and a.dtype in (torch.float32, torch.float64) for a in arrays):
        nps = [a.numpy() for a in arrays]
        if len(nps) == 2 and torch.get_num_threads() > 1 and nps[0].size + nps[1].size > 1 << 16:
            helper = threading.Thread(target=nps[1].sort, kwargs={"axis": 1}, name="xtoken-sort")
            helper.start()  # NumPy sorts without the GIL: the two sides in parallel
            nps[0].sort(axis=1)
            helper.join()
        else:
            for a in nps:
                a.sort(axis=1)
        return
    for a in arrays:
        a.copy_(torch.sort(a, dim=1).values)


def _sort_asc(x: torch.Tensor) -> torch.Tensor:
    """The rows of `x` sorted ascending (values only; a new tensor)."""
    out = x.detach().clone()
    _sort_rows_([out])
    return out


def _table_keys(x: torch.Tensor, work: Workspace | None, name: str, row_width: int | None = None):
    """`(keys, number of buckets)`: per entry of non-negative `x [n, V]`, a table bucket non-decreasing
    in the value (float32: the bit pattern's top bits, covering every float; float64: clamped to the
    float32 range). Anything else (-0.0, a NaN with its sign bit set) still gets a bucket in range.
    With `row_width` (the table's buckets per row), the keys are flat: `row * row_width + bucket`."""
    n = x.shape[0]
    dev = x.device
    if x.dtype == torch.float32:
        shift = 23 - TABLE_BITS
        keys = _get(work, name, x.shape, torch.int32, dev)
        torch.bitwise_and(x.view(torch.int32), 0x7FFFFFFF, out=keys).bitwise_right_shift_(shift)
        nb = 1 << (31 - shift)
    else:
        x = x.to(torch.float64)
        shift = 52 - TABLE_BITS
        base = (1023 - 127) << TABLE_BITS  # [2**-127, 2**2) in buckets, the rest in the end ones
        nb = (129 << TABLE_BITS) + 2
        keys = _get(work, name, x.shape, torch.int64, dev)
        torch.bitwise_right_shift(x.view(torch.int64), shift, out=keys).sub_(base - 1).clamp_(0, nb - 1)
    if row_width is not None and n:
        keys.add_(torch.arange(n, device=dev, dtype=keys.dtype)[:, None] * row_width)
    return keys, nb


def _nonzero_2d(a: torch.Tensor, b, op: str, work: Workspace | None):
    """`(rows, cols)` where `a != b` ("ne") or `a == b` ("eq") on `[n, k]`, row-major (NumPy's compare
    and flatnonzero on the CPU: several times faster than torch's `nonzero`)."""
    n, k = a.shape
    if a.device.type == "cpu":
        an = a.numpy()
        bn = b.numpy() if isinstance(b, torch.Tensor) else b
        idx = torch.from_numpy(np.flatnonzero(np.not_equal(an, bn) if op == "ne" else np.equal(an, bn)))
        return idx // max(k, 1), idx % max(k, 1)
    mask = _get(work, "mask", (n, k), torch.bool, a.device)
    (torch.ne if op == "ne" else torch.eq)(a, b, out=mask)
    return mask.nonzero(as_tuple=True)


def _signs_at(ps: torch.Tensor, s: torch.Tensor, sgn: torch.Tensor, work: Workspace | None) -> torch.Tensor:
    """`[n, V]`: `sgn` (the sign at each ascending sorted position of `s`, the sorted `ps`) carried back
    to the entries of `ps` (module doc). The result may be a `work` buffer."""
    n, V = ps.shape
    dev = ps.device
    r, j = _nonzero_2d(sgn[:, 1:], sgn[:, :-1], "ne", work)  # a new segment starts at position j + 1
    th = s[r, j + 1]  # [M] the first value of each new segment
    m_row = torch.bincount(r, minlength=n)
    seg_base = torch.cumsum(m_row + 1, 0) - (m_row + 1)  # row r's segments: seg_base[r] + 0 .. m_row[r]
    seg_sign = torch.empty(r.shape[0] + n, dtype=sgn.dtype, device=dev)
    seg_sign[seg_base] = sgn[:, 0]
    k = torch.arange(r.shape[0], device=dev) - (torch.cumsum(m_row, 0) - m_row)[r]  # rank of a change in its row
    seg_sign[seg_base[r] + k + 1] = sgn[r, j + 1]

    # per (row, bucket): the number of change points in lower buckets, 2 where the bucket holds one
    tk, nb = _table_keys(th[:, None], None, "")
    flat_t = r * nb + tk[:, 0].to(torch.int64)
    cnt = torch.zeros(n * nb, dtype=torch.int64, device=dev).index_add_(0, flat_t, torch.ones_like(flat_t))
    cnt = cnt.view(n, nb)
    below = torch.cumsum(cnt, 1).sub_(cnt).add_(seg_base[:, None])
    table = seg_sign[below.view(-1)]
    table.masked_fill_(cnt.view(-1) > 0, 2.0)
    keys, _ = _table_keys(ps, work, "keys", nb)
    out = _get(work, "sigma", (n, V), sgn.dtype, dev)
    torch.index_select(table, 0, keys.view(-1), out=out.view(-1))
    fr, fc = _nonzero_2d(out, 2.0, "eq", work)
    if fr.numel():
        v = ps[fr, fc]
        first = torch.cumsum(m_row, 0) - m_row  # row r's change points: th[first[r] : first[r] + m_row[r]]
        if ps.dtype == torch.float32:  # one binary search: (row, value bits) packed in an int64, monotone
            def packed(rows, vals):
                return (rows << 32) | torch.bitwise_and(vals.view(torch.int32), 0x7FFFFFFF).to(torch.int64)

            counts = torch.searchsorted(packed(r, th), packed(fr, v), right=True) - first[fr]
            counts = torch.minimum(counts.clamp_(min=0), m_row[fr])
        else:
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


def sorted_l1_signs(ps: torch.Tensor, pt: torch.Tensor, want_sign: bool = True, tail_cut: int | None = None, *,
                    work: Workspace | None = None, overwrite_t: bool = False):
    """`(l1 [n], sigma [n, V_s] or None)`: the sorted-vector L1 between the rows of `ps [n, V_s]` and
    `pt [n, V_t]` (non-negative; the shorter side zero-padded; with `tail_cut`, the `min(tail_cut,
    width)` largest entries of each side only) and its gradient with respect to `ps` (module doc).
    Not differentiable itself (it is the building block of `sorted_l1` and of the hand-written
    "start" chunk form); a host sync for the change points. With `work`, temporaries (and `sigma`)
    live in its buffers; with `overwrite_t`, `pt` is sorted in place (its values are lost)."""
    if tail_cut is not None and tail_cut < max(ps.shape[1], pt.shape[1]):
        l1, s, sgn = sorted_l1_parts(ps, pt, tail_cut)
        return l1, sorted_l1_grad(ps, s, sgn) if want_sign else None
    n, vs = ps.shape
    vt = pt.shape[1]
    if vs == 0:
        return pt.sum(dim=1).to(ps.dtype), ps.clone() if want_sign else None
    s = _get(work, "sorted_s", ps.shape, ps.dtype, ps.device)
    s.copy_(ps)
    if overwrite_t and pt.dtype == ps.dtype and pt.is_contiguous():
        t = pt
    else:
        t = _get(work, "sorted_t", pt.shape, ps.dtype, ps.device)
        t.copy_(pt)
    _sort_rows_([s, t])
    w0 = min(vs, vt)
    s_al, t_al = s[:, vs - w0:], t[:, vt - w0:]  # ascending, aligned at the largest entries
    head = s[:, : vs - w0].sum(dim=1) + t[:, : vt - w0].sum(dim=1)  # the other side's zero padding
    diff = torch.sub(s_al, t_al, out=t_al)  # t is not needed again
    l1 = torch.abs(diff, out=_get(work, "abs", diff.shape, diff.dtype, diff.device)).sum(dim=1) + head
    if not want_sign:
        return l1, None
    sgn = diff.sign_()
    if vs > w0:  # the student's smallest entries meet the teacher's zero padding
        sgn = torch.cat([torch.sign(s[:, : vs - w0]), sgn], dim=1)
    return l1, _signs_at(ps, s, sgn, work)


# --------------------------------------------------------------------------------------------------
# The tail-cut path (largest entries only) and the autograd wrapper


def _sort_desc(x: torch.Tensor, keep: int | None) -> torch.Tensor:
    """Rows of `x` sorted descending (values only), the first `keep` of them (None: all)."""
    if keep is not None and keep < x.shape[1]:
        return torch.topk(x.detach(), keep, dim=1, sorted=True).values
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
