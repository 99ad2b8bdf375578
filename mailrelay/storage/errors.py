"""Errors the storage layer raises for callers to turn into replies."""


class StorageError(Exception):
    """A request the data cannot satisfy; ``str()`` is a sentence for a person."""


class NotFound(StorageError):
    pass


class Conflict(StorageError):
    pass
