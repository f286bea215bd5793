"""The package's exception types: one base class, one subclass per area.

Anything a user can cause (a bad path, a tokenizer that cannot be read, a mismatched artifact)
raises one of these with a one-line message saying what failed and how to fix it; the CLI turns
them into `error: <message>` and exit code 2, without a traceback.
"""


class XTokenError(Exception):
    """Base class of every error xtoken raises on purpose."""


class TokenizerLoadError(XTokenError):
    """A tokenizer could not be found, read or understood."""


class ArtifactError(XTokenError):
    """An artifact (projection, alignment) is missing, malformed, of another schema version, or was
    built for other tokenizers."""


class AlignmentError(XTokenError):
    """Two tokenizations could not be aligned (and no documented fallback applies)."""
