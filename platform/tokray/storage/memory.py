"""Bytes in a dict: what a dataset would cost on a file store, without writing it anywhere."""

from __future__ import annotations

import contextlib

from tokray.storage.stores import FileStore
from tokray.storage.uri import StoreURI


class MemoryStore(FileStore):
    """Bytes in a dict: what a dataset would cost on a file store, without writing it anywhere."""

    def __init__(self):
        self.uri = StoreURI("local", "<memory>")
        self.objects: dict[str, bytes] = {}

    def _get(self, name):
        if name not in self.objects:
            raise FileNotFoundError(name)
        return self.objects[name]

    def _put(self, name, data):
        self.objects[name] = data

    def _size(self, name):
        return len(self.objects[name]) if name in self.objects else None

    def _delete(self, name):
        self.objects.pop(name, None)

    def _list_all(self):
        return sorted(self.objects)

    def writer_lock(self):
        return contextlib.nullcontext()


