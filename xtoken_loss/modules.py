"""The one `nn.Module` base of every loss module: the module holds the options, the function holds the math.

A concrete module lives beside its function in `xtoken_loss/losses/<kind>.py` (the registry,
`xtoken_loss.registry`, points at it) and only declares `function`, `options_type` and an
`__init__` with the function's keyword options (same names, same defaults):

    forward(student_logits, teacher_outputs, batch, *, normalizer=None) -> (loss, metrics)

has the function's argument order and return type. Options are validated when the module is built
(through the loss's options config, the same check the function runs on every call).

Artifacts (a `Projection`, a `CommonSet`: frozen dataclasses of tensors) are registered with
`register_artifact`: their tensors become *non-persistent* buffers, so `.to(device)`, `.cuda()` and
DDP move them with the module, while `state_dict()` leaves them out (an artifact is identified by
its fingerprints and loaded from its directory, it is not model state). A dtype change
(`.half()`, `.to(torch.float64)`) leaves artifact tensors in their own dtype; only the device moves.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, ClassVar

import torch
from torch import nn

from xtoken_core.config import Config, fields_of


class LossModule(nn.Module):
    """Base of every loss module (module doc). Subclasses set `function` (as a `staticmethod`) and
    `options_type`, and pass their keyword options to `super().__init__(**options)`; artifacts are
    added with `register_artifact(name, value)` and passed to the function under `name`."""

    function: ClassVar[Callable]
    options_type: ClassVar[type[Config] | None] = None

    def __init__(self, **options: Any):
        super().__init__()
        if self.options_type is not None:
            names = {f.name for f in fields_of(self.options_type)}
            self.options_type(**{k: v for k, v in options.items() if k in names})  # validate once, here
        self.options = options
        self._artifacts: dict[str, tuple[Any, tuple[str, ...]]] = {}

    # artifacts ------------------------------------------------------------------------------------

    def register_artifact(self, name: str, value) -> None:
        """Keep `value` (a dataclass holding tensors, or None) as artifact `name`: its tensor fields
        become non-persistent buffers `{name}_{field}`."""
        if value is None:
            self._artifacts[name] = (None, ())
            return
        keys = tuple(f.name for f in dataclasses.fields(value) if isinstance(getattr(value, f.name), torch.Tensor))
        for k in keys:
            self.register_buffer(f"{name}_{k}", getattr(value, k), persistent=False)
        self._artifacts[name] = (value, keys)

    def artifact(self, name: str):
        """Artifact `name` rebuilt around the current buffers (the same object while they are unchanged)."""
        value, keys = self._artifacts[name]
        if value is None or all(getattr(self, f"{name}_{k}") is getattr(value, k) for k in keys):
            return value
        value = dataclasses.replace(value, **{k: getattr(self, f"{name}_{k}") for k in keys})
        self._artifacts[name] = (value, keys)
        return value

    def _apply(self, fn, recurse=True):
        # artifact buffers follow the module's device, never its dtype (indices, weights stay exact)
        saved = {}
        for name, (value, keys) in self._artifacts.items():
            for k in keys:
                b = f"{name}_{k}"
                saved[b] = self._buffers.pop(b)
        try:
            out = super()._apply(fn, recurse)
        finally:
            for b, t in saved.items():
                device = fn(torch.empty(0, device=t.device)).device
                self._buffers[b] = t if t.device == device else t.to(device)
        return out

    # the call ---------------------------------------------------------------------------------------

    def artifacts_on(self, device) -> dict:
        """Every artifact, its buffers first moved to `device` if they live elsewhere (a module never
        moved with `.to()` follows its logits on first use, as `Projection`s passed to functions do)."""
        device = torch.device(device)
        for name, (_value, keys) in self._artifacts.items():
            for k in keys:
                b = f"{name}_{k}"
                if self._buffers[b].device != device:
                    self._buffers[b] = self._buffers[b].to(device)
        return {name: self.artifact(name) for name in self._artifacts}

    def forward(self, student_logits: torch.Tensor, teacher_outputs, batch: dict, *, normalizer=None):
        artifacts = self.artifacts_on(student_logits.device)
        return type(self).function(student_logits, teacher_outputs, batch, normalizer=normalizer, **artifacts,
                                   **self.options)

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.options.items())


def __getattr__(name: str):
    # the concrete modules' historical home (`from xtoken_loss.modules import PKLLoss`)
    from xtoken_loss import registry

    for spec in registry.REGISTRY.values():
        if spec.module.__name__ == name:
            return spec.module
    if name in registry.VARIANT_MODULES:
        return registry.VARIANT_MODULES[name]
    if name == "KDCELoss":
        from xtoken_loss.losses.combine import KDCELoss

        return KDCELoss
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
