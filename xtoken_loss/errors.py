"""The loss package's exception types: one base class, one subclass per area.

Anything a caller can cause (an artifact built for other tokenizers, tensors of mismatched shapes, an
unknown option string, NaN inputs when input checking is on) raises one of these, before any
computation, with a message saying what failed and how to fix it.
"""


class XTokenLossError(Exception):
    """Base class of every error `xtoken_loss` raises on purpose."""


class ProjectionArtifactError(XTokenLossError):
    """A projection artifact is missing, malformed, of another schema version or direction, or was
    built for other tokenizers (fingerprint mismatch)."""


class LossInputError(XTokenLossError):
    """A loss got inputs it cannot use: mismatched shapes, missing batch keys, NaN values (with
    `check_inputs=True`), or a logits width that does not fit the projection."""


class LossOptionError(XTokenLossError, ValueError):
    """An option has an invalid value (the message lists the valid ones)."""
