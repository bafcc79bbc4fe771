"""What a cached stage result depends on besides its params: its code, the libraries, the data.

Code is found, not listed: a stage's modules are its component and every project module that
component imports, transitively (read from the source with `ast`, nothing is imported). The
same list feeds `dvc.yaml`'s `deps` and the Prefect cache keys, so both runners agree on what a
code change invalidates.
"""

from __future__ import annotations

import ast
import hashlib
import importlib.metadata
from collections.abc import Iterable
from functools import cache
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PROJECT_PACKAGES = ("components", "tlops", "flows")


def module_file(name: str) -> Path | None:
    """The source file of a project module (`components.features.extract`), or None for anything else."""
    if name.split(".")[0] not in PROJECT_PACKAGES:
        return None
    base = ROOT.joinpath(*name.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def imported_modules(path: Path) -> set[str]:
    """Every module named by an import statement in `path` (at any depth: lazy imports count)."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)  # `from pkg import module`
    return names


# Wiring that imports every component: listed as a file where it is a dependency, never
# followed, or every stage would depend on every other stage's code.
NOT_FOLLOWED = ("tlops.config", "tlops.stages")


def holds_code(path: Path) -> bool:
    """False for an empty module or one that is only a docstring (a package's description is not its code)."""
    body = ast.parse(path.read_text()).body
    return bool(body) and not (len(body) == 1 and isinstance(body[0], ast.Expr)
                               and isinstance(getattr(body[0], "value", None), ast.Constant))


@cache
def project_modules(*roots: str) -> tuple[str, ...]:
    """The files (relative to the repo, sorted) of `roots` and every project module they import."""
    seen: dict[str, Path] = {}
    pending = list(roots)
    while pending:
        name = pending.pop()
        path = module_file(name)
        if path is None or name in seen:
            continue
        seen[name] = path
        if name not in NOT_FOLLOWED:
            pending.extend(imported_modules(path))
    files = {path for path in seen.values() if path.name != "__init__.py" or holds_code(path)}
    return tuple(sorted(str(p.relative_to(ROOT)) for p in files))


def code_hash(files: Iterable[str]) -> str:
    digest = hashlib.sha256()
    for name in sorted(files):
        digest.update(name.encode() + b"\0" + (ROOT / name).read_bytes() + b"\0")
    return digest.hexdigest()


@cache
def library_versions() -> tuple[tuple[str, str], ...]:
    """The version of every distribution tlops runs on: its requirements and theirs, transitively (extras and
    other platforms' markers left out). A library upgrade invalidates cached results; installing an unrelated
    tool (ipython, a linter) in the same environment does not."""
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    found: dict[str, str] = {}
    pending = ["tlops"]
    while pending:
        name = canonicalize_name(pending.pop())
        if name in found:
            continue
        try:
            distribution = importlib.metadata.distribution(name)
        except importlib.metadata.PackageNotFoundError:  # an optional dependency of a dependency, not installed
            continue
        found[name] = distribution.version
        for text in distribution.requires or []:
            requirement = Requirement(text)
            if requirement.marker is None or requirement.marker.evaluate({"extra": ""}):
                pending.append(requirement.name)
    found.pop("tlops", None)
    return tuple(sorted(found.items()))
