"""xtoken_core: what `xtoken_align` and `xtoken_loss` share, and nothing heavier than numpy.

- `errors`: the one exception root and its per-area subclasses.
- `artifact_format`: the on-disk artifact format (schema version, file names, row kinds, metadata
  and fingerprint checks, index/weight validation, the atomic directory writer).
- `config`: the keyword-only dataclass config design (validation, `to_dict` / `from_dict`).
- `fingerprints`: how a batch records its tokenizers (per-row fingerprint ids, CONTRACTS §2) and
  the process-wide fingerprint -> name table messages use.

It imports neither torch, numba nor scipy, so both packages can depend on it without pulling in
each other's dependencies.
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("xtoken")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0+unknown"

__all__ = ["__version__"]
