"""Where datasets, run outputs and checkpoints live: a local path or an object-store URI.

``location(value)`` turns a config string into either a ``pathlib.Path`` (local paths
and ``file://`` URIs: today's behaviour, unchanged) or a ``Remote`` (``s3://`` and
``gs://``), which offers the subset of ``Path``'s interface the project uses (``/``,
``name``, ``exists``, ``read_text``, ``write_bytes``, ...) on a ``pyarrow.fs`` filesystem —
the same layer Ray Train and Tune use for their ``storage_path``.

S3 settings come from the usual environment variables, read when a bucket is first used:

``AWS_ACCESS_KEY_ID`` / ``AWS_SECRET_ACCESS_KEY`` / ``AWS_SESSION_TOKEN``
    credentials (unset: the AWS SDK's default chain — profile, instance role, ...).
``AWS_ENDPOINT_URL_S3`` or ``AWS_ENDPOINT_URL``
    a custom S3-compatible endpoint, e.g. ``http://127.0.0.1:9000`` (MinIO, moto, Ceph).
``AWS_REGION`` / ``AWS_DEFAULT_REGION``
    the bucket region (default ``us-east-1``).
``FQA_S3_TIMEOUT_S``
    connect and request timeout in seconds (default 10); an unreachable endpoint fails
    after a few attempts of this length instead of hanging.

On a Ray cluster, pass these to every node through the job's runtime environment
(``ray job submit --runtime-env-json '{"env_vars": {...}}'``). Google Cloud Storage
(``gs://``) uses Google's default credentials.

Every failure surfaces as a ``StorageError`` (a ``ValueError``) naming the URI, the
endpoint or the credential in question, and the fix.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path
from urllib.parse import urlparse

import pyarrow as pa
import pyarrow.fs as pafs

REMOTE_SCHEMES = ("s3", "gs")
SCHEMES = (*REMOTE_SCHEMES, "file")
DEFAULT_TIMEOUT_S = 10.0


class StorageError(ValueError):
    """Object storage cannot be used as configured; the message names the value and fix."""


def is_uri(value: str | os.PathLike) -> bool:
    return isinstance(value, Remote) or "://" in str(value)


def check_location(value: str, field: str | None = None) -> str:
    """Config-time check of a path or URI (syntax only: nothing is contacted)."""
    prefix = f"{field}={value!r}: " if field else ""
    if not isinstance(value, str) or not value:
        raise ValueError(f"{prefix}must be a non-empty path or URI")
    if "://" not in value:
        return value
    parsed = urlparse(value)
    if parsed.scheme not in SCHEMES:
        raise ValueError(
            f"{prefix}unsupported scheme {parsed.scheme!r}; use a local path or "
            f"one of {', '.join(s + '://' for s in SCHEMES)}"
        )
    if parsed.scheme in REMOTE_SCHEMES and not parsed.netloc:
        raise ValueError(f"{prefix}no bucket named; write {parsed.scheme}://BUCKET/PREFIX")
    return value


def location(value: str | os.PathLike | Remote) -> Path | Remote:
    """A local ``Path`` for local paths and ``file://`` URIs, else a ``Remote``."""
    if isinstance(value, (Path, Remote)):
        return value
    text = os.fspath(value)
    if "://" not in text:
        return Path(text)
    check_location(text, "storage location")
    parsed = urlparse(text)
    if parsed.scheme == "file":
        return Path(parsed.netloc + parsed.path)
    return Remote(parsed.scheme, f"{parsed.netloc}/{parsed.path.strip('/')}".rstrip("/"))


def is_remote(value) -> bool:
    return isinstance(value, Remote)


# ------------------------------------------------------------------------- filesystems


def _timeout() -> float:
    raw = os.environ.get("FQA_S3_TIMEOUT_S", str(DEFAULT_TIMEOUT_S))
    try:
        value = float(raw)
    except ValueError:
        value = -1
    if not value > 0:
        raise StorageError(
            f"FQA_S3_TIMEOUT_S={raw!r} is not a positive number of seconds; unset it or use e.g. 10"
        )
    return value


def s3_endpoint() -> str | None:
    return os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")


def _s3_settings() -> tuple:
    keys = (
        "AWS_ACCESS_KEY_ID",
        "AWS_SECRET_ACCESS_KEY",
        "AWS_SESSION_TOKEN",
        "AWS_REGION",
        "AWS_DEFAULT_REGION",
    )
    return (s3_endpoint(), _timeout(), *(os.environ.get(k) for k in keys))


@functools.lru_cache(maxsize=8)
def _s3_filesystem(settings: tuple) -> pafs.S3FileSystem:
    endpoint, timeout, key, secret, token, region, default_region = settings
    options = {
        "connect_timeout": timeout,
        "request_timeout": timeout,
        # a few attempts, not the SDK's default of ten with back-off: fail fast and clearly
        "retry_strategy": pafs.AwsStandardS3RetryStrategy(max_attempts=3),
        "region": region or default_region or "us-east-1",
    }
    if endpoint:
        parsed = urlparse(endpoint if "://" in endpoint else f"https://{endpoint}")
        options["endpoint_override"] = parsed.netloc
        options["scheme"] = parsed.scheme
    if key and secret:
        options.update(access_key=key, secret_key=secret, session_token=token)
    return pafs.S3FileSystem(**options)


def filesystem(scheme: str) -> pafs.FileSystem:
    """The pyarrow filesystem for a scheme, built from the current environment."""
    if scheme == "s3":
        return _s3_filesystem(_s3_settings())
    if scheme == "gs":
        return pafs.GcsFileSystem()
    raise StorageError(f"unsupported storage scheme {scheme!r}; use one of {SCHEMES}")


def describe_error(exc: BaseException, uri: str) -> str:
    """One line for a filesystem failure: what went wrong with which value, and the fix."""
    text = str(exc)
    scheme = uri.split("://", 1)[0]
    endpoint = s3_endpoint() if scheme == "s3" else None
    where = f"endpoint {endpoint} (AWS_ENDPOINT_URL)" if endpoint else f"the {scheme} service"
    lowered = text.lower()
    if any(
        s in lowered
        for s in (
            "curl error",
            "couldn't connect",
            "connection refused",
            "timeout",
            "timed out",
            "resolve host",
            "network",
        )
    ):
        return (
            f"{uri}: cannot reach {where} within FQA_S3_TIMEOUT_S={_timeout():g}s ({_first_line(text)}). "
            "Fix: start the server or correct AWS_ENDPOINT_URL"
        )
    if any(
        s in text
        for s in (
            "InvalidAccessKeyId",
            "ACCESS_DENIED",
            "SignatureDoesNotMatch",
            "AccessDenied",
            "InvalidToken",
            "ExpiredToken",
            "HTTP status 403",
        )
    ):
        key = os.environ.get("AWS_ACCESS_KEY_ID")
        return (
            f"{uri}: {where} rejected the credentials (AWS_ACCESS_KEY_ID={key!r}; "
            f"{_first_line(text)}). Fix: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY to a "
            "key with access to this bucket"
        )
    if "NoSuchBucket" in text or "bucket does not exist" in lowered:
        return f"{uri}: bucket {uri.split('://', 1)[1].split('/')[0]!r} does not exist at {where}. Fix: create it or correct the URI"
    return f"{uri}: {_first_line(text)}"


def _first_line(text: str) -> str:
    return " ".join(text.split())[:300]


# ------------------------------------------------------------------------------ Remote


class Remote:
    """An object-store location (``scheme://bucket/key``) with a small Path-like API.

    Object stores have no directories: a "directory" is a key prefix, ``mkdir`` is a
    no-op, and every object write is atomic (readers see the old or the new object).
    """

    def __init__(self, scheme: str, path: str) -> None:
        self.scheme = scheme
        self.path = path.strip("/")  # "bucket/key/..." inside the filesystem

    # -- naming
    def __truediv__(self, part: str | os.PathLike) -> Remote:
        return Remote(self.scheme, f"{self.path}/{os.fspath(part).strip('/')}")

    @property
    def name(self) -> str:
        return self.path.rsplit("/", 1)[-1]

    @property
    def parent(self) -> Remote:
        return Remote(self.scheme, self.path.rsplit("/", 1)[0])

    @property
    def bucket(self) -> str:
        return self.path.split("/", 1)[0]

    def __str__(self) -> str:
        return f"{self.scheme}://{self.path}"

    def __repr__(self) -> str:
        return f"Remote({str(self)!r})"

    def __eq__(self, other) -> bool:
        return isinstance(other, Remote) and str(other) == str(self)

    def __hash__(self) -> int:
        return hash(str(self))

    def __reduce__(self):  # travels to Ray actors as its URI; the filesystem is rebuilt there
        return (Remote, (self.scheme, self.path))

    # -- access
    @property
    def fs(self) -> pafs.FileSystem:
        return filesystem(self.scheme)

    def _call(self, operation, *args):
        try:
            return operation(*args)
        except (OSError, pa.ArrowException) as exc:
            if isinstance(exc, FileNotFoundError):
                raise
            raise StorageError(describe_error(exc, str(self))) from None

    def info(self) -> pafs.FileInfo:
        return self._call(self.fs.get_file_info, self.path)

    def check_bucket(self) -> None:
        """Contact the store once: a missing bucket, bad credentials or an unreachable
        endpoint fail here with a clear message, before any work is done."""
        bucket = self._call(self.fs.get_file_info, self.bucket)
        if bucket.type == pafs.FileType.NotFound:
            raise StorageError(describe_error(OSError("NoSuchBucket"), str(self)))
        self.info()  # listing permission / credentials on the prefix itself

    def exists(self) -> bool:
        return self.info().type != pafs.FileType.NotFound

    def is_file(self) -> bool:
        return self.info().type == pafs.FileType.File

    def is_dir(self) -> bool:
        return self.info().type == pafs.FileType.Directory

    def mkdir(self, parents: bool = True, exist_ok: bool = True) -> None:
        """Object stores have prefixes, not directories: nothing to create."""

    def read_bytes(self) -> bytes:
        def read() -> bytes:
            with self.fs.open_input_stream(self.path) as stream:
                return stream.read()

        try:
            return self._call(read)
        except FileNotFoundError:
            raise FileNotFoundError(f"{self} does not exist") from None

    def read_text(self) -> str:
        return self.read_bytes().decode()

    def write_bytes(self, data: bytes) -> None:
        def write() -> None:
            with self.fs.open_output_stream(self.path) as stream:
                stream.write(data)

        self._call(write)

    def write_text(self, text: str) -> None:
        self.write_bytes(text.encode())

    def iterdir(self) -> list[Remote]:
        selector = pafs.FileSelector(self.path, allow_not_found=True)
        infos = self._call(self.fs.get_file_info, selector)
        return [Remote(self.scheme, info.path) for info in infos]

    def unlink(self, missing_ok: bool = False) -> None:
        try:
            self._call(self.fs.delete_file, self.path)
        except FileNotFoundError:
            if not missing_ok:
                raise

    def rmtree(self) -> None:
        if self.exists():
            self._call(self.fs.delete_dir, self.path)

    def upload(self, local: Path) -> None:
        self._call(pafs.copy_files, str(local), self.path, pafs.LocalFileSystem(), self.fs)

    def download(self, local: Path) -> Path:
        local.parent.mkdir(parents=True, exist_ok=True)
        try:
            self._call(pafs.copy_files, self.path, str(local), self.fs, pafs.LocalFileSystem())
        except FileNotFoundError:
            raise FileNotFoundError(f"{self} does not exist") from None
        return local

    def arrow(self) -> tuple[str, pafs.FileSystem]:
        """(path, filesystem) for pyarrow readers (``pq.ParquetFile`` etc.)."""
        return self.path, self.fs


def arrow_source(path: Path | Remote) -> tuple[str, pafs.FileSystem | None]:
    """What pyarrow's readers take for a local path or a Remote."""
    return path.arrow() if isinstance(path, Remote) else (str(path), None)


def rmtree(path: Path | Remote) -> None:
    if isinstance(path, Remote):
        path.rmtree()
    else:
        import shutil

        shutil.rmtree(path, ignore_errors=True)


def fetch(value: str | os.PathLike, cache_dir: Path | None = None) -> Path:
    """A local file for a path or URI: remote objects are downloaded once per process."""
    where = location(value)
    if not isinstance(where, Remote):
        return where
    cache = cache_dir or process_cache()
    local = cache / "fetched" / where.scheme / where.path
    if not local.is_file():
        tmp = local.with_name(f".{local.name}.part")
        where.download(tmp)
        tmp.replace(local)
    return local


@functools.lru_cache(maxsize=1)
def process_cache() -> Path:
    import atexit
    import shutil
    import tempfile

    root = Path(tempfile.mkdtemp(prefix="fqa-storage-"))
    atexit.register(shutil.rmtree, root, True)
    return root


def scratch_dir(prefix: str) -> Path:
    """A fresh local directory removed when the process exits (remote runs stage here)."""
    import tempfile

    return Path(tempfile.mkdtemp(prefix=prefix, dir=process_cache()))
