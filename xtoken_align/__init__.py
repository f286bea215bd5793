"""xtoken_align: canonical token bytes, tokenizer overlap, chunk alignment and sparse projections.

The flow, one room a stage: `tokenizer` (load any tokenizer into canonical token bytes, overlap
statistics) -> `alignment` (chunks between two tokenizations) -> `batch` (the CONTRACTS §2
training batch) -> `projection` (the sparse student -> teacher matrix and its artifact).

The names the README uses are importable from here:

    from xtoken_align import CollateConfig, ProjectionConfig, build_projection, collate, load_tokenizer
"""

from xtoken_align.batch.collate import AlignmentCollator, CollateConfig, collate
from xtoken_align.projection.builder import ProjectionConfig, build_projection
from xtoken_align.tokenizer.loader import TokenizerInfo, load_tokenizer
from xtoken_core import __version__
from xtoken_core.errors import AlignmentError, ArtifactError, TokenizerLoadError, XTokenError

__all__ = [
    "AlignmentCollator",
    "AlignmentError",
    "ArtifactError",
    "CollateConfig",
    "ProjectionConfig",
    "TokenizerInfo",
    "TokenizerLoadError",
    "XTokenError",
    "__version__",
    "build_projection",
    "collate",
    "load_tokenizer",
]
