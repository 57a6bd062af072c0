"""Cache tier: remote shards kept on local disk under a byte limit, least recently used out.

Entries are content-addressed by their sha256 (the manifest's digest), verified before they are
inserted and again when read back. A flock on ``<dir>/.lock`` makes eviction and insertion safe
when several processes of a node share the directory; reads of present entries need no lock.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import uuid
from typing import Callable

from tokray.storage.stores import sha256

log = logging.getLogger(__name__)

DEFAULT_CACHE_BYTES = 10 * 2**30


class ShardCache:
    def __init__(self, root: str, max_bytes: int = DEFAULT_CACHE_BYTES):
        if max_bytes < 0:
            raise ValueError(f"cache max_bytes must be >= 0, got {max_bytes}")
        self.root = os.path.abspath(root)
        self.max_bytes = int(max_bytes)
        self.hits = 0
        self.misses = 0
        self._warned = False

    def __repr__(self):
        return f"ShardCache({self.root!r}, max_bytes={self.max_bytes})"

    def _path(self, digest: str, tag: str = "") -> str:
        return os.path.join(self.root, f"{digest}{'-' + tag if tag else ''}.shard")

    @contextlib.contextmanager
    def _locked(self):
        os.makedirs(self.root, exist_ok=True)
        with open(os.path.join(self.root, ".lock"), "a+") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)

    def _entries(self) -> list[tuple[float, int, str]]:
        out = []
        for name in os.listdir(self.root):
            if name.endswith(".shard") or ".tmp-" in name:
                try:
                    st = os.stat(os.path.join(self.root, name))
                except FileNotFoundError:
                    continue
                out.append((st.st_mtime, st.st_size, name))
        return out

    def used_bytes(self) -> int:
        if not os.path.isdir(self.root):
            return 0
        return sum(size for _, size, _ in self._entries())

    def get_versioned(self, name: str, version: str, fetch: Callable[[], bytes],
                      valid: Callable[[bytes], bool]) -> bytes:
        """Bytes of the object ``name`` as of ``version`` (e.g. an S3 key and its ETag), for objects whose
        digest is learnt only by reading them (a manifest). ``valid`` checks bytes against the version;
        fetched bytes that fail it are returned but not cached."""
        address = "v-" + sha256(name.encode())[:40]
        data = self._guarded(lambda: self._read(address, version, valid), "read")
        if data is not None:
            self.hits += 1
            return data
        self.misses += 1
        data = fetch()
        if valid(data):
            self._guarded(lambda: self._insert(address, data, version), "write")
        return data

    def get(self, digest: str, fetch: Callable[[], bytes],
            on_corrupt: Callable[[str], Exception] | None = None, tag: str = "") -> bytes:
        """Bytes of the entry ``digest`` (``tag``: e.g. the object's ETag; another tag is another
        entry); ``fetch`` (which must verify) fills a miss. A cache volume that cannot be read or
        written (full, read-only) is bypassed with a warning: the store answers instead."""
        data = self._guarded(lambda: self._read(digest, tag), "read")
        if data is not None:
            self.hits += 1
            return data
        self.misses += 1
        data = fetch()
        actual = sha256(data)
        if actual != digest:  # never cache (or return) bytes that do not match their address
            raise on_corrupt(actual) if on_corrupt else ValueError(f"cache insert: sha256 {actual} != {digest}")
        self._guarded(lambda: self._insert(digest, data, tag), "write")
        return data

    def _guarded(self, fn, what: str):
        try:
            return fn()
        except OSError as e:
            if not self._warned:
                log.warning("shard cache %s cannot %s (%s: %s); reading from the store without the cache", self.root,
                            what, type(e).__name__, e)
                self._warned = True
            return None

    def _read(self, digest: str, tag: str = "", valid: Callable[[bytes], bool] | None = None) -> bytes | None:
        path = self._path(digest, tag)
        try:
            with open(path, "rb") as f:
                data = f.read()
        except FileNotFoundError:
            return None
        if not (valid(data) if valid else sha256(data) == digest):
            log.warning("cache entry %s is corrupt on local disk; dropping it and re-fetching", path)
            with contextlib.suppress(FileNotFoundError):
                os.remove(path)
            return None
        with contextlib.suppress(FileNotFoundError):
            os.utime(path)  # mtime is the LRU clock
        return data

    def _insert(self, digest: str, data: bytes, tag: str = "") -> None:
        if len(data) > self.max_bytes:
            log.debug("shard %s (%d B) exceeds the cache limit %d B; not cached", digest, len(data), self.max_bytes)
            return
        with self._locked():
            if os.path.exists(self._path(digest, tag)):
                return
            entries = sorted(self._entries())
            used = sum(size for _, size, _ in entries)
            while entries and used + len(data) > self.max_bytes:
                _, size, name = entries.pop(0)
                with contextlib.suppress(FileNotFoundError):
                    os.remove(os.path.join(self.root, name))
                used -= size
            tmp = os.path.join(self.root, f".{digest}.tmp-{uuid.uuid4().hex[:8]}")
            try:
                with open(tmp, "wb") as f:
                    f.write(data)
                os.replace(tmp, self._path(digest, tag))
            finally:
                with contextlib.suppress(FileNotFoundError):
                    os.remove(tmp)  # a full volume keeps no partial entry


def env_number(name: str, default, kind=int):
    """A numeric setting from the environment; anything else is an error naming the variable."""
    raw = os.environ.get(name)
    if raw is None or raw.strip() == "":
        return default
    try:
        value = kind(raw)
        if kind is int and str(value) != raw.strip():
            raise ValueError(raw)
    except ValueError:
        raise ValueError(f"environment variable {name}={raw!r} is not a{'n integer' if kind is int else ' number'}; "
                         f"unset it for the default ({default})") from None
    if value < 0:
        raise ValueError(f"environment variable {name}={raw!r} must be >= 0")
    return value


def default_cache() -> ShardCache | None:
    """The node's cache from TOKRAY_CACHE_DIR / TOKRAY_CACHE_BYTES (bytes, an integer); 0 disables it."""
    max_bytes = env_number("TOKRAY_CACHE_BYTES", DEFAULT_CACHE_BYTES, int)
    if max_bytes == 0:
        return None
    root = os.environ.get("TOKRAY_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "tokray", "shards")
    return ShardCache(root, max_bytes)
