"""Error types. Every error a user can cause is a :class:`CBDError`; the CLI prints its message on one line
and exits with code 2. Anything else is an internal error (exit code 1)."""

from __future__ import annotations


class CBDError(Exception):
    """A problem with the user's input: bad weights, file, data, argument or architecture."""


class FormatError(CBDError, ValueError):
    """A ``.cbd`` file that is corrupt, truncated, tampered with, of a future version or not a .cbd at all."""


class WeightError(CBDError, ValueError):
    """Weights that cannot be compressed (NaN/Inf) or a checkpoint that does not fit the architecture."""


class DataError(CBDError, ValueError):
    """A data spec that does not exist or does not have the expected layout."""
