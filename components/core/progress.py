"""Progress reporting seam: components count work, callers (CLI, flow) decide how to draw it."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from typing import Any

# A tqdm-like factory: progress(total=..., desc=..., unit=...) -> context manager with .update(n).
Progress = Callable[..., AbstractContextManager[Any]]


class _Silent:
    def update(self, n: int = 1) -> None: ...


def no_progress(**_: Any) -> AbstractContextManager[Any]:
    return nullcontext(_Silent())
