"""The project's exception types: one root, one subclass per area.

Anything a caller can cause (a bad path, a tokenizer that cannot be read, an artifact built for other
tokenizers, an invalid option, tensors a loss cannot use) raises a subclass of `XTokenError` with a
one-line message saying what failed and how to fix it. Each area's class also subclasses the
matching builtin (`ValueError` for bad values, `FileNotFoundError` for a missing file), so callers
that catch builtins keep working. The CLI turns every `XTokenError` into `error: <message>` and exit
code 2, without a traceback; anything else is a bug and keeps its traceback.

    XTokenError
    ├── ConfigError (ValueError)            an option or config field has an invalid value
    │   └── LossOptionError                 ... of a loss or of the multi-teacher loss
    ├── TokenizerLoadError (ValueError)     a tokenizer cannot be read or understood
    │   └── TokenizerNotFoundError (FileNotFoundError)
    ├── ArtifactError (ValueError)          an artifact is malformed, of another schema/pair
    │   └── ArtifactNotFoundError (FileNotFoundError)
    ├── AlignmentError (ValueError)         two tokenizations cannot be aligned
    ├── DataFileError (ValueError)          a user's text/JSONL/corpus file cannot be read or parsed
    │   └── DataFileNotFoundError (FileNotFoundError)
    ├── TrainerError                        the trainer (xtoken-train) cannot go on (data, state)
    └── XTokenLossError                     the loss library's own area
        ├── LossInputError (ValueError)     tensors or a batch a loss cannot use
        └── LossOptionError (also ConfigError)
"""


class XTokenError(Exception):
    """Root of every error xtoken raises on purpose."""


class ConfigError(XTokenError, ValueError):
    """A config field or option has an invalid value; the message names the field and the valid
    values."""


class TokenizerLoadError(XTokenError, ValueError):
    """A tokenizer could not be read or understood."""


class TokenizerNotFoundError(TokenizerLoadError, FileNotFoundError):
    """A tokenizer could not be found (no such path, fixture or reachable Hub name)."""


class ArtifactError(XTokenError, ValueError):
    """An artifact (projection, alignment) is malformed, of another schema version, or was built for
    other tokenizers."""


class ArtifactNotFoundError(ArtifactError, FileNotFoundError):
    """An artifact directory or one of its files is missing."""


class AlignmentError(XTokenError, ValueError):
    """Two tokenizations could not be aligned (and no documented fallback applies)."""


class DataFileError(XTokenError, ValueError):
    """A user's data file (text, JSON lines, corpus) cannot be read, decoded or parsed, or an output
    file cannot be written; the message names the file (and line)."""


class DataFileNotFoundError(DataFileError, FileNotFoundError):
    """A user's data file does not exist."""


class TrainerError(XTokenError):
    """The trainer cannot go on: data it cannot use (a token id outside a restricted vocabulary), a
    state that does not fit the run."""


class XTokenLossError(XTokenError):
    """Base of the loss library's errors."""


class LossInputError(XTokenLossError, ValueError):
    """A loss got inputs it cannot use: mismatched shapes, missing batch keys, NaN values (with
    `check_inputs=True`), or a logits width that does not fit the projection."""


class LossOptionError(XTokenLossError, ConfigError):
    """A loss option has an invalid value (the message lists the valid ones)."""


# The projection artifact has one format and so one error type; the loss library's historical name
# for it stays importable.
ProjectionArtifactError = ArtifactError
