"""xtoken_align: canonical token bytes, tokenizer overlap, chunk alignment and sparse projections.

The flow, one module a step: `tokenizer` (load any tokenizer into canonical token bytes) ->
`overlap` (vocabulary statistics) -> alignment -> projection -> artifacts.
"""

from xtoken_align.errors import AlignmentError, ArtifactError, TokenizerLoadError, XTokenError
from xtoken_align.tokenizer import TokenizerInfo, load_tokenizer

__version__ = "0.1.0"

__all__ = [
    "AlignmentError",
    "ArtifactError",
    "TokenizerInfo",
    "TokenizerLoadError",
    "XTokenError",
    "__version__",
    "load_tokenizer",
]
