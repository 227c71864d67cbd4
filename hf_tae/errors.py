"""The library's exception type."""


class TaeError(ValueError):
    """A bad input or inconsistent artifact; the message names the input and the fix.

    Subclasses :class:`ValueError` so callers that already catch ``ValueError`` keep working.
    """
