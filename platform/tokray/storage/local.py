"""A local directory: shards and the manifest as files, each written under a temporary name and renamed."""

from __future__ import annotations

import contextlib
import os
import uuid

from tokray.storage.stores import FileStore, WriterLockedError, write_error
from tokray.storage.uri import StoreURI


def sibling_lock(path: str, uri):
    """An exclusive lock file beside a local location (the OS releases it when the holder dies)."""
    import filelock

    @contextlib.contextmanager
    def held():
        parent, name = os.path.split(path.rstrip("/"))
        os.makedirs(parent or ".", exist_ok=True)
        lock = filelock.FileLock(os.path.join(parent, f".{name}.lock"))
        try:
            lock.acquire(timeout=0)
        except filelock.Timeout:
            raise WriterLockedError(f"another writer is writing {uri} right now (lock {lock.lock_file}); wait for it "
                                    "to finish, or write somewhere else") from None
        try:
            yield
        finally:
            lock.release()

    return held()


class LocalStore(FileStore):
    def __init__(self, uri: StoreURI):
        self.uri = uri

    def check(self, for_write):
        if os.path.exists(self.uri.path) and not os.path.isdir(self.uri.path):
            raise ValueError(f"{self.uri} is a file, not a dataset directory; choose a directory path")
        if for_write:
            try:
                os.makedirs(self.uri.path, exist_ok=True)
            except OSError as e:
                raise write_error(self.uri, "the dataset directory", e) from None

    def writer_lock(self):
        return sibling_lock(self.uri.path, self.uri)

    def _path(self, name):
        return self.uri.child(name)

    def _get(self, name):
        with open(self._path(name), "rb") as f:
            return f.read()

    def _put(self, name, data):
        # temp + rename: a reader (or a killed writer) never sees a half-written file
        path = self._path(name)
        folder, base = os.path.split(path)
        tmp = os.path.join(folder, f".{base}.tmp-{uuid.uuid4().hex[:8]}")
        try:
            os.makedirs(folder, exist_ok=True)
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except OSError as e:
            with contextlib.suppress(OSError):
                os.remove(tmp)  # a full disk must not stay full of our temp files
            raise write_error(self.uri, name, e) from None

    def _size(self, name):
        try:
            return os.path.getsize(self._path(name))
        except FileNotFoundError:
            return None

    def _delete(self, name):
        with contextlib.suppress(FileNotFoundError):
            os.remove(self._path(name))
        folder = os.path.dirname(self._path(name))
        if folder != self.uri.path.rstrip("/"):  # an emptied generation folder goes too
            with contextlib.suppress(OSError):
                os.rmdir(folder)

    def _list_all(self):
        root = self.uri.path
        return sorted(os.path.relpath(os.path.join(d, f), root) for d, _, fs in os.walk(root) for f in fs)
