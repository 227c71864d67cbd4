"""Name patterns shared by every parameter selection (gradient capture, merge statistics,
lifted scoring): a pattern matches a name as a substring or as a regular expression."""

from __future__ import annotations

import re
from collections.abc import Sequence

from hf_tae.errors import TaeError

#: Compiled patterns: ``(text, regex)`` pairs as :func:`compile_patterns` returns them.
Patterns = list[tuple[str, re.Pattern]]


def compile_patterns(label: str, patterns: str | Sequence[str] | None) -> Patterns:
    """``patterns`` (one, several or None) compiled; a bad regex names ``label`` and the fix."""
    if patterns is None:
        return []
    if isinstance(patterns, str):
        patterns = [patterns]
    compiled = []
    for pattern in patterns:
        try:
            compiled.append((pattern, re.compile(pattern)))
        except re.error as err:
            raise TaeError(
                f"{label} pattern {pattern!r} is not a valid regular expression ({err}); escape it "
                "with re.escape or pass a plain substring."
            ) from err
    return compiled


def matches_any(name: str, patterns: Patterns) -> bool:
    """Whether ``name`` contains a pattern's text or matches its regex (``re.search``)."""
    return any(text in name or regex.search(name) for text, regex in patterns)
