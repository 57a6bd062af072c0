"""A local directory: shards and the manifest as files, each written under a temporary name and renamed."""

from __future__ import annotations

import os
import uuid

from tokray.storage.stores import FileStore
from tokray.storage.uri import StoreURI


class LocalStore(FileStore):
    def __init__(self, uri: StoreURI):
        self.uri = uri

    def check(self, for_write):
        if os.path.exists(self.uri.path) and not os.path.isdir(self.uri.path):
            raise ValueError(f"{self.uri} is a file, not a dataset directory; choose a directory path")
        if for_write:
            os.makedirs(self.uri.path, exist_ok=True)

    def _path(self, name):
        return self.uri.child(name)

    def _get(self, name):
        with open(self._path(name), "rb") as f:
            return f.read()

    def _put(self, name, data):
        # temp + rename: a reader (or a killed writer) never sees a half-written file
        tmp = self._path(f".{name}.tmp-{uuid.uuid4().hex[:8]}")
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self._path(name))

    def _size(self, name):
        try:
            return os.path.getsize(self._path(name))
        except FileNotFoundError:
            return None

    def _delete(self, name):
        try:
            os.remove(self._path(name))
        except FileNotFoundError:
            pass

    def _list(self):
        return sorted(os.listdir(self.uri.path)) if os.path.isdir(self.uri.path) else []


