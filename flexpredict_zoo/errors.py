"""Errors that both command lines (`flexpredict-zoo`, `flexpredict-train`) and the library modules behind them
raise; defined outside the entry module `cli`, so a library module never imports a command line."""
from __future__ import annotations

__all__ = ["CommandUnavailableError"]


class CommandUnavailableError(RuntimeError):
    """A command whose optional dependencies are not installed; the message says what to install."""
