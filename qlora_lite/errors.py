"""One exception type for bad input: the CLI prints its message, no traceback."""


class QloraError(ValueError):
    """Input that cannot be used; the message names the thing and the fix."""
