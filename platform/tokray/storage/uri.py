"""Store URIs: a local path or ``file://``, ``s3://bucket/prefix``, ``lmdb:///path``."""

from __future__ import annotations

import dataclasses
import os
from urllib.parse import urlparse

Scheme = str  # "local", "lmdb", or one of BUCKET_SCHEMES

# object stores addressed as scheme://bucket/prefix (a new one: add it here and in stores.BACKENDS)
BUCKET_SCHEMES = ("s3",)

URI_FORMS = "a local path or file:///abs/path, s3://bucket/prefix, or lmdb:///abs/path"


@dataclasses.dataclass(frozen=True)
class StoreURI:
    """A parsed store location. ``path`` is absolute for local/lmdb, the key prefix for S3."""

    scheme: Scheme
    path: str
    bucket: str = ""

    def __str__(self) -> str:
        if self.scheme in BUCKET_SCHEMES:
            return f"{self.scheme}://{self.bucket}/{self.path}".rstrip("/")
        if self.scheme == "lmdb":
            return f"lmdb://{self.path}"
        return self.path

    def child(self, name: str) -> str:
        """Address of an object inside this location (path for local/lmdb, key for S3)."""
        if self.scheme in BUCKET_SCHEMES:
            return f"{self.path}/{name}" if self.path else name
        return os.path.join(self.path, name)


def parse_uri(uri: "str | os.PathLike | StoreURI") -> StoreURI:
    """Parse and validate a store URI; raise ValueError naming the URI and the allowed forms."""
    if isinstance(uri, StoreURI):
        return uri
    text = os.fspath(uri).strip()
    if not text:
        raise ValueError(f"empty store URI; expected {URI_FORMS}")
    if "://" not in text:
        if ":" in text.split("/")[0] and not os.path.exists(text):
            raise ValueError(f"malformed store URI {text!r}: unknown scheme; expected {URI_FORMS}")
        return StoreURI("local", os.path.abspath(os.path.expanduser(text)))
    parsed = urlparse(text)
    scheme = parsed.scheme.lower()
    if scheme == "file":
        if parsed.netloc not in ("", "localhost"):
            raise ValueError(f"malformed store URI {text!r}: file URIs need an absolute path (file:///abs/path)")
        return StoreURI("local", os.path.abspath(parsed.path))
    if scheme == "lmdb":
        if parsed.netloc or not parsed.path or parsed.path == "/":
            raise ValueError(
                f"malformed store URI {text!r}: LMDB URIs are lmdb:///abs/path/to/env (three slashes, absolute path)")
        return StoreURI("lmdb", os.path.abspath(parsed.path))
    if scheme in BUCKET_SCHEMES:
        bucket = parsed.netloc
        if not bucket or not _valid_bucket(bucket):
            raise ValueError(
                f"malformed store URI {text!r}: {bucket!r} is not a valid {scheme.upper()} bucket name "
                f"(3-63 chars of a-z, 0-9, '.', '-'); expected {scheme}://bucket/prefix")
        if parsed.query or parsed.params or parsed.fragment:
            raise ValueError(f"malformed store URI {text!r}: {scheme.upper()} URIs take no query or fragment; "
                             "set the endpoint with AWS_ENDPOINT_URL")
        return StoreURI(scheme, parsed.path.strip("/"), bucket=bucket)
    raise ValueError(f"malformed store URI {text!r}: unknown scheme {scheme!r}; expected {URI_FORMS}")


def _valid_bucket(name: str) -> bool:
    allowed = set("abcdefghijklmnopqrstuvwxyz0123456789.-")
    return 3 <= len(name) <= 63 and set(name) <= allowed and name[0].isalnum() and name[-1].isalnum()
