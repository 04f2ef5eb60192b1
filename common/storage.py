"""Object storage: one interface over S3 (boto3) and a local folder.

A `Storage` is rooted at a URI (`s3://bucket/prefix/` or a folder) and addressed by keys: relative,
'/'-separated, no empty, `.` or `..` segments. The same key rules apply on both back ends, so a layout
that works locally works on S3. Full object URIs (`s3://bucket/a/b.png`, `/data/a/b.png`) are handled by
`split_uri` and `read_uri`.

Failure model: a missing object raises `StorageNotFound` (a `KeyError`); a key that would leave a local
root raises `UnsafeKeyError` (a `ValueError`); an object larger than a reader's `max_bytes` raises
`ObjectTooLarge` (a `ValueError`) without being downloaded; transient S3 trouble (connection errors, 5xx, throttling)
is retried by botocore with exponential backoff and, once retries are spent, raises `StorageUnavailable`
so that callers (Celery tasks) can retry later. Local writes are atomic (temp file + `os.replace`).
"""

from __future__ import annotations

import errno
import logging
import mimetypes
import os
import re
import shutil
import stat
import tempfile
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any, BinaryIO
from urllib.parse import unquote, urlsplit

from common.logs import log_event
from common.per_process import PerProcess
from common.settings import aws_endpoint_url, s3_max_attempts, s3_timeout

logger = logging.getLogger(__name__)

_TMP_PREFIX = ".totalrecall-tmp-"


class StorageError(Exception):
    """A storage operation failed; the message names the URI."""


class StorageNotFound(StorageError, KeyError):
    """No object at the URI."""

    def __str__(self) -> str:  # KeyError would print the repr of the message
        return str(self.args[0]) if self.args else "object not found"


class StorageUnavailable(StorageError):
    """The store did not answer (connection error, 5xx, throttling) even after retries: try again later."""


class UnsafeKeyError(StorageError, ValueError):
    """The key is malformed or would resolve outside the storage root."""


class ObjectTooLarge(StorageError, ValueError):
    """The object is larger than the reader accepts; it was not downloaded."""


class NotAFile(StorageError, ValueError):
    """A local path names something other than a regular file (a pipe, a device): it is not read, since
    reading a pipe would wait for a writer for ever."""


def _check_regular(mode: int, uri: str) -> None:
    if stat.S_ISDIR(mode):
        raise StorageNotFound(f"no object at {uri}: it is a folder")
    if not stat.S_ISREG(mode):
        raise NotAFile(f"{uri} is not a regular file (a pipe, socket or device); not read")


def _check_size(size: int, max_bytes: int | None, uri: str) -> None:
    if max_bytes is not None and size > max_bytes:
        raise ObjectTooLarge(f"object at {uri} is {size:,} bytes, above the limit of {max_bytes:,} "
                             "(TOTALRECALL_MAX_IMAGE_BYTES); not downloaded")


class Storage(ABC):
    """Objects under one root URI, addressed by relative '/'-separated keys."""

    root_uri: str  # ends with '/' (S3) or is an absolute folder path (local)

    @abstractmethod
    def put_bytes(self, key: str, data: bytes, content_type: str | None = None) -> str:
        """Store `data` at `key` (replacing any object there); returns the object's URI."""

    @abstractmethod
    def get_bytes(self, key: str, max_bytes: int | None = None) -> bytes:
        """The object's content; `StorageNotFound` if there is none, `ObjectTooLarge` above `max_bytes`."""

    @abstractmethod
    def exists(self, key: str) -> bool: ...

    @abstractmethod
    def list(self, prefix: str = "") -> list[str]:
        """Keys starting with `prefix` (a plain string prefix, not only a folder), recursive, sorted."""

    @abstractmethod
    def delete(self, key: str) -> None:
        """Remove the object; deleting a missing object is not an error."""

    @abstractmethod
    def uri_for(self, key: str) -> str:
        """The full URI of `key`, accepted by `split_uri` / `read_uri`."""

    @abstractmethod
    def put_file(self, key: str, path: str | Path, content_type: str | None = None) -> str:
        """Upload a (possibly large) local file without reading it into memory; returns the URI."""

    @abstractmethod
    def get_file(self, key: str, path: str | Path) -> Path:
        """Download to `path` atomically (a partial download never appears there); returns `path`."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.root_uri!r})"


def open_storage(
    uri: str | Path, *, endpoint_url: str | None = None, max_attempts: int | None = None
) -> Storage:
    """The storage rooted at `uri`: `s3://bucket[/prefix]`, `file:///folder` or a plain folder path.

    For S3, `endpoint_url` defaults to `AWS_ENDPOINT_URL` and `max_attempts` to `TOTALRECALL_S3_MAX_ATTEMPTS`.
    A local folder is created if missing.
    """
    text = str(uri)
    if text.startswith("s3://"):
        bucket, prefix = _parse_s3(text)
        return S3Storage(bucket, prefix, endpoint_url=endpoint_url, max_attempts=max_attempts)
    return LocalStorage(_local_path(text))


def split_uri(uri: str | Path) -> tuple[str, str]:
    """Split a full object URI into (storage root URI, key), so `open_storage(root).get_bytes(key)` reads it.

    `s3://bucket/archive/img 1.png` -> (`s3://bucket/`, `archive/img 1.png`);
    `/data/archive/img 1.png` (or `file:///data/...`) -> (`/`, `data/archive/img 1.png`).
    """
    text = str(uri)
    if text.startswith("s3://"):
        bucket, key = _parse_s3(text)
        if not key or key.endswith("/"):
            raise UnsafeKeyError(f"{text!r} names a bucket or folder, not an object")
        return f"s3://{bucket}/", key
    path = _local_path(text)
    anchor = path.anchor
    key = path.as_posix()[len(Path(anchor).as_posix()) :]
    if not key:
        raise UnsafeKeyError(f"{text!r} names a folder, not an object")
    return anchor, key


def read_uri(uri: str | Path, max_bytes: int | None = None) -> bytes:
    """Content of the object at a full URI (see `split_uri`); `ObjectTooLarge` above `max_bytes`."""
    root, key = split_uri(uri)
    return open_storage(root).get_bytes(key, max_bytes)


def absolute_uri(uri: str | Path) -> str:
    """`uri` in the form stored in the database: S3 URIs unchanged, local paths absolute (`storable`)."""
    text = str(uri)
    return text if text.startswith("s3://") else storable(str(_local_path(text)))


_ESCAPED_BYTE = re.compile(rb"\\x([89a-f][0-9a-f])")


def storable(path: str) -> str:
    """A local path as text that a database can hold: the bytes of a name that are not UTF-8 (which Python
    holds as lone surrogates, e.g. a Latin-1 "Pr\xfcfteil.png") written as `\\xHH`, as `ls -b` shows them.
    `_local_path` finds the file again from that text."""
    try:
        path.encode("utf-8")
    except UnicodeEncodeError:
        return os.fsencode(path).decode("utf-8", "backslashreplace")
    return path


def _unescaped(path: Path) -> Path:
    """The path that `storable` wrote as `path`, or `path` itself when there is no such file."""
    if "\\x" not in str(path) or os.path.lexists(path):
        return path
    found = Path(os.fsdecode(_ESCAPED_BYTE.sub(lambda m: bytes([int(m[1], 16)]), os.fsencode(path))))
    return found if os.path.lexists(found) else path


def real_location(uri: str) -> str:
    """Where the object at `uri` really is, to tell whether two URIs name one file: a local path with its
    links resolved (as `storable` text), an S3 URI as it is (S3 has no links)."""
    if uri.startswith("s3://"):
        return uri
    return storable(os.path.realpath(_local_path(uri)))


def list_uris(prefix_uri: str | Path, suffixes: tuple[str, ...] | None = None,
              refuse_unreadable: bool = False) -> list[str]:
    """Full URIs of the objects under a folder-like URI (`s3://bucket/archive/2026-11-27/`, a folder), sorted.

    `suffixes` keeps only names ending in one of them (case-insensitive), e.g. `common.images.IMAGE_SUFFIXES`.
    A local folder that does not exist lists as empty (and is not created). A local subfolder that cannot
    be read is listed too, whatever `suffixes` say: reading it fails with the reason (permission denied),
    so its images are not skipped silently; with `refuse_unreadable` it raises `StorageError` instead (a
    training folder: a fit on part of it would pass for a fit on all of it). A local folder that cannot be
    read itself raises `StorageError`.
    """
    text = str(prefix_uri)
    if not text.startswith("s3://") and not _local_path(text).is_dir():
        return []
    storage = open_storage(text)
    keys, unlisted = walk_keys(storage, follow_links_out=True)
    if unlisted and refuse_unreadable:
        raise StorageError(f"cannot read {', '.join(unlisted[:3])}" + (" ..." if len(unlisted) > 3 else "")
                           + f" under {text} (permission denied): its images would be left out")
    if suffixes is not None:
        keys = [k for k in keys if k.lower().endswith(suffixes)]
    return [listed_uri(storage, key) for key in sorted(keys + unlisted)]


def walk_keys(storage: Storage, follow_links_out: bool = False) -> tuple[list[str], list[str]]:
    """All keys of `storage`, and apart from them the local folders that could not be read (`LocalStorage.walk`;
    none on S3)."""
    if isinstance(storage, LocalStorage):
        return storage.walk(follow_links_out=follow_links_out)
    return storage.list(), []


def listed_uri(storage: Storage, key: str) -> str:
    """The URI of a listed object. S3 allows keys this code will not address (`a//b.png`, `a/../b.png`):
    they are listed all the same, and reading one fails as that image's failure, with the reason, instead
    of failing the whole folder's listing (or skipping the image silently). A local name that is not UTF-8
    is listed as `storable` writes it."""
    try:
        uri = storage.uri_for(key)
    except UnsafeKeyError:
        uri = storage.root_uri + key
    return storable(uri) if isinstance(storage, LocalStorage) else uri


def check_key(key: str) -> str:
    """`key` if it is a valid relative object key, else `UnsafeKeyError`."""
    if not isinstance(key, str) or not key:
        raise UnsafeKeyError(f"storage key must be a non-empty string, got {key!r}")
    if "\x00" in key:
        raise UnsafeKeyError(f"storage key contains a NUL byte: {key!r}")
    if key.startswith("/"):
        raise UnsafeKeyError(f"storage key must be relative, got absolute {key!r}")
    for segment in key.split("/"):
        if segment in ("", ".", ".."):
            raise UnsafeKeyError(f"storage key {key!r} has an empty, '.' or '..' segment")
    return key


def _check_prefix(prefix: str) -> str:
    """A list prefix: empty, or a key (optionally ending in '/')."""
    if prefix:
        check_key(prefix[:-1] if prefix.endswith("/") else prefix)
    return prefix


def _parse_s3(uri: str) -> tuple[str, str]:
    """(bucket, rest) of `s3://bucket/rest`; the rest is taken literally (no percent-decoding)."""
    bucket, _, rest = uri[len("s3://") :].partition("/")
    if not bucket:
        raise ValueError(f"S3 URI without a bucket: {uri!r}")
    return bucket, rest


def _local_path(uri: str) -> Path:
    if uri.startswith("file://"):
        parts = urlsplit(uri)
        if parts.netloc not in ("", "localhost"):
            raise ValueError(f"file URI on another host is not supported: {uri!r}")
        uri = unquote(parts.path)
    elif "://" in uri:
        raise ValueError(f"unsupported storage URI scheme: {uri!r} (use s3://, file:// or a path)")
    # normalised ("data/../imgs" -> "imgs"): the keys of what it lists never hold ".." segments
    return _unescaped(Path(os.path.normpath(Path(uri).expanduser().absolute())))


def _current_umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


_FILE_MODE = 0o666 & ~_current_umask()  # what open() would have given; mkstemp creates 0600


class LocalStorage(Storage):
    """Objects as files under a root folder. Keys never resolve outside it, even through symlinks."""

    def __init__(self, root: str | Path) -> None:
        root_path = Path(root).expanduser().absolute()
        root_path.mkdir(parents=True, exist_ok=True)
        self.root = root_path.resolve()
        self.root_uri = str(root_path)

    def _path(self, key: str) -> Path:
        check_key(key)
        path = self.root.joinpath(*key.split("/"))
        try:
            resolved = path.resolve()
        except (RuntimeError, OSError) as exc:  # a symlink loop: Python 3.11 raises RuntimeError
            raise StorageNotFound(f"no object at {self.uri_for(key)}: {exc}") from exc
        if not resolved.is_relative_to(self.root):
            raise UnsafeKeyError(f"storage key {key!r} resolves to {resolved}, outside the root {self.root}")
        return path

    def put_bytes(self, key: str, data: bytes, content_type: str | None = None) -> str:
        path = self._path(key)
        self._atomic_write(key, path, lambda f: f.write(data))
        return self.uri_for(key)

    def get_bytes(self, key: str, max_bytes: int | None = None) -> bytes:
        with self._open_file(key) as f:
            _check_size(os.fstat(f.fileno()).st_size, max_bytes, self.uri_for(key))
            data = f.read() if max_bytes is None else f.read(max_bytes + 1)
        _check_size(len(data), max_bytes, self.uri_for(key))  # it grew after the stat
        return data

    def _open_file(self, key: str) -> BinaryIO:
        """The regular file at `key`, open for reading. Anything else is refused before it is opened (opening
        a pipe waits for a writer, opening a device can act on it: a tape rewinds) and checked again once
        open, non-blocking, in case it was replaced meanwhile."""
        path, uri = self._path(key), self.uri_for(key)
        try:
            mode = os.stat(path).st_mode
            if stat.S_ISDIR(mode) and not os.access(path, os.R_OK | os.X_OK):  # listed as unreadable (`walk`)
                raise PermissionError(errno.EACCES, f"a folder that cannot be read ({os.strerror(errno.EACCES)})",
                                      str(path))
            _check_regular(mode, uri)
            fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError) as exc:
            raise StorageNotFound(f"no object at {uri}") from exc
        f = open(fd, "rb")  # noqa: SIM115 - returned to the caller, who closes it
        try:
            _check_regular(os.fstat(fd).st_mode, uri)
        except BaseException:
            f.close()
            raise
        return f

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def list(self, prefix: str = "", follow_links_out: bool = False) -> list[str]:
        """Keys under `prefix`, linked folders followed (once each: a file reached both by its real path
        and through a link is listed under its real path where that is listed too). A linked folder leading
        out of the root is followed only with `follow_links_out` (`list_uris`, whose keys are read from "/"
        as full paths); otherwise it is listed as a key, whose reading fails with the reason, and logged.
        So is a folder below `prefix` that cannot be read (see `walk`)."""
        keys, unlisted = self.walk(prefix, follow_links_out)
        return sorted(keys + unlisted)

    def walk(self, prefix: str = "", follow_links_out: bool = False) -> tuple[list[str], list[str]]:
        """`list`'s keys, and apart from them the keys of the folders below `prefix` that could not be
        read (permission denied; reading such a key fails with the reason); `StorageError` if the folder of
        `prefix` itself cannot be read."""
        _check_prefix(prefix)
        folder = prefix.rpartition("/")[0]
        base = self._path(folder) if folder else self.root
        keys, walked, unlisted = [], set(), []

        def unreadable(exc: OSError) -> None:
            if isinstance(exc, FileNotFoundError | NotADirectoryError):
                return  # no such folder (or gone meanwhile): nothing in it to list
            where = Path(exc.filename or base)
            if where == base:
                raise StorageError(f"cannot list {base}: {exc.strerror or exc}") from exc
            key = where.relative_to(self.root).as_posix()
            if key.startswith(prefix):
                unlisted.append(key)

        for dirpath, dirs, files in os.walk(base, onerror=unreadable, followlinks=True):
            if os.path.realpath(dirpath) in walked:  # a link back to a folder already walked: no cycles
                dirs[:] = []
                continue
            walked.add(os.path.realpath(dirpath))
            dirs.sort(key=lambda d: (os.path.islink(os.path.join(dirpath, d)), d))  # real folders first
            escaping = [] if follow_links_out else [
                d for d in dirs if not Path(dirpath, d).resolve().is_relative_to(self.root)]
            dirs[:] = [d for d in dirs if d not in escaping]
            for name in escaping:
                log_event(logger, logging.WARNING, "storage_link_outside_root", folder_link=str(Path(dirpath, name)),
                          root=str(self.root))
            for name in files + escaping:
                if name.startswith(_TMP_PREFIX):
                    continue
                key = Path(dirpath, name).relative_to(self.root).as_posix()
                if key.startswith(prefix):
                    keys.append(key)
        return sorted(keys), sorted(unlisted)

    def delete(self, key: str) -> None:
        path = self._path(key)
        path.unlink(missing_ok=True)

    def uri_for(self, key: str) -> str:
        check_key(key)
        return str(Path(self.root_uri, *key.split("/")))

    def put_file(self, key: str, path: str | Path, content_type: str | None = None) -> str:
        target = self._path(key)
        with open(path, "rb") as src:
            self._atomic_write(key, target, lambda f: shutil.copyfileobj(src, f, 1 << 20))
        return self.uri_for(key)

    def get_file(self, key: str, path: str | Path) -> Path:
        dest = Path(path)
        dest.parent.mkdir(parents=True, exist_ok=True)
        with self._open_file(key) as src:
            _write_atomically(dest, lambda f: shutil.copyfileobj(src, f, 1 << 20))
        return dest

    def _atomic_write(self, key: str, path: Path, write: Any) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._path(key)  # re-check: a symlinked folder may have been created meanwhile
        _write_atomically(path, write)


def _write_atomically(path: Path, write: Any) -> None:
    """Write via a temp file in the same folder, fsync, then rename over `path`."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=_TMP_PREFIX)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, _FILE_MODE)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


# --- S3 -----------------------------------------------------------------------------------------------

# Error codes that mean "try again later" rather than "your request is wrong".
_TRANSIENT_CODES = {
    "SlowDown",
    "Throttling",
    "ThrottlingException",
    "RequestTimeout",
    "RequestTimeoutException",
    "InternalError",
    "ServiceUnavailable",
    "RequestLimitExceeded",
    "TooManyRequestsException",
    "OperationAborted",  # a conflicting operation on the bucket is in progress: AWS says to try again
}
_NOT_FOUND_CODES = {"NoSuchKey", "404", "NotFound"}

_clients: PerProcess[tuple[Any, ...], Any] = PerProcess()


def _s3_client(endpoint_url: str | None, max_attempts: int, timeout: int) -> Any:
    """A shared boto3 S3 client per (process, endpoint, attempts, timeout); clients are thread-safe."""

    def make() -> Any:
        import boto3
        from botocore.config import Config

        config = Config(
            retries={"max_attempts": max_attempts, "mode": "standard"},
            connect_timeout=min(5, timeout),
            read_timeout=timeout,
            max_pool_connections=32,
        )
        return boto3.session.Session().client("s3", endpoint_url=endpoint_url, config=config)

    return _clients.get((endpoint_url, max_attempts, timeout), make)


class S3Storage(Storage):
    """Objects under `s3://bucket/prefix/`."""

    def __init__(
        self,
        bucket: str,
        prefix: str = "",
        *,
        endpoint_url: str | None = None,
        max_attempts: int | None = None,
    ) -> None:
        if prefix:
            check_key(prefix.rstrip("/"))
            prefix = prefix.rstrip("/") + "/"
        self.bucket = bucket
        self.prefix = prefix
        self.root_uri = f"s3://{bucket}/{prefix}"
        self.client = _s3_client(
            endpoint_url or aws_endpoint_url(),
            max_attempts if max_attempts is not None else s3_max_attempts(),
            s3_timeout(),
        )

    def _key(self, key: str) -> str:
        return self.prefix + check_key(key)

    def put_bytes(self, key: str, data: bytes, content_type: str | None = None) -> str:
        s3_key = self._key(key)
        with self._errors(key):
            self.client.put_object(
                Bucket=self.bucket, Key=s3_key, Body=data, ContentType=content_type or _guess_type(key)
            )
        return self.uri_for(key)

    def get_bytes(self, key: str, max_bytes: int | None = None) -> bytes:
        from botocore.exceptions import HTTPClientError, IncompleteReadError

        s3_key = self._key(key)
        # botocore retries the request, not the body stream: a connection dropped mid-body is retried here.
        for attempt in range(3):
            with self._errors(key):
                response = self.client.get_object(Bucket=self.bucket, Key=s3_key)
                try:
                    if max_bytes is not None and int(response.get("ContentLength") or 0) > max_bytes:
                        response["Body"].close()
                        _check_size(int(response["ContentLength"]), max_bytes, self.uri_for(key))
                    return response["Body"].read()
                except (HTTPClientError, IncompleteReadError):  # read timeout, connection closed mid-body
                    response["Body"].close()  # its pooled connection is not reused half-read
                    if attempt == 2:
                        raise
        raise AssertionError("unreachable")

    def exists(self, key: str) -> bool:
        s3_key = self._key(key)
        try:
            with self._errors(key):
                self.client.head_object(Bucket=self.bucket, Key=s3_key)
        except StorageNotFound:
            return False
        return True

    def list(self, prefix: str = "") -> list[str]:
        """Keys under `prefix`, linked folders followed. A link that leads out of the root is listed
        but not followed: reading it fails with the reason, so it is never skipped silently."""
        _check_prefix(prefix)
        paginator = self.client.get_paginator("list_objects_v2")
        keys = []
        with self._errors(prefix):  # the error names the listed folder itself
            for page in paginator.paginate(Bucket=self.bucket, Prefix=self.prefix + prefix):
                keys.extend(obj["Key"][len(self.prefix) :] for obj in page.get("Contents", ()))
        return sorted(k for k in keys if k and not k.endswith("/"))  # skip "folder" marker objects

    def delete(self, key: str) -> None:
        s3_key = self._key(key)
        with self._errors(key):
            self.client.delete_object(Bucket=self.bucket, Key=s3_key)

    def uri_for(self, key: str) -> str:
        return f"s3://{self.bucket}/{self._key(key)}"

    def put_file(self, key: str, path: str | Path, content_type: str | None = None) -> str:
        s3_key = self._key(key)
        with self._errors(key):
            self.client.upload_file(
                str(path), self.bucket, s3_key, ExtraArgs={"ContentType": content_type or _guess_type(key)}
            )
        return self.uri_for(key)

    def get_file(self, key: str, path: str | Path) -> Path:
        s3_key = self._key(key)
        dest = Path(path)
        dest.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=_TMP_PREFIX)
        os.close(fd)
        try:
            with self._errors(key):
                self.client.download_file(self.bucket, s3_key, tmp)
            os.chmod(tmp, _FILE_MODE)
            os.replace(tmp, dest)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return dest

    def _errors(self, key: str) -> _S3Errors:
        return _S3Errors(self, key)


class _S3Errors:
    """Context manager translating botocore/boto3 exceptions into Storage errors that name the URI."""

    def __init__(self, storage: S3Storage, key: str) -> None:
        self.storage = storage
        self.key = key

    def __enter__(self) -> None:
        return None

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: Any) -> None:
        if exc is None or isinstance(exc, StorageError) or not isinstance(exc, Exception):
            return
        self._translate(exc)

    def _translate(self, exc: Exception) -> None:
        """Raise the Storage error for `exc`; return if it is none of S3's."""
        from boto3.exceptions import RetriesExceededError, S3TransferFailedError, S3UploadFailedError
        from botocore.exceptions import (
            BotoCoreError,
            ClientError,
            ConnectionError,
            HTTPClientError,
            IncompleteReadError,
            SSLError,
        )

        uri = f"s3://{self.storage.bucket}/{self.storage.prefix}{self.key}"
        if isinstance(exc, ClientError):
            error = exc.response.get("Error", {})
            code = str(error.get("Code", ""))
            status = int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0)
            if code in _NOT_FOUND_CODES:
                raise StorageNotFound(f"no object at {uri}") from exc
            if code == "NoSuchBucket":
                raise StorageError(
                    f"bucket {self.storage.bucket!r} does not exist (accessing {uri})"
                ) from exc
            if code in _TRANSIENT_CODES or (status >= 500 and status != 501) or status == 429:  # 501: never
                raise StorageUnavailable(
                    f"S3 unavailable for {uri}: {code or status} (retries exhausted)"
                ) from exc
            raise StorageError(f"S3 error for {uri}: {code or status}: {error.get('Message', '')}") from exc
        if isinstance(exc, SSLError):  # a certificate that fails verification does not heal by waiting
            raise StorageError(f"TLS error reaching S3 for {uri}: {exc}") from exc
        if isinstance(exc, ConnectionError | HTTPClientError | IncompleteReadError):
            raise StorageUnavailable(f"cannot reach S3 for {uri}: {exc} (retries exhausted)") from exc
        if isinstance(exc, RetriesExceededError):  # download_file's retries of failed reads ran out
            raise StorageUnavailable(f"cannot read {uri} from S3: {exc} (retries exhausted)") from exc
        if isinstance(exc, S3UploadFailedError | S3TransferFailedError):
            # boto3's transfer manager raises these while handling the original error: classify that one
            # (a throttled or failing upload is transient), else go by the message it flattens in.
            cause = exc.__cause__ or exc.__context__
            if isinstance(cause, Exception) and not isinstance(cause, S3UploadFailedError | S3TransferFailedError):
                self._translate(cause)
            if "404" in str(exc) or "NoSuchKey" in str(exc) or "Not Found" in str(exc):
                raise StorageNotFound(f"no object at {uri}") from exc
            raise StorageError(f"S3 transfer failed for {uri}: {exc}") from exc
        if isinstance(exc, BotoCoreError):
            raise StorageError(f"S3 error for {uri}: {exc}") from exc


def _guess_type(key: str) -> str:
    return mimetypes.guess_type(key)[0] or "application/octet-stream"
