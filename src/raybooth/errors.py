"""The one exception type for problems a user can fix."""


class RayboothError(Exception):
    """Bad input or an unmet precondition. The CLI prints the message as one line, no traceback."""


def first_line(error: BaseException) -> str:
    """An error's first line of text, for a one-line report (its type's name where it has none)."""
    return next((line.strip() for line in str(error).splitlines() if line.strip()), type(error).__name__)
