"""Errors raised by the data layer.

`DatasetError` subclasses `ValueError` because every failure it reports is bad input (a
wrong spec, a missing or corrupt file), never a bug; callers that already catch
`ValueError` for bad arguments keep working.
"""


class DatasetError(ValueError):
    """A dataset spec or one of its files cannot be used; the message names the file."""


class DatasetWarning(UserWarning):
    """Bad items were skipped (``skip_bad=True``), so the data set is smaller than on disk."""
