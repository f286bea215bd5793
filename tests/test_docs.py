"""The docs name the project's own files, and those files exist.

- `docs/architecture.md`'s tree lists exactly the package modules on disk: every `*.py` under
  `xtoken_core/`, `xtoken_align/`, `xtoken_loss/` and `cli/` appears in it, and every file or folder it
  names exists.
- In `README.md` and `docs/*.md`, every relative link `](path)` and every backticked path into the
  repository (`docs/...`, `tests/...`, `benchmarks/...`, a package module, ...) points at an existing
  file; `tests/x.py::name` also needs `name` to be defined in that file. A backticked `name.md`
  is a sibling document.

The tree is read from the fenced code blocks of `docs/architecture.md` drawn with `├── ` / `└── `,
one entry per line, four characters of indentation per level (`│   ` or spaces), folders ending
in `/`, and anything after the name is a comment, as `tree` prints it:

    xtoken_loss/
    ├── __init__.py          the public API
    └── losses/
        └── pkl.py           P-KL

A top-level entry is a path from the repository root (`.` stands for the root itself).
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
PACKAGES = ("xtoken_core", "xtoken_align", "xtoken_loss", "cli")
# Top-level folders of the repository: a backticked path starting with one of these is ours.
REPO_FOLDERS = ("docs", "tests", "benchmarks", "scripts", "data", ".ci", *PACKAGES)

TREE_BRANCH = re.compile(r"(├── |└── )")


def _fenced_blocks(text: str) -> list[str]:
    return re.findall(r"^```[^\n]*\n(.*?)^```", text, flags=re.M | re.S)


def tree_entries(text: str) -> set[str]:
    """Repository-relative paths of every entry of the tree blocks (folders end in `/`)."""
    entries: set[str] = set()
    for block in _fenced_blocks(text):
        if not TREE_BRANCH.search(block):
            continue  # a data-flow diagram, not a file tree
        folders: list[str] = []  # folders[d]: the folder open at depth d
        shift = 0  # 1 when the tree is rooted at "."
        for raw in block.splitlines():
            line = raw.replace("\u00a0", " ").rstrip()
            branch = TREE_BRANCH.search(line)
            if branch:
                depth, name = branch.start() // 4 + 1, line[branch.end():].split()[0]
            elif line and not line[0].isspace() and line[0] != "│":
                depth, name = 0, line.split()[0]  # a root entry
            else:
                continue  # a blank line or a comment's continuation
            if depth == 0 and name in (".", "./"):
                shift = 1
                continue
            depth -= shift
            entries.add("".join(folders[:depth]) + name)
            if name.endswith("/"):
                del folders[depth:]
                folders.append(name)
    return entries


def package_modules() -> set[str]:
    return {p.relative_to(REPO).as_posix() for pkg in PACKAGES for p in (REPO / pkg).rglob("*.py")}


ARCHITECTURE = REPO / "docs" / "architecture.md"


def test_architecture_tree_lists_every_package_module():
    listed = tree_entries(ARCHITECTURE.read_text(encoding="utf-8"))
    missing = sorted(package_modules() - listed)
    assert not missing, f"docs/architecture.md's tree lacks these modules: {missing}"


def test_architecture_tree_names_only_existing_files():
    listed = tree_entries(ARCHITECTURE.read_text(encoding="utf-8"))
    assert listed, "docs/architecture.md has no file tree (a fenced block drawn with '├── ')"
    absent = sorted(p for p in listed if not (REPO / p.rstrip("/")).exists())
    assert not absent, f"docs/architecture.md's tree names files that do not exist: {absent}"


# --- links and paths ---------------------------------------------------------------------------

LINK = re.compile(r"\]\(([^)\s]+)\)")
BACKTICKED = re.compile(r"`([^`\s]+)`")


def _strip_code_blocks(text: str) -> str:
    return re.sub(r"^```.*?^```", "", text, flags=re.M | re.S)


def broken_references(doc: Path) -> list[str]:
    """Every relative link and backticked repository path of `doc` that does not resolve."""
    text = _strip_code_blocks(doc.read_text(encoding="utf-8"))
    broken = []
    for target in LINK.findall(text):
        if re.match(r"[a-z][a-z0-9+.-]*:", target) or target.startswith("#"):
            continue  # a URL or an anchor in the same page
        if not (doc.parent / target.split("#")[0]).exists():
            broken.append(f"link ]({target})")
    for token in BACKTICKED.findall(text):
        path, _, name = token.partition("::")
        if path.split("/")[0] in REPO_FOLDERS and "/" in path:
            file = REPO / path
            if not file.exists():
                broken.append(f"`{token}`")
            elif name and not re.search(rf"^\s*(def|class) {re.escape(name.split('[')[0])}\b",
                                        file.read_text(encoding="utf-8"), flags=re.M):
                broken.append(f"`{token}` ({name} is not defined there)")
        elif re.fullmatch(r"[A-Za-z0-9_\-]+\.md", path):
            if not (doc.parent / path).exists() and not (REPO / path).exists():
                broken.append(f"`{token}`")
    return broken


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.relative_to(REPO).as_posix())
def test_links_and_paths_point_at_existing_files(doc):
    broken = broken_references(doc)
    assert not broken, f"{doc.relative_to(REPO)} refers to files that do not exist: {broken}"


def test_docs_refer_to_the_projects_own_files():
    """No paths into the workspace outside the repository, no references to the domain brief that is
    not part of it (a public system is cited by name or URL)."""
    outside = re.compile(r"(/work/|\.\./shared|`shared/|\.\./\.\./|\bBRIEF\b)")
    offenders = [f"{doc.relative_to(REPO)}: {m.group(0)}" for doc in DOCS
                 for m in outside.finditer(doc.read_text(encoding="utf-8"))]
    assert not offenders, offenders
