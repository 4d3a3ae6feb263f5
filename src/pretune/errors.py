"""The one exception type for bad input.

The command line catches it, prints its message on one line and exits with
status 2; everything else is a bug and keeps its traceback.
"""


class PretuneError(Exception):
    """Bad input: what was wrong, where, and what to do about it."""

    def __init__(self, what: str, where: str | None = None, fix: str | None = None):
        parts = [what]
        if where:
            parts.append(f"({where})")
        msg = " ".join(parts)
        if fix:
            msg += f": {fix}"
        super().__init__(msg.replace("\n", " "))
