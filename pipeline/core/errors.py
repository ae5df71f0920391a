"""Errors that thermoscope reports to the user as one line, without a traceback."""

from __future__ import annotations


class ThermoscopeError(Exception):
    """Base class: the CLI prints ``str(error)`` as one line and exits non-zero."""


class InputError(ThermoscopeError):
    """A checkpoint, log or folder that cannot be used, with the file and the reason.

    ``str()`` is ``"<path>: <reason>"`` or ``"<path>: tensor '<name>': <reason>"``.
    """

    def __init__(self, path, reason: str, tensor: str | None = None):
        self.path = str(path)
        self.reason = reason
        self.tensor = tensor
        where = f"{self.path}: tensor '{tensor}'" if tensor else self.path
        super().__init__(f"{where}: {reason}")

    def __reduce__(self):
        # rebuilt from its parts when it crosses a process boundary (a Dask worker's read error)
        return (type(self), (self.path, self.reason, self.tensor))
