"""Package-level promises: the loss library stands alone; every loss kind name is served."""

from __future__ import annotations

import subprocess
import sys


def test_xtoken_loss_never_imports_xtoken_align():
    code = ("import sys, xtoken_loss, xtoken_loss.multi_teacher.aggregate, xtoken_loss.losses.learned_pkl; "
            "print(sorted(m for m in sys.modules if m.startswith('xtoken_align')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_every_contract_loss_kind_is_registered():
    import xtoken_loss

    assert set(xtoken_loss.LOSSES) == {"pkl", "hkl", "gold", "uld", "alm", "kl", "ce"}
    for fn in xtoken_loss.LOSSES.values():
        assert callable(fn)


def test_cli_help_lists_the_commands():
    from click.testing import CliRunner

    from xtoken_cli.main import align_cli

    result = CliRunner().invoke(align_cli, ["--help"])
    assert result.exit_code == 0
    for command in ("overlap-report", "align", "build-projection", "inspect"):
        assert command in result.output


def test_xtoken_align_exports_what_the_readme_uses():
    from pathlib import Path

    import xtoken_align

    assert xtoken_align.__all__ == sorted(xtoken_align.__all__)
    for name in ("load_tokenizer", "TokenizerInfo", "AlignmentCollator", "collate", "CollateConfig",
                 "build_projection", "ProjectionConfig", "AlignmentError", "ArtifactError", "TokenizerLoadError",
                 "XTokenError", "__version__"):
        assert name in xtoken_align.__all__ and getattr(xtoken_align, name) is not None
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text(encoding="utf-8")
    imported = [line for line in readme.splitlines() if line.startswith("from xtoken_align import ")]
    assert imported
    for line in imported:
        for name in line.removeprefix("from xtoken_align import ").split(", "):
            assert name in xtoken_align.__all__, name
