"""xtoken_align: canonical token bytes, tokenizer overlap, chunk alignment and sparse projections.

The flow, one room a stage: `tokenizer` (load any tokenizer into canonical token bytes, overlap
statistics) -> `alignment` (chunks between two tokenizations) -> `batch` (the CONTRACTS §2
training batch) -> `projection` (the sparse student -> teacher matrix and its artifact).

The names the README uses are importable from here:

    from xtoken_align import CollateConfig, ProjectionConfig, build_projection, collate, load_tokenizer
"""

from xtoken_align.tokenizer.loader import TokenizerInfo, load_tokenizer
from xtoken_core import __version__
from xtoken_core.errors import AlignmentError, ArtifactError, TokenizerLoadError, XTokenError

# The batch and projection stages load torch, numba and scipy (about 2 s and 250 MB); they are
# imported on first use, so `import xtoken_align` (and every submodule, which runs this file first)
# stays as light as the tokenizer stage.
_LAZY = {
    "AlignmentCollator": "xtoken_align.batch.collate",
    "CollateConfig": "xtoken_align.batch.collate",
    "collate": "xtoken_align.batch.collate",
    "ProjectionConfig": "xtoken_align.projection.builder",
    "build_projection": "xtoken_align.projection.builder",
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'xtoken_align' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_LAZY))


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
