"""Download of remote video sources (http:// and https://) into a local cache folder.

A download streams into a hidden `.part` file next to its destination and is renamed only once complete, so a
partly written file is never mistaken for a cached one. The cached name is derived from the URL (a hash plus the
URL's extension), so a second fetch of the same URL returns the file without a request.

Errors are split by what a retry can do: `TransientDownloadError` (connection failures, timeouts, HTTP 5xx, 408,
429) may succeed later; `PermanentDownloadError` (other 4xx, unsupported schemes, bad URLs) will not. Messages
name the URL without credentials or query string: signed URLs carry their secrets there.
"""

import contextlib
import hashlib
import logging
import os
import re
import tempfile
import time
from pathlib import Path, PurePosixPath
from urllib.parse import unquote, urlsplit, urlunsplit

import httpx

logger = logging.getLogger(__name__)

CHUNK_BYTES = 1 << 20  # write in 1 MiB pieces: few syscalls, bounded memory
TRANSIENT_STATUS = frozenset({408, 429})  # plus every 5xx


DOWNLOAD_FOLDER = "fvlm-downloads"  # under the system temp dir, unless a config names a folder


def download_folder(configured: str | os.PathLike | None) -> Path:
    """Where remote sources are fetched: the configured folder, or `fvlm-downloads` in the system temp dir."""
    return Path(configured) if configured else Path(tempfile.gettempdir()) / DOWNLOAD_FOLDER


class DownloadError(Exception):
    """A remote source could not be downloaded."""


class TransientDownloadError(DownloadError):
    """A download failed in a way that may pass on a later try (network, timeout, HTTP 5xx, 408, 429)."""


class PermanentDownloadError(DownloadError):
    """A download failed in a way a retry cannot fix (HTTP 4xx, unsupported scheme, malformed URL)."""


def is_remote(source: str) -> bool:
    """True for http:// and https:// sources (any letter case)."""
    return source[:8].lower().startswith(("http://", "https://"))


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
        raise PermanentDownloadError(
            f"cannot download {redact_url(url)}: only http:// and https:// sources are supported"
        )
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
    safe = redact_url(url)
    fd, part = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".part")
    try:
        with os.fdopen(fd, "wb") as out, httpx.stream("GET", url, timeout=timeout_s, follow_redirects=True) as response:
            _check_status(response, safe)
            for block in response.iter_bytes(CHUNK_BYTES):
                out.write(block)
        os.replace(part, dest)
    except (httpx.TimeoutException, httpx.NetworkError, httpx.RemoteProtocolError, httpx.ProxyError) as exc:
        # `from None`: the chained httpx exception would print the full URL, secrets included, in tracebacks.
        raise TransientDownloadError(f"download of {safe} failed: {_describe(exc, url, safe)}") from None
    except (httpx.HTTPError, httpx.InvalidURL) as exc:  # unsupported protocol, too many redirects, bad URL, ...
        raise PermanentDownloadError(f"download of {safe} failed: {_describe(exc, url, safe)}") from None
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(part)  # gone already after a successful rename


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
