"""The error type for data that is missing, corrupted or cannot be fetched."""

from __future__ import annotations


class DataError(ValueError):
    """A data file or data source cannot be used; the message says which and what to do."""
