"""S3 (or any S3-compatible endpoint) through s3fs, with shard reads through the node's cache tier."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import time
import uuid

from tokray.storage.cache import ShardCache, default_cache, env_number
from tokray.storage.stores import MANIFEST_NAME, FileStore, ShardChecksumError, StoreUnavailableError, WriterLockedError
from tokray.storage.uri import StoreURI

LOCK_NAME = "_writer.lock"
# what aiohttp/botocore raise for a response body that ended early
_CUT_BODY = {"ClientPayloadError", "IncompleteRead", "ContentLengthError", "ResponseStreamingError"}


class S3Store(FileStore):
    """S3 (or any S3-compatible endpoint) through s3fs.

    Endpoint and credentials come from the standard AWS chain: AWS_ENDPOINT_URL(_S3),
    AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, AWS_PROFILE, ~/.aws/{config,credentials}, instance
    profiles. Nothing of them is stored in a manifest or logged. A single PUT is atomic on S3,
    and the manifest is written last, so an interrupted write never looks complete.

    Every call has a connect and a read timeout (``TOKRAY_S3_CONNECT_TIMEOUT``, default 10 s;
    ``TOKRAY_S3_READ_TIMEOUT``, default 20 s) and botocore's standard retries (3 attempts), so a
    dead endpoint fails within about a minute, naming the endpoint. The first shard read lists
    the prefix once: the cache answers only for objects that are still there with the size and
    ETag they had when cached.
    """

    remote = True  # reads go through the node's shard cache

    def __init__(self, uri: StoreURI, cache: ShardCache | None | bool = None):
        """``cache``: a ShardCache, None (the node's, from the environment) or False (read the store itself)."""
        self.uri = uri
        self.cache = None if cache is False else (cache if cache is not None else default_cache())
        self._fs = None
        self._objects: dict[str, tuple[int, str]] | None = None  # name -> (size, ETag), listed on first read

    @property
    def endpoint(self) -> str:
        return os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or "AWS default"

    @property
    def fs(self):
        if self._fs is None:
            self._fs = _filesystem()
        return self._fs

    def __getstate__(self):
        return {"uri": self.uri, "cache": self.cache, "_fs": None, "_objects": None, "generation": self.generation}

    def _key(self, name):
        return f"{self.uri.bucket}/{self.uri.child(name)}"

    def _call(self, what: str, fn, *args):
        try:
            return fn(*args)
        except FileNotFoundError:
            raise
        except PermissionError as e:
            raise StoreUnavailableError(
                f"S3 denied {what} at {self.uri} (endpoint {self.endpoint}): {e}. Check the credentials "
                "(AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, AWS_PROFILE or the instance profile) and the "
                "bucket policy.") from None
        except Exception as e:  # botocore/aiohttp raise many types for the same few causes
            raise StoreUnavailableError(
                f"S3 {what} at {self.uri} failed (endpoint {self.endpoint}): {type(e).__name__}: {e}. "
                "Check AWS_ENDPOINT_URL, the network and the credentials.") from None

    def check(self, for_write):
        if for_write:
            self.confirm_location()
        # reading: the manifest GET answers; only when it is missing does confirm_location say why

    def confirm_location(self):
        try:
            self._call("HEAD bucket", lambda: self.fs.call_s3("head_bucket", Bucket=self.uri.bucket))
        except FileNotFoundError:
            raise FileNotFoundError(
                f"S3 bucket {self.uri.bucket!r} does not exist at endpoint {self.endpoint}; create it "
                f"(e.g. `aws s3 mb s3://{self.uri.bucket}`) or fix the URI {self.uri}") from None

    def _get(self, name):
        return self._call(f"GET {name}", self._read_whole, self._key(name))

    def _read_whole(self, key: str) -> bytes:
        """One object; read again when the connection was cut inside its body (botocore retries a request only
        until its headers arrive). A dead endpoint still fails within the timeouts: this retries cut bodies only."""
        for attempt in range(3):
            try:
                return self.fs.cat_file(key)
            except Exception as e:
                if attempt == 2 or type(e).__name__ not in _CUT_BODY:
                    raise
                time.sleep(0.2 * (attempt + 1))

    def _put(self, name, data):
        self._call(f"PUT {name}", self.fs.pipe_file, self._key(name), data)

    def _size(self, name):
        try:
            return int(self._call(f"HEAD {name}", self.fs.size, self._key(name)))
        except FileNotFoundError:
            return None

    def _delete(self, name):
        try:
            self._call(f"DELETE {name}", self.fs.rm_file, self._key(name))
        except FileNotFoundError:
            pass

    def _listing(self) -> dict[str, tuple[int, str]]:
        """Every object below the prefix: relative name -> (size, ETag), in one LIST."""
        root = f"{self.uri.bucket}/{self.uri.path}".rstrip("/")
        try:
            found = self._call("LIST", lambda: self.fs.find(root, detail=True))
        except FileNotFoundError:
            return {}
        return {k[len(root) + 1:]: (int(v.get("size", -1)), str(v.get("ETag", "")).strip('"'))
                for k, v in found.items() if k.startswith(root + "/")}

    def _list_all(self):
        return sorted(self._listing())

    def read_meta(self, name):
        if self.cache is None or name != MANIFEST_NAME:
            return super().read_meta(name)
        # opening a dataset: one LIST (kept for the shard reads) names the manifest's ETag, so a cached
        # dataset opens in one request, not a GET of the manifest and of each side file plus the LIST
        self._objects = self._listing()
        if name not in self._objects:
            return None
        etag = self._objects[name][1]
        return self.cache.get_versioned(self._key(name), etag, lambda: self._get(name),
                                        lambda data: _is_md5_of(etag, data))

    def read_file(self, path, digest):
        if self.cache is None:
            return super().read_file(path, digest)
        try:
            etag = self._listed(path)[1]
        except FileNotFoundError:
            return None
        return self.cache.get(digest, lambda: self._get(path), tag=etag)  # (the caller checks the digest)

    def read_shard_bytes(self, info):
        if self.cache is None:
            return super().read_shard_bytes(info)
        size, etag = self._listed(info.path)
        if size != info.bytes:  # changed on the store: read it (and fail its digest), never the cached copy
            return super().read_shard_bytes(info)
        # the cache entry is the object as it was: same digest *and* same ETag
        return self.cache.get(info.sha256, lambda: self._checked(info, self._get(info.path)), tag=etag,
                              on_corrupt=lambda actual: ShardChecksumError(str(self.uri), info.path,
                                                                           info.sha256, actual))

    def _listed(self, path: str) -> tuple[int, str]:
        """(size, ETag) of an object from the listing: the first read lists the prefix once (unless opening the
        dataset did), and again for an object it lacks (written after it); a missing object is named."""
        if self._objects is None or path not in self._objects:
            self._objects = self._listing()
        if path not in self._objects:
            raise FileNotFoundError(f"{path} is not on {self.uri}")
        return self._objects[path]

    @contextlib.contextmanager
    def writer_lock(self):
        """A lock object created only if absent (a conditional PUT); a lock older than
        ``TOKRAY_S3_LOCK_STALE_S`` (default 900 s; a killed writer's) is taken over."""
        body = json.dumps({"owner": uuid.uuid4().hex, "host": socket.gethostname(), "pid": os.getpid(),
                           "time": time.time()}).encode()
        key = self.uri.child(LOCK_NAME)
        for attempt in range(2):
            try:
                self.fs.call_s3("put_object", Bucket=self.uri.bucket, Key=key, Body=body, IfNoneMatch="*")
                break
            except Exception as e:  # s3fs raises FileExistsError for 412 PreconditionFailed: someone holds it
                if not isinstance(e, FileExistsError) and "PreconditionFailed" not in repr(e):
                    raise StoreUnavailableError(f"S3 PUT {LOCK_NAME} at {self.uri} failed (endpoint "
                                                f"{self.endpoint}): {type(e).__name__}: {e}") from None
                held = json.loads(self.read_meta(LOCK_NAME) or b"{}")
                age = time.time() - float(held.get("time", 0))
                if attempt == 0 and _holder_gone(held, age):
                    self._delete(LOCK_NAME)  # its writer was killed
                    continue
                raise WriterLockedError(
                    f"another writer ({held.get('host')}, pid {held.get('pid')}, {age:.0f} s ago) is writing "
                    f"{self.uri}; wait for it to finish, or delete s3://{self.uri.bucket}/{key} if it was "
                    "killed") from None
        try:
            yield
        finally:
            self._delete(LOCK_NAME)




def _is_md5_of(etag: str, data: bytes) -> bool:
    """A single-part upload's ETag is its MD5; multipart and SSE-KMS ETags are not (those are never cached)."""
    import hashlib

    return len(etag) == 32 and hashlib.md5(data).hexdigest() == etag.lower()


def _holder_gone(held: dict, age: float) -> bool:
    """A lock's writer is gone: a dead process on this host, or a lock older than TOKRAY_S3_LOCK_STALE_S."""
    if held.get("host") == socket.gethostname():
        try:
            os.kill(int(held.get("pid", 0)), 0)
        except ProcessLookupError:
            return True
        except (PermissionError, ValueError):
            pass
    return age > env_number("TOKRAY_S3_LOCK_STALE_S", 900, float)


_FILESYSTEMS: dict[tuple, object] = {}  # (pid, endpoint, timeouts) -> s3fs.S3FileSystem


def _filesystem():
    """The process's S3 filesystem for the current endpoint and timeouts. Creating a client costs ~0.4 s (the
    aiobotocore session and its connection pool): one per process, not one per opened dataset, keeps a read
    of a cached dataset as fast as a local one."""
    import s3fs

    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    timeouts = (env_number("TOKRAY_S3_CONNECT_TIMEOUT", 10, float), env_number("TOKRAY_S3_READ_TIMEOUT", 20, float))
    creds = tuple(os.environ.get(k) for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_PROFILE"))
    key = (os.getpid(), endpoint, timeouts, creds)
    if key not in _FILESYSTEMS:
        fs = s3fs.S3FileSystem(
            client_kwargs={"endpoint_url": endpoint} if endpoint else {}, use_listings_cache=False,
            skip_instance_cache=True,
            config_kwargs={"connect_timeout": timeouts[0], "read_timeout": timeouts[1],
                           "retries": {"max_attempts": 3, "mode": "standard"}})
        # botocore retries transient errors (throttling, 5xx, resets, timeouts); s3fs's own retry loop
        # (5 more rounds of those) would multiply a dead endpoint's wait, so it runs once
        fs.retries = 1
        _FILESYSTEMS[key] = fs
    return _FILESYSTEMS[key]
