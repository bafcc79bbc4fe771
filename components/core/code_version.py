"""What code computed a cached value: the sha256 of its source text, so editing it misses the cache.

Cache keys (features, cached activations, INT8 twins, teacher logits) hash the source of the
modules and functions that compute a value rather than carry a hand-bumped version: a change to
that code always invalidates what it computed, and nothing else does.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import inspect
from collections.abc import Iterable, Sequence
from typing import Any


def source_sha256(objects: Sequence[Any]) -> dict[str, str]:
    """sha256 of each object's source text (a module, class or function), by qualified name."""
    hashes = {}
    for obj in objects:
        name = obj.__name__ if inspect.ismodule(obj) else f"{obj.__module__}.{obj.__qualname__}"
        hashes[name] = hashlib.sha256(inspect.getsource(obj).encode()).hexdigest()
    return hashes


def package_versions(names: Iterable[str]) -> dict[str, str]:
    """The installed version of each distribution named (those whose arithmetic ends up in a cached value)."""
    return {name: importlib.metadata.version(name) for name in names}
