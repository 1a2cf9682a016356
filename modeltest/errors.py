"""User-facing errors, and the one way an unexpected exception is shortened to a line.

A `UserError` carries one line that names the file, key or sample at fault and what to do about
it. The CLI prints it without a traceback and exits non-zero; anything else is a bug and keeps
its traceback.
"""


class UserError(Exception):
    """Bad input or configuration: printed as one line, no traceback."""


class SampleError(Exception):
    """A problem confined to one sample (missing image, corrupt video): recorded, run goes on.
    A transient one (a decode that timed out, a crashed worker) is computed again on resume."""

    transient = False


class Interrupted(Exception):
    """Ctrl-C during a run: finished samples are saved; the message says how to resume."""


def first_line(e: BaseException, limit: int = 300, with_type: bool = True) -> str:
    """`Type: first line of the message` (C++ traces from decord or torch are dozens of lines);
    with_type=False: the first line alone (the type name when there is no message)."""
    text = str(e).strip()
    if not text:
        return type(e).__name__
    line = text.splitlines()[0][:limit]
    return f"{type(e).__name__}: {line}" if with_type else line
