"""User-facing errors.

A `UserError` carries one line that names the file, key or sample at fault and what to do about
it. The CLI prints it without a traceback and exits non-zero; anything else is a bug and keeps
its traceback.
"""


class UserError(Exception):
    """Bad input or configuration: printed as one line, no traceback."""


class SampleError(Exception):
    """A problem confined to one sample (missing image, corrupt video): recorded, run goes on."""


class Interrupted(Exception):
    """Ctrl-C during a run: finished samples are saved; the message says how to resume."""
