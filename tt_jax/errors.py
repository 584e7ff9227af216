"""The base class of the errors that mean "the input is wrong", not "the code is wrong".

Entry points catch it and exit with its message and a non-zero status instead of a traceback.
"""


class UserInputError(ValueError):
    """A config, file or array that cannot be used as given; the message says what to change."""


def list_some(items, limit: int = 10) -> str:
    """`items` for an error message: the first `limit` of them, and how many there are in all."""
    items = list(items)
    shown = ", ".join(repr(item) for item in items[:limit])
    more = f", ... ({len(items)} in all)" if len(items) > limit else ""
    return f"[{shown}{more}]"
