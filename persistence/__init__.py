"""Document stores: where a workspace's CRDT document lives between sessions."""

from persistence.base import DocumentStore, StoredDocument, StoreError

__all__ = ["DocumentStore", "StoredDocument", "StoreError"]
