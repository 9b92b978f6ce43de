"""Download of remote video sources into a local cache folder.

A source is remote when its scheme is http:// or https:// (fetched with httpx), or a protocol of fsspec whose
implementation is installed here (fetched with fsspec): s3:// with s3fs, gs:// with gcsfs, memory://, ftp://,
hf://, ... `unsupported_reason` says why any other scheme is not: one fsspec does not know, one whose package is
missing (naming the package to install), file:// (a local path), or one of fsspec's wrappers and archives
(simplecache://, zip://, ...), which name no file by themselves.

A download streams into a hidden `.part` file next to its destination and is renamed only once complete, so a
partly written file is never mistaken for a cached one. The cached name is derived from the URL (a hash plus the
URL's extension), so a second fetch of the same URL returns the file without a request.

Errors are split by what a retry can do: `TransientDownloadError` (connection failures, timeouts, HTTP 5xx, 408,
429, a busy or failing object store) may succeed later; `PermanentDownloadError` (other 4xx, a missing object,
access denied, unsupported schemes, bad URLs) will not. Messages name the URL without credentials or query
string: signed URLs carry their secrets there.

Credentials of fsspec sources come from where their library looks for them, never from the manifest: for s3://
the AWS variables (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_SESSION_TOKEN, AWS_ENDPOINT_URL, AWS_PROFILE),
~/.aws, or an instance role; for any protocol, fsspec's config (~/.config/fsspec/*.json, FSSPEC_S3_KEY-style
variables). The values of secret-looking environment variables are blanked out of every error message.
"""

import contextlib
import errno
import functools
import hashlib
import logging
import os
import re
import tempfile
import time
from pathlib import Path, PurePosixPath
from typing import Iterator
from urllib.parse import unquote, urlsplit, urlunsplit

import fsspec
import httpx
from fsspec.config import conf as fsspec_config

logger = logging.getLogger(__name__)

CHUNK_BYTES = 1 << 20  # write in 1 MiB pieces: few syscalls, bounded memory
TRANSIENT_STATUS = frozenset({408, 429})  # plus every 5xx
HTTP_SCHEMES = ("http", "https")
LOCAL_PROTOCOLS = frozenset({"file", "local"})  # file:// sources are local paths (the listing unwraps them)
# fsspec protocols that wrap another file system or open an archive: without their options they name no file.
WRAPPER_PROTOCOLS = frozenset({
    "async_wrapper", "asyncwrapper", "asynclocal", "blockcache", "cached", "dir", "filecache", "generic",
    "libarchive", "reference", "simplecache", "tar", "zip",
})  # fmt: skip
SCHEME = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*)://")
# Errors of object stores that a retry can help with: busy (S3 SlowDown, 503), failing (500), network trouble.
TRANSIENT_ERRNOS = frozenset({
    errno.EAGAIN, errno.EBUSY, getattr(errno, "EREMOTEIO", errno.EIO), errno.ETIMEDOUT, errno.ECONNRESET,
    errno.ECONNREFUSED, errno.ECONNABORTED, errno.ENETUNREACH, errno.EHOSTUNREACH,
})  # fmt: skip
SECRET_VARIABLE = re.compile(r"SECRET|TOKEN|PASSWORD|CREDENTIAL|ACCESS_KEY|API_KEY", re.IGNORECASE)


DOWNLOAD_FOLDER = "fvlm-downloads"  # under the system temp dir, unless a config names a folder


def download_folder(configured: str | os.PathLike | None) -> Path:
    """Where remote sources are fetched: the configured folder, or `fvlm-downloads` in the system temp dir."""
    return Path(configured) if configured else Path(tempfile.gettempdir()) / DOWNLOAD_FOLDER


class DownloadError(Exception):
    """A remote source could not be downloaded; the message holds no value of a secret-looking variable."""

    def __init__(self, message: str):
        super().__init__(_blank_secrets(message))


class TransientDownloadError(DownloadError):
    """A download failed in a way that may pass on a later try (network, timeout, HTTP 5xx, 408, 429)."""


class PermanentDownloadError(DownloadError):
    """A download failed in a way a retry cannot fix (HTTP 4xx, missing object, unsupported scheme, bad URL)."""


def source_scheme(source: str) -> str:
    """The lower-case scheme of a URL ('s3' for 'S3://b/k'), or '' for a path."""
    match = SCHEME.match(source)
    return match.group(1).lower() if match else ""


@functools.cache
def unsupported_reason(scheme: str) -> str | None:
    """None when sources of this (lower-case) scheme can be downloaded; otherwise why not, in a few words."""
    if scheme in HTTP_SCHEMES:
        return None
    if not scheme:
        return "a local path, not a URL"
    if scheme in LOCAL_PROTOCOLS:
        return f"{scheme}:// names a local file"
    if scheme in WRAPPER_PROTOCOLS or scheme not in set(fsspec.available_protocols()) | set(fsspec.registry):
        return f"{scheme}:// is not a protocol fsspec can download a file from"
    try:
        fsspec.get_filesystem_class(scheme)
    except ImportError as exc:  # fsspec's message says what to install, e.g. 'Install s3fs to access S3'
        hint = exc.args[0] if exc.args and exc.args[0] else f"install the package that provides it ({exc.__cause__})"
        return f"{scheme}:// needs a package that is not installed: {hint}"
    return None


def is_remote(source: str) -> bool:
    """True for sources to download: http(s):// and installed fsspec protocols (s3://, ...), any letter case."""
    scheme = source_scheme(source)
    return bool(scheme) and unsupported_reason(scheme) is None


def redact_url(url: str) -> str:
    """The URL without user:password@, query string and fragment: safe to put in logs and error messages."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<malformed URL>"
    host = parts.netloc.rpartition("@")[2]
    return urlunsplit((parts.scheme, host, parts.path, "", ""))


def cached_name(url: str) -> str:
    """Stable file name for a URL: 24 hex digits of its SHA-256 plus the extension of its path (e.g. '.mp4')."""
    digest = hashlib.sha256(url.encode("utf-8")).hexdigest()[:24]
    suffix = PurePosixPath(unquote(urlsplit(url).path)).suffix.lower()
    # Keep only plain extensions: the name must be safe on every file system and recognisable by ffmpeg.
    return digest + (suffix if re.fullmatch(r"\.[a-z0-9]{1,8}", suffix) else "")


def fetch(
    url: str, dest_dir: Path, timeout_s: float = 60.0, attempts: int = 1, backoff_s: float = 1.0
) -> Path:
    """Download `url` into `dest_dir` (or return the cached file) and return its path.

    `timeout_s` bounds each network operation (connect, each read), not the whole transfer. With `attempts > 1`,
    transient errors are retried after `backoff_s`, 2 * `backoff_s`, 4 * `backoff_s`, ... seconds; permanent
    errors are raised at once.
    """
    if attempts < 1:
        raise ValueError(f"attempts must be at least 1, got {attempts}")
    if not is_remote(url):
        reason = unsupported_reason(source_scheme(url))
        raise PermanentDownloadError(f"cannot download {redact_url(url)}: {reason}")
    dest = Path(dest_dir) / cached_name(url)
    if dest.is_file():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    for attempt in range(1, attempts + 1):
        try:
            _download(url, dest, timeout_s)
            return dest
        except TransientDownloadError as exc:
            if attempt == attempts:
                if attempts == 1:
                    raise
                raise TransientDownloadError(f"{exc} (gave up after {attempts} attempts)") from None
            delay = backoff_s * 2 ** (attempt - 1)
            logger.warning("%s; retry %d of %d in %.1f s", exc, attempt, attempts - 1, delay)
            time.sleep(delay)
    raise AssertionError("unreachable: the loop returns or raises")


def _download(url: str, dest: Path, timeout_s: float) -> None:
    """One attempt: stream the body into a hidden temporary file in dest's folder, then rename it onto dest."""
    blocks = _http_blocks if source_scheme(url) in HTTP_SCHEMES else _fsspec_blocks
    fd, part = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".part")
    try:
        with os.fdopen(fd, "wb") as out:
            for block in blocks(url, timeout_s):
                out.write(block)
        os.replace(part, dest)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(part)  # gone already after a successful rename


def _http_blocks(url: str, timeout_s: float) -> Iterator[bytes]:
    """The body of an http(s) URL in pieces; httpx's errors become download errors."""
    safe = redact_url(url)
    try:
        with httpx.stream("GET", url, timeout=timeout_s, follow_redirects=True) as response:
            _check_status(response, safe)
            yield from response.iter_bytes(CHUNK_BYTES)
    except (httpx.TimeoutException, httpx.NetworkError, httpx.RemoteProtocolError, httpx.ProxyError) as exc:
        # `from None`: the chained httpx exception would print the full URL, secrets included, in tracebacks.
        raise TransientDownloadError(f"download of {safe} failed: {_describe(exc, url, safe)}") from None
    except (httpx.HTTPError, httpx.InvalidURL) as exc:  # unsupported protocol, too many redirects, bad URL, ...
        raise PermanentDownloadError(f"download of {safe} failed: {_describe(exc, url, safe)}") from None


def _fsspec_blocks(url: str, timeout_s: float) -> Iterator[bytes]:
    """The bytes of an fsspec URL (s3://bucket/key, ...) in pieces; the back end's errors become download errors."""
    safe = redact_url(url)
    scheme = source_scheme(url)
    try:
        fs, path = fsspec.core.url_to_fs(scheme + url[len(scheme):], **_storage_options(scheme, timeout_s))
        with fs.open(path, "rb") as source:
            while block := source.read(CHUNK_BYTES):
                yield block
    except Exception as exc:  # noqa: BLE001 - back ends raise their own types (botocore's are no OSError):
        # each is classified, so that a bad source is a failed video rather than a crashed listing or chunk.
        raise _fsspec_failure(exc, url, safe) from None


def _fsspec_failure(exc: Exception, url: str, safe: str) -> DownloadError:
    """The download error for an fsspec back end's exception: 'not found', 'access denied' or its own words."""
    details = _describe(exc, url, safe)
    if isinstance(exc, FileNotFoundError):
        return PermanentDownloadError(f"download of {safe} failed: not found ({details})")
    if isinstance(exc, PermissionError):
        return PermanentDownloadError(f"download of {safe} failed: access denied, check the credentials ({details})")
    kind = TransientDownloadError if _is_transient(exc) else PermanentDownloadError
    return kind(f"download of {safe} failed: {details}")


def _storage_options(scheme: str, timeout_s: float) -> dict:
    """Options bounding each network step by `timeout_s` and leaving retries to `fetch`, for back ends that take
    them (s3fs). Credentials, endpoint and the rest come from fsspec's config and the library's own defaults."""
    if scheme not in ("s3", "s3a"):
        return {}
    client = {"connect_timeout": timeout_s, "read_timeout": timeout_s}
    if not os.environ.get("AWS_MAX_ATTEMPTS"):
        client["retries"] = {"total_max_attempts": 1}  # botocore would otherwise retry 4 times inside each attempt
    configured = fsspec_config.get(scheme, {}).get("config_kwargs", {})
    return {"config_kwargs": client | configured}  # what fsspec's config sets wins


def _is_transient(exc: Exception) -> bool:
    """Network trouble, timeouts, a busy or failing server; not a missing object, a refusal or a bad URL."""
    if isinstance(exc, (IsADirectoryError, NotADirectoryError)):
        return False
    if isinstance(exc, (ConnectionError, TimeoutError)) or getattr(exc, "errno", None) in TRANSIENT_ERRNOS:
        return True
    # botocore's connection and timeout errors derive from neither: recognise them by their class names.
    return any(re.search(r"Connect|Timeout", cls.__name__) for cls in type(exc).__mro__)


def _check_status(response: httpx.Response, safe_url: str) -> None:
    """Raise the download error matching a non-2xx status."""
    status = response.status_code
    if 200 <= status < 300:
        return
    message = f"download of {safe_url} failed: HTTP {status} {response.reason_phrase}".rstrip()
    if status >= 500 or status in TRANSIENT_STATUS:
        raise TransientDownloadError(message)
    raise PermanentDownloadError(message)


def _describe(exc: Exception, url: str, safe_url: str) -> str:
    """'ExceptionName: message' with any copy of the raw URL replaced by its redacted form."""
    text = str(exc).replace(url, safe_url) or "no details"
    return f"{type(exc).__name__}: {text}"


def _blank_secrets(text: str) -> str:
    """`text` with the values of secret-looking environment variables (AWS_SECRET_ACCESS_KEY, ...) as '***'."""
    for name, value in os.environ.items():
        if len(value) >= 8 and SECRET_VARIABLE.search(name) and value in text:
            text = text.replace(value, "***")
    return text
