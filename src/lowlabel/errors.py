"""The one user-facing error type.

Anything the user can fix (a bad file, a bad config key, an impossible label budget) is raised as
:class:`LowlabelError` with a one-line message that names the file or key and the fix. The CLI
turns it into that line on stderr and exit status 2; every other exception is a bug and keeps its
traceback.
"""

from __future__ import annotations

EXIT_USAGE = 2
EXIT_INTERRUPTED = 130  # 128 + SIGINT, what a shell reports for a command stopped by Ctrl-C


class LowlabelError(Exception):
    """A problem with the user's input, reported as one line and exit status 2."""

    def __init__(self, message: str) -> None:
        super().__init__(" ".join(str(message).split()))


class Interrupted(Exception):
    """Ctrl-C stopped a long command; the message says how to continue (exit status 130).

    An ``Exception``, not a ``KeyboardInterrupt``: typer turns the latter into a bare exit code,
    which would lose the line that tells the user what to do next.
    """


def find_user_error(err: BaseException) -> LowlabelError | None:
    """The :class:`LowlabelError` behind ``err``, if any (MONAI wraps transform errors)."""
    seen = set()
    while err is not None and id(err) not in seen:
        if isinstance(err, LowlabelError):
            return err
        seen.add(id(err))
        err = err.__cause__ or err.__context__
    return None


def unwrap(transform, data):
    """Apply a MONAI transform, re-raising a user error from inside it as itself."""
    try:
        return transform(data)
    except Exception as err:
        user = find_user_error(err)
        if user is not None:
            raise LowlabelError(str(user)) from None
        raise
