"""Where shards live: local paths, ``http(s)://`` URLs and object storage, opened as byte streams.

A shard list is given as one spec (a path, a glob, a ``{000..099}`` range, a URL with a range)
or a list of them. :func:`open_stream` reads a shard front to back and never seeks back, so any
server works; a connection that fails is reopened at the byte where it broke (an HTTP ``Range``
request, or reading up to it again where a server ignores ranges), with backoff, before the
shard is given up. HTTP goes through the standard library; every other scheme (``s3://``,
``gs://``, ...) through ``fsspec`` and its package for the scheme.
"""

from __future__ import annotations

import glob
import http.client
import io
import os
import posixpath
import re
import time
import urllib.error
import urllib.request
from collections.abc import Iterable
from typing import Any, BinaryIO, Callable

BRACE_RANGE = re.compile(r"\{(\d+)\.\.(\d+)\}")
URL = re.compile(r"^([a-zA-Z][a-zA-Z0-9+.-]*)://")
#: Packages that give fsspec a scheme, for the error when one is missing.
SCHEME_PACKAGES = {"s3": "s3fs", "s3a": "s3fs", "gs": "gcsfs", "gcs": "gcsfs", "az": "adlfs", "abfs": "adlfs",
                   "abfss": "adlfs", "hf": "huggingface_hub"}  # fmt: skip
GONE = (400, 401, 403, 404, 410)  # HTTP answers that a retry will not change


class Unavailable(OSError):
    """A shard that cannot be read (after retries where a retry could help)."""


def is_url(text: str) -> bool:
    return bool(URL.match(text))


def expand_braces(spec: str) -> list[str]:
    """WebDataset's numeric ranges: ``shard-{000..009}.tar`` (zero padding kept), nested in order."""
    found = BRACE_RANGE.search(spec)
    if not found:
        return [spec]
    a, b = found.group(1), found.group(2)
    width = len(a) if a.startswith("0") and len(a) > 1 else 0
    step = 1 if int(b) >= int(a) else -1
    out = []
    for k in range(int(a), int(b) + step, step):
        out.extend(expand_braces(spec[: found.start()] + str(k).zfill(width) + spec[found.end() :]))
    return out


def expand(spec: str | os.PathLike[str] | Iterable[str | os.PathLike[str]]) -> list[str]:
    """The shard URLs and absolute paths a spec names: ranges expanded, local globs matched (a
    glob that matches nothing, or a local path that does not exist, is an error naming it)."""
    specs = [spec] if isinstance(spec, (str, os.PathLike)) else list(spec)
    out: list[str] = []
    for one in specs:
        for name in expand_braces(os.fspath(one).strip()):
            if is_url(name):
                out.append(name)
                continue
            name = os.path.expanduser(name)
            matches = sorted(glob.glob(name)) if glob.has_magic(name) else [name]
            if not matches:
                raise FileNotFoundError(f"no shards match {name!r}")
            for path in matches:
                if not os.path.isfile(path):
                    raise FileNotFoundError(f"shard {path} does not exist")
                out.append(os.path.abspath(path))
    if not out:
        raise ValueError(f"the shard spec {spec!r} names no shards")
    return out


def join(base: str, name: str) -> str:
    """``name`` (relative, or a full URL or absolute path) as seen from the file ``base``."""
    if is_url(name) or os.path.isabs(name):
        return name
    if is_url(base):  # urljoin leaves schemes it does not know (s3://) alone, so join the path part
        scheme, rest = base.split("://", 1)
        return f"{scheme}://{posixpath.normpath(posixpath.join(posixpath.dirname(rest), name))}"
    return os.path.join(os.path.dirname(base), name)


def _fsspec(url: str) -> Any:
    scheme = URL.match(url).group(1).lower()
    package = SCHEME_PACKAGES.get(scheme, f"the fsspec package for {scheme}://")
    try:
        import fsspec
    except ImportError as error:
        raise ImportError(f"reading {url} needs fsspec and {package}: pip install 'torch-navit[cloud]'") from error
    try:
        return fsspec.open(url, "rb").open()
    except ImportError as error:
        raise ImportError(f"reading {url} needs {package}: pip install {package}") from error


def _http(url: str, offset: int, timeout: float) -> BinaryIO:
    headers = {"Range": f"bytes={offset}-"} if offset else {}
    try:
        response = urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=timeout)
    except urllib.error.HTTPError as error:
        error.close()
        if error.code in GONE:
            raise Unavailable(f"HTTP {error.code} {error.reason}") from None
        raise
    if offset and response.status != 206:  # the server ignores ranges: read up to the break again
        _skip(response, offset)
    return response


def _skip(stream: BinaryIO, count: int) -> None:
    while count:
        chunk = stream.read(min(count, 1 << 20))
        if not chunk:
            raise EOFError("the stream ended early")
        count -= len(chunk)


def opener(url: str, timeout: float = 30.0) -> Callable[[int], BinaryIO]:
    """A function that opens ``url`` (a path or URL) for reading from a byte offset."""
    if not is_url(url):
        def local(offset: int) -> BinaryIO:
            stream = open(url, "rb")  # noqa: SIM115 (the reader closes it)
            stream.seek(offset)
            return stream
        return local
    if URL.match(url).group(1).lower() in ("http", "https"):
        return lambda offset: _http(url, offset, timeout)

    def remote(offset: int) -> BinaryIO:
        stream = _fsspec(url)
        stream.seek(offset)
        return stream

    return remote


class ByteStream(io.RawIOBase):
    """A shard read front to back; a read that fails is retried ``retries`` times from the byte
    where it broke, waiting ``backoff`` seconds, then twice as long each time. A missing file,
    an HTTP 404 and the like are not retried. Gives up with :class:`Unavailable`."""

    def __init__(self, url: str, retries: int = 4, backoff: float = 0.5, timeout: float = 30.0) -> None:
        super().__init__()
        self.url, self.retries, self.backoff = url, retries, backoff
        self._open_at, self._stream, self.position = opener(url, timeout), None, 0

    def readable(self) -> bool:
        return True

    def _attempt(self, action: Callable[[], Any]) -> Any:
        for attempt in range(self.retries + 1):
            try:
                if self._stream is None:
                    self._stream = self._open_at(self.position)
                return action()
            except (Unavailable, FileNotFoundError, PermissionError, IsADirectoryError, ImportError):
                raise
            except (OSError, EOFError, http.client.HTTPException) as error:  # a dropped connection, a timeout, a 5xx
                self._drop()
                if attempt == self.retries:
                    reason = getattr(error, "reason", None) or error
                    raise Unavailable(f"{reason} (after {self.retries} retries)") from error
                time.sleep(self.backoff * 2**attempt)
        raise AssertionError("unreachable")

    def readinto(self, buffer: Any) -> int:
        def read() -> int:
            data = self._stream.read(len(buffer))
            if not data and getattr(self._stream, "length", None):  # HTTP: closed before Content-Length
                raise ConnectionError(f"the connection closed with {self._stream.length} bytes to come")
            buffer[: len(data)] = data
            return len(data)

        count = self._attempt(read)
        self.position += count
        return count

    def _drop(self) -> None:
        if self._stream is not None:
            try:
                self._stream.close()
            except Exception:
                pass
            self._stream = None

    def close(self) -> None:
        self._drop()
        super().close()


def open_stream(url: str, retries: int = 4, backoff: float = 0.5) -> BinaryIO:
    """``url`` as a buffered byte stream (see :class:`ByteStream`)."""
    return io.BufferedReader(ByteStream(url, retries, backoff), buffer_size=1 << 20)


def read_bytes(url: str, retries: int = 4, backoff: float = 0.5) -> bytes:
    """The whole of a small file (an ``index.json``, a ``classes.txt``)."""
    with open_stream(url, retries, backoff) as stream:
        return stream.read()


def read_if_there(url: str) -> bytes | None:
    """The whole of a small file, or None where there is none (any failure to read it counts as none)."""
    try:
        return read_bytes(url, retries=0)
    except (Unavailable, FileNotFoundError):
        return None
