"""The one exception type for bad input: a file, key or field the user can fix.

`tlops` prints a `UserError` as a single line (`tlops: error: <message>`), with no traceback,
and exits non-zero. Every other exception is a programming error and keeps its traceback.
A message names the file, key or field and says what to do.
"""

from __future__ import annotations


class UserError(Exception):
    """Bad input or configuration; the message alone is the report."""
