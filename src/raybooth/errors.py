"""The one exception type for problems a user can fix."""


class RayboothError(Exception):
    """Bad input or an unmet precondition. The CLI prints the message as one line, no traceback."""
