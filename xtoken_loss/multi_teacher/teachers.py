"""Teacher specifications for multi-teacher distillation (docs/multi_teacher.md).

A `TeacherSpec` says what one teacher is (name, tokenizer fingerprint and vocab size), how much it
counts (`weight`), which loss distils it (a CONTRACTS §5 kind name) and how its vocabulary relates to
the student's:
- a *same-vocab* teacher (loss `"kl"`) shares the student's tokenizer, needs no projection and
  no alignment, and reads the student's `input_ids`;
- a *cross-tokenizer* teacher (`"pkl"`, `"hkl"`, `"gold"`, `"uld"`, `"alm"`) reads the batch's
  `teacher_{i}_*` / `alignment_{i}_*` keys (i = its place in the teacher list); the
  projection-based kinds (`"pkl"`, `"hkl"`, `"gold"`) also need a projection artifact.

Everything a user can get wrong is checked when the spec is built, with a message naming the field.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from xtoken_core.errors import LossOptionError, ProjectionArtifactError
from xtoken_loss.projection import Projection, load_projection

TEACHER_LOSS_KINDS = ("pkl", "hkl", "gold", "uld", "alm", "kl")
SAME_VOCAB_KINDS = ("kl",)
PROJECTION_KINDS = ("pkl", "hkl", "gold")
COMMON_SET_KINDS = ("hkl", "gold")  # may take a precomputed `common` set instead of a projection
# Options the multi-teacher loss sets itself for each teacher; a spec must not set them.
RESERVED_OPTIONS = ("normalizer", "teacher_index", "projection", "sequence_weights")


@dataclass(frozen=True, kw_only=True)
class TeacherSpec:
    """One teacher of a multi-teacher run.

    name: a label for metrics and messages.
    loss: the loss kind distilling this teacher (`"pkl"`, `"hkl"`, `"gold"`, `"uld"`, `"alm"`, or
        `"kl"` for a same-vocab teacher).
    weight: static weight (>= 0, finite). With dynamic weights it is the prior the score softmax
        multiplies (docs/multi_teacher.md).
    fingerprint: the teacher tokenizer's fingerprint (`TokenizerInfo.fingerprint`), compared with
        the projection artifact and, for a same-vocab teacher, with the student's.
    vocab_size: the teacher tokenizer's vocab size (needed for vocab-size normalisation).
    projection: for `"pkl"`/`"hkl"`/`"gold"`: an artifact directory, or a loaded `Projection`
        (`"gold"` reads the exact rows from its `row_kind`); `"hkl"`/`"gold"` may instead get
        `loss_options={"common": ...}`. None for the other kinds.
    loss_options: keyword options passed to the loss function (temperature, direction, ...).
    loss_fn: a callable with the CONTRACTS §5 signature used instead of the kind's library
        function (for experiments and tests); the kind still decides the teacher's path.
    """

    name: str
    loss: str
    weight: float = 1.0
    fingerprint: str | None = None
    vocab_size: int | None = None
    projection: str | os.PathLike | Projection | None = None
    loss_options: Mapping[str, Any] = field(default_factory=dict)
    loss_fn: Callable | None = None

    def __post_init__(self):
        if not isinstance(self.name, str) or not self.name:
            raise LossOptionError(f"TeacherSpec.name must be a non-empty string, got {self.name!r}")
        who = f"teacher {self.name!r}"
        if self.loss == "ce":
            raise LossOptionError(
                f"{who}: TeacherSpec.loss='ce' uses no teacher; add the student CE with "
                "xtoken_loss.combine_losses and pick a KD kind here: " + ", ".join(map(repr, TEACHER_LOSS_KINDS))
            )
        if self.loss not in TEACHER_LOSS_KINDS:
            raise LossOptionError(
                f"{who}: TeacherSpec.loss={self.loss!r}: valid kinds are " + ", ".join(map(repr, TEACHER_LOSS_KINDS))
            )
        w = self.weight
        if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w) or w < 0:
            raise LossOptionError(f"{who}: TeacherSpec.weight must be a finite number >= 0, got {w!r}")
        if self.fingerprint is not None and not isinstance(self.fingerprint, str):
            raise LossOptionError(f"{who}: TeacherSpec.fingerprint must be a string (e.g. 'sha256:...') or None")
        if self.vocab_size is not None and (
            isinstance(self.vocab_size, bool) or not isinstance(self.vocab_size, int) or self.vocab_size < 2
        ):
            raise LossOptionError(
                f"{who}: TeacherSpec.vocab_size must be an integer >= 2 or None, got {self.vocab_size!r}"
            )
        if self.loss in PROJECTION_KINDS and self.projection is None and not (
            self.loss in COMMON_SET_KINDS and "common" in self.loss_options
        ):
            raise LossOptionError(
                f"{who}: TeacherSpec.projection is required for loss {self.loss!r} (a cross-tokenizer teacher); "
                "pass the artifact directory from `xtoken-align build-projection` or a loaded Projection"
                + (" (or loss_options={'common': ...})" if self.loss in COMMON_SET_KINDS else "")
            )
        if self.loss not in PROJECTION_KINDS and self.projection is not None:
            why = "a same-vocab teacher needs no projection" if self.loss in SAME_VOCAB_KINDS else (
                f"loss {self.loss!r} does not use one")
            raise LossOptionError(f"{who}: TeacherSpec.projection must be None for loss {self.loss!r} ({why})")
        if self.projection is not None and not isinstance(self.projection, (str, os.PathLike, Projection)):
            raise LossOptionError(
                f"{who}: TeacherSpec.projection must be an artifact directory or a Projection, "
                f"got {type(self.projection).__name__}"
            )
        if not isinstance(self.loss_options, Mapping):
            raise LossOptionError(f"{who}: TeacherSpec.loss_options must be a mapping of keyword options")
        bad = sorted(set(self.loss_options) & set(RESERVED_OPTIONS))
        if bad:
            raise LossOptionError(
                f"{who}: TeacherSpec.loss_options must not set {', '.join(map(repr, bad))}: the multi-teacher loss "
                "sets it per teacher (pass normalizers to the multi-teacher call instead)"
            )
        if self.loss_fn is not None and not callable(self.loss_fn):
            raise LossOptionError(f"{who}: TeacherSpec.loss_fn must be callable or None")

    @property
    def is_same_vocab(self) -> bool:
        """True for a teacher sharing the student's tokenizer (per-position path, no alignment)."""
        return self.loss in SAME_VOCAB_KINDS

    @property
    def needs_projection(self) -> bool:
        return self.loss in PROJECTION_KINDS

    def load_projection(self, *, student_fingerprint: str | None = None, device=None) -> Projection | None:
        """The teacher's projection (None when its loss uses none), loaded and checked.

        An artifact directory is loaded with its fingerprints checked against `student_fingerprint`
        and this spec's `fingerprint` (when given); a loaded `Projection` is checked against the same
        strings through its metadata, when it has any. Its recorded teacher vocab size must equal
        `vocab_size` when both are known.
        """
        if self.projection is None:
            return None
        if isinstance(self.projection, Projection):
            proj = self.projection
            meta = proj.metadata or {}
            for side, fp in (("student", student_fingerprint), ("teacher", self.fingerprint)):
                recorded = (meta.get(side) or {}).get("fingerprint")
                if fp is not None and recorded is not None and str(recorded) != str(fp):
                    raise ProjectionArtifactError(
                        f"teacher {self.name!r}: its projection was built for {side} fingerprint {recorded!r}, "
                        f"but the {side} tokenizer in use has {fp!r}; rebuild the projection for these tokenizers"
                    )
            if device is not None:
                proj = proj.to(device)
        else:
            proj = load_projection(
                Path(self.projection),
                student_fingerprint=student_fingerprint,
                teacher_fingerprint=self.fingerprint,
                device=device,
            )
        recorded_vs = ((proj.metadata or {}).get("teacher") or {}).get("vocab_size")
        if self.vocab_size is not None and recorded_vs is not None and int(recorded_vs) != self.vocab_size:
            raise ProjectionArtifactError(
                f"teacher {self.name!r}: TeacherSpec.vocab_size is {self.vocab_size} but its projection records a "
                f"teacher vocab size of {recorded_vs}; fix vocab_size or rebuild the projection"
            )
        return proj


def build_teachers(
    *,
    names: Sequence[str],
    losses: Sequence[str],
    weights: Sequence[float] | None = None,
    fingerprints: Sequence[str | None] | None = None,
    vocab_sizes: Sequence[int | None] | None = None,
    projections: Sequence[Any] | None = None,
    loss_options: Sequence[Mapping[str, Any]] | None = None,
) -> list[TeacherSpec]:
    """`TeacherSpec`s from parallel lists (the shape configs and command lines use).

    Every list given must have one entry per name; a list of another length raises, naming it.
    """
    n = len(names)
    lists = {
        "losses": losses, "weights": weights, "fingerprints": fingerprints, "vocab_sizes": vocab_sizes,
        "projections": projections, "loss_options": loss_options,
    }
    for key, values in lists.items():
        if values is not None and len(values) != n:
            raise LossOptionError(
                f"build_teachers: {key} has {len(values)} entries but names has {n}; give one entry per teacher"
            )
    out = []
    for i in range(n):
        out.append(TeacherSpec(
            name=names[i],
            loss=losses[i],
            weight=1.0 if weights is None else weights[i],
            fingerprint=None if fingerprints is None else fingerprints[i],
            vocab_size=None if vocab_sizes is None else vocab_sizes[i],
            projection=None if projections is None else projections[i],
            loss_options={} if loss_options is None else dict(loss_options[i]),
        ))
    return out
