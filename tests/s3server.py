"""A real S3 endpoint on 127.0.0.1 (moto in server mode) for tests and benchmarks (test machinery:
it needs the `test` extra, so it lives under tests/, never in the package).

Not a mocked client: tokray talks HTTP to it through s3fs/botocore exactly as to AWS. The server
runs in its own process, logs every request, and stops on exit.
"""

from __future__ import annotations

import contextlib
import os
import re
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request

_REQUEST = re.compile(r'"(GET|PUT|HEAD|POST|DELETE) (\S+) HTTP')


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LocalS3Server:
    def __init__(self):
        self.port = _free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self._log = tempfile.NamedTemporaryFile(prefix="moto-", suffix=".log", delete=False)
        self._proc: subprocess.Popen | None = None

    def start(self) -> "LocalS3Server":
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
            stdout=self._log, stderr=subprocess.STDOUT)
        deadline = time.time() + 60
        while time.time() < deadline:
            if self._proc.poll() is not None:
                raise RuntimeError(f"moto server exited with {self._proc.returncode}; log: {self._log.name}")
            with contextlib.suppress(OSError):
                urllib.request.urlopen(self.endpoint + "/moto-api/", timeout=1)
                return self
            time.sleep(0.2)
        raise RuntimeError(f"moto server did not answer on {self.endpoint} within 60 s")

    def stop(self) -> None:
        if self._proc and self._proc.poll() is None:
            self._proc.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self._proc.wait(10)
            if self._proc.poll() is None:
                self._proc.kill()
        with contextlib.suppress(FileNotFoundError):
            os.remove(self._log.name)

    def env(self) -> dict[str, str]:
        """The standard AWS variables that point clients (and subprocesses) at this endpoint."""
        return {"AWS_ENDPOINT_URL": self.endpoint, "AWS_ACCESS_KEY_ID": "testing",
                "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
                "AWS_EC2_METADATA_DISABLED": "true"}

    def create_bucket(self, name: str) -> None:
        import boto3

        boto3.client("s3", endpoint_url=self.endpoint, aws_access_key_id="testing",
                     aws_secret_access_key="testing", region_name="us-east-1").create_bucket(Bucket=name)

    def log_offset(self) -> int:
        return os.path.getsize(self._log.name)

    def requests(self, since: int = 0) -> list[tuple[str, str]]:
        """(method, path) of every request the server logged after byte offset ``since``."""
        with open(self._log.name, "rb") as f:
            f.seek(since)
            text = f.read().decode(errors="replace")
        return _REQUEST.findall(text)

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()
