"""Shared machinery of the memory-bounded losses.

Every loss here is a sum over rows (positions) of a function of one row's softmax, so it processes
rows in chunks and computes the gradient with respect to the logits *in the forward pass*, chunk by
chunk, into one buffer the size of the logits (the "their gradient" that any loss must write). The
backward only scales that buffer by the upstream gradient. Peak extra memory is a few `[n, V]`
chunk temporaries, whatever the number of positions (the Liger-Kernel approach).

Arithmetic runs in float32 (float64 when the inputs are float64); the gradient buffer has the
logits' dtype.
"""

from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

from xtoken_core.errors import LossOptionError
from xtoken_loss.checks import DeferredNormalizer, poison

# Elements per chunk temporary when the caller does not pick a position chunk size: 2**23 float32
# values = 32 MiB, 65 rows of a 128k vocabulary (fewer, larger steps mean fewer thread barriers).
DEFAULT_CHUNK_ELEMENTS = 1 << 23


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def rows_per_chunk(position_chunk_size: int | None, width: int) -> int:
    if position_chunk_size is None:
        return max(1, DEFAULT_CHUNK_ELEMENTS // max(width, 1))
    if not isinstance(position_chunk_size, int) or position_chunk_size < 1:
        raise LossOptionError(f"position_chunk_size must be a positive integer or None, got {position_chunk_size!r}")
    return position_chunk_size


_CHECKED: dict = {}
_PLAIN = (bool, int, float, str)


def check_options(options_type, **values):
    """`options_type(**values)` (a loss's options config: validated when built, raising
    `LossOptionError`), remembered for plain values so a training loop's repeated calls skip the
    validation (a dict lookup instead of building the config)."""
    if not all(v is None or type(v) in _PLAIN for v in values.values()):
        return options_type(**values)  # an object (a tensor of boundary ids): build it every time
    key = (options_type, tuple((k, type(v), v) for k, v in values.items()))
    hit = _CHECKED.get(key)
    if hit is None:
        hit = options_type(**values)
        if len(_CHECKED) >= 1024:
            _CHECKED.clear()
        _CHECKED[key] = hit
    return hit


def check_choice(name: str, value, choices) -> None:
    if value not in choices:
        raise LossOptionError(f"{name}={value!r}: valid values are {', '.join(map(repr, choices))}")


def softmax_rows(z: torch.Tensor, temperature: float, out: torch.Tensor | None = None):
    """Row softmax of `z / temperature` in the compute dtype, safe for rows that are all -inf
    (they give p = 0 and lse = -inf, never NaN). Returns `(p [n, V], lse [n])`; `out`, when given,
    is used as the buffer for p (it may be the gradient buffer's slice)."""
    cdt = compute_dtype(z.dtype)
    mx = z.amax(dim=1).to(cdt)  # [n]
    mx = torch.where(torch.isfinite(mx), mx, torch.zeros_like(mx))
    if out is None:
        out = torch.empty(z.shape, dtype=cdt, device=z.device)
    torch.sub(z, mx[:, None], out=out)
    if temperature != 1.0:
        out.div_(temperature)
    out.exp_()
    s = out.sum(dim=1)  # [n]
    out.mul_(torch.where(s > 0, 1.0 / s, torch.zeros_like(s))[:, None])
    lse = mx / temperature + torch.log(s)
    return out, lse


class PrecomputedGrad(torch.autograd.Function):
    """Attach a gradient computed in the forward pass to `loss`: backward returns
    `grad_logits * grad_output` (in place when grad_output is not 1)."""

    @staticmethod
    def forward(ctx, logits, loss, grad_logits):
        ctx.save_for_backward(grad_logits)
        return loss.detach().clone()

    @staticmethod
    @once_differentiable  # second derivatives are not provided: raise instead of returning zeros
    def backward(ctx, grad_output):
        (grad,) = ctx.saved_tensors
        if not torch.equal(grad_output, torch.ones_like(grad_output)):
            grad = grad.mul_(grad_output.to(grad.dtype))
        return grad, None, None


def attach_grad(logits: torch.Tensor, loss: torch.Tensor, grad: torch.Tensor | None) -> torch.Tensor:
    """`loss` carrying the precomputed `grad` (the logits' shape) for the backward.

    A reshaped view of a whole buffer (the losses fill `[B * T, V]` views) is replaced by the
    buffer itself: autograd adds a second gradient for the same logits (several losses on one
    student) into a first one in place only when that first one is no view, else it allocates and
    writes a new logits-sized tensor."""
    if grad is None:
        return loss
    base = grad._base
    if (base is not None and base.shape == logits.shape and base.is_contiguous() and grad.is_contiguous()
            and base.data_ptr() == grad.data_ptr() and base.dtype == grad.dtype):
        grad = base
    elif grad.shape != logits.shape:
        grad = grad.view(logits.shape)
    return PrecomputedGrad.apply(logits, loss, grad)


def unit_result(student_logits: torch.Tensor, total: torch.Tensor, norm: torch.Tensor, sums: dict, units, bad,
                grad: torch.Tensor | None):
    """The `(loss, metrics)` of a chunk-unit loss (CONTRACTS §5): `total / norm` with the precomputed
    gradient `grad [B * T, V]` (None: none wanted) attached, and each metric sum divided by the
    number of valid units (`units.num_units`, at least 1); all NaN when `bad` (`checks.poison`)."""
    count = units.num_units.to(total.dtype).clamp_min(1)
    metrics = {k: poison((v / count).detach(), bad) for k, v in sums.items()}
    loss = poison(total / norm, bad)
    return attach_grad(student_logits, loss, None if grad is None else grad.view(student_logits.shape)), metrics


def needs_grad(logits: torch.Tensor) -> bool:
    return torch.is_grad_enabled() and logits.requires_grad


def resolve_normalizer(normalizer, num_units: torch.Tensor, cdt) -> torch.Tensor:
    """The loss divisor: the caller's (e.g. a global count under data parallelism), else the local
    count of valid units, at least 1 (an all-masked batch gives 0 / 1 = 0). NaN when the entry
    checks deferred a bad-input flag (`checks.DeferredNormalizer`) or, on an accelerator (where it
    is not read), the normaliser is not > 0."""
    if isinstance(normalizer, DeferredNormalizer):
        return poison(num_units.to(cdt).clamp_min(1.0), normalizer.bad)
    if normalizer is None:
        return num_units.to(cdt).clamp_min(1.0)
    n = torch.as_tensor(normalizer, dtype=cdt, device=num_units.device)
    return poison(n, ~(n > 0)) if n.device.type != "cpu" else n


def shift_rows(z: torch.Tensor, temperature: float, out: torch.Tensor):
    """`out = (z - m) / temperature` row-wise in `out`'s dtype, with m the row maximum (0 where it is
    not finite): the log of the unnormalised softmax, <= 0 on finite rows, never underflowing.
    Returns `(out, row_max)` with the *raw* row maxima (NaN or +-inf where the row holds NaN or +inf
    or is all -inf) for `checks.nonfinite`. `out` may be a slice of the gradient buffer.
    Softmax = exp(out) / sum(exp(out)); lse = m / T + log(sum(exp(out)))."""
    mx = z.amax(dim=1).to(out.dtype)
    safe = torch.where(torch.isfinite(mx), mx, torch.zeros_like(mx))
    torch.sub(z, safe[:, None], out=out)
    if temperature != 1.0:
        out.div_(temperature)
    return out, mx


def safe_logsumexp(x: torch.Tensor, dim: int) -> torch.Tensor:
    """`logsumexp(x, dim)` whose gradient is finite also where every entry is -inf (value -inf,
    gradient 0): the shift is the detached maximum, the log guarded. Differentiable."""
    m = x.detach().amax(dim=dim, keepdim=True)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    s = torch.exp(x - m).sum(dim=dim)
    pos = s > 0
    return torch.where(pos, torch.log(torch.where(pos, s, torch.ones_like(s))) + m.squeeze(dim),
                       torch.full_like(s, float("-inf")))


def log_divergence(log_a: torch.Tensor, log_p: torch.Tensor, direction: str):
    """KL in log space between the teacher distribution `exp(log_p) [n, m]`
    (normalised) and the student's `a / sum(a)` given as `log_a [n, m]` (unnormalised log-masses).

    Returns `(kl [n], log_q [n, m], g [n, m])`: `log_q = log_a - logsumexp(log_a)` and the gradient
    `g = d kl / d log_a` (it sums to 0 over each row): `Q - P` (forward), `Q (log Q - log P - kl)`
    (reverse). Nothing is exponentiated that can overflow and no probability is logged, so tiny masses
    keep their full precision. Zeros are exact: a teacher outcome of probability 0 adds nothing to the
    forward KL, a student outcome of mass 0 nothing to the reverse; mass on one side where the other
    has none gives +inf, the true value."""
    log_m = torch.logsumexp(log_a, dim=1)
    log_q = log_a - log_m[:, None]
    q = torch.exp(log_q)
    if direction == "forward":
        p = torch.exp(log_p)
        kl = torch.where(p > 0, p * (log_p - log_q), torch.zeros_like(p)).sum(dim=1)
        return kl, log_q, q - p
    ell = torch.where(q > 0, log_q - log_p, torch.zeros_like(q))
    kl = (q * ell).sum(dim=1)
    return kl, log_q, q * (ell - kl[:, None])
