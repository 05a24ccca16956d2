"""The one exception type for user mistakes: the CLI prints its message on one line and exits 2."""


class UserError(Exception):
    """Bad input from the user (file, field, value); the message says what and how to fix it."""


def first_line(e: BaseException) -> str:
    """The one short one-line description of an exception, for UserError messages (torch's long messages cut at
    their first sentence; an empty EOFError is "the file is empty or truncated")."""
    text = str(e).strip().split("  (Could this error message be improved")[0]
    line = text.splitlines()[0][:160] if text else ""
    if not line and isinstance(e, EOFError):
        line = "the file is empty or truncated"
    return f"{type(e).__name__}: {line}" if line else type(e).__name__
