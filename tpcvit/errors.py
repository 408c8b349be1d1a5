"""The project's error types: what the CLI reports as one line (exit 2). Anything else is a bug and keeps its
traceback. Each subclasses ``ValueError`` so code catching bad input the Python way keeps working."""

from __future__ import annotations


class TpcvitError(ValueError):
    """Bad input a user can fix (the message says how)."""
