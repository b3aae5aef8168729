"""Pluggable durable storage: the ``Storage`` protocol and its backends.

``open_store(url)`` picks the backend from a storage URL: ``memory:``,
``sqlite:///relative/path.db`` or ``sqlite:////absolute/path.db``.
"""

from ._base import ConversationNotFound, Storage, StorageError

__all__ = ["ConversationNotFound", "Storage", "StorageError"]
