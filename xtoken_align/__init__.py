"""xtoken_align: canonical token bytes, tokenizer overlap, chunk alignment and sparse projections.

The flow, one module a step: `tokenizer` (load any tokenizer into canonical token bytes) ->
`overlap` (vocabulary statistics) -> alignment -> projection -> artifacts.
"""

from xtoken_core.errors import AlignmentError, ArtifactError, TokenizerLoadError, XTokenError
from xtoken_align.tokenizer.loader import TokenizerInfo, load_tokenizer

from xtoken_core import __version__  # noqa: E402  (one place: the installed metadata)

__all__ = [
    "AlignmentError",
    "ArtifactError",
    "TokenizerInfo",
    "TokenizerLoadError",
    "XTokenError",
    "__version__",
    "load_tokenizer",
]
