"""Errors a user sees. Each message names the input and what would be valid."""

from __future__ import annotations


class DACError(ValueError):
    """Bad input or a failed stage, with a one-line message meant for the user."""


class NonFiniteLossError(DACError):
    """The training loss became NaN or infinite; the stage was stopped."""

    def __init__(self, message: str, step: int, last_good: str | None = None):
        super().__init__(message)
        self.step = step
        self.last_good = last_good


class StopTraining(Exception):
    """Raised from a progress callback to stop a stage cleanly (e.g. a UI's Cancel)."""
