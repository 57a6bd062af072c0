"""S3 (or any S3-compatible endpoint) through s3fs, with shard reads through the node's cache tier."""

from __future__ import annotations

import os

from tokray.storage.cache import ShardCache, default_cache
from tokray.storage.stores import FileStore, ShardChecksumError, StoreUnavailableError
from tokray.storage.uri import StoreURI


class S3Store(FileStore):
    """S3 (or any S3-compatible endpoint) through s3fs.

    Endpoint and credentials come from the standard AWS chain: AWS_ENDPOINT_URL(_S3),
    AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, AWS_PROFILE, ~/.aws/{config,credentials}, instance
    profiles. Nothing of them is stored in a manifest or logged. A single PUT is atomic on S3,
    and the manifest is written last, so an interrupted write never looks complete.
    """

    remote = True  # reads go through the node's shard cache

    def __init__(self, uri: StoreURI, cache: ShardCache | None = None):
        self.uri = uri
        self.cache = cache if cache is not None else default_cache()
        self._fs = None

    @property
    def endpoint(self) -> str:
        return os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or "AWS default"

    @property
    def fs(self):
        if self._fs is None:
            import s3fs

            client_kwargs = {}
            endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
            if endpoint:
                client_kwargs["endpoint_url"] = endpoint
            self._fs = s3fs.S3FileSystem(
                client_kwargs=client_kwargs, use_listings_cache=False, skip_instance_cache=True,
                # botocore retries transient errors (throttling, 5xx, resets); s3fs retries its own set
                config_kwargs={"connect_timeout": 5, "read_timeout": 60,
                               "retries": {"max_attempts": 3, "mode": "standard"}})
        return self._fs

    def __getstate__(self):
        return {"uri": self.uri, "cache": self.cache, "_fs": None}

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
        try:
            self._call("HEAD bucket", lambda: self.fs.call_s3("head_bucket", Bucket=self.uri.bucket))
        except FileNotFoundError:
            raise FileNotFoundError(
                f"S3 bucket {self.uri.bucket!r} does not exist at endpoint {self.endpoint}; create it "
                f"(e.g. `aws s3 mb s3://{self.uri.bucket}`) or fix the URI {self.uri}") from None

    def _get(self, name):
        return self._call(f"GET {name}", self.fs.cat_file, self._key(name))

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

    def _list(self):
        try:
            paths = self._call("LIST", self.fs.ls, f"{self.uri.bucket}/{self.uri.path}", False)
        except FileNotFoundError:
            return []
        return sorted(p.rsplit("/", 1)[-1] for p in paths)

    def read_shard_bytes(self, info):
        if self.cache is None:
            return super().read_shard_bytes(info)
        return self.cache.get(info.sha256, lambda: self._checked(info, self._get(info.path)),
                              on_corrupt=lambda actual: ShardChecksumError(str(self.uri), info.path,
                                                                           info.sha256, actual))


