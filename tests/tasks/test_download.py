"""fetch() against a real HTTP server on 127.0.0.1 that plays scripted responses."""

import logging
import socket
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import fsspec
import pytest

from tasks.download import (
    PermanentDownloadError,
    TransientDownloadError,
    cached_name,
    fetch,
    is_remote,
    redact_url,
    unsupported_reason,
)

BODY = b"\x00\x00\x00\x18ftypmp42" + bytes(range(256)) * 64  # 16 KiB of bytes that look like an mp4


class Script:
    """Responses per path, played in order (the last one repeats), and the number of requests per path."""

    def __init__(self):
        self.routes: dict[str, list[tuple]] = {}
        self.hits: Counter = Counter()

    def next_response(self, path: str) -> tuple:
        steps = self.routes.get(path, [(404, b"no such file")])
        return steps.pop(0) if len(steps) > 1 else steps[0]


def _handler(script: Script):
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):
            path = self.path.split("?")[0]
            script.hits[path] += 1
            status, body, *mode = script.next_response(path)
            if mode == ["slow"]:
                time.sleep(1.0)
            try:
                self.send_response(status)
                # "truncated": promise more bytes than are sent, then hang up mid-body.
                self.send_header("Content-Length", str(len(body) * (10 if mode == ["truncated"] else 1)))
                self.end_headers()
                self.wfile.write(body)
            except (BrokenPipeError, ConnectionResetError):
                pass  # the client gave up first (the timeout test)
            if mode == ["truncated"]:
                self.close_connection = True

        def log_message(self, *args):  # keep the test output quiet
            pass

    return Handler


@pytest.fixture
def server():
    """(base URL, script) of a threaded HTTP server on a free port of 127.0.0.1."""
    script = Script()
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _handler(script))
    httpd.daemon_threads = True
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}", script
    httpd.shutdown()
    httpd.server_close()


def test_fetch_writes_the_body_under_a_stable_name_and_caches_it(server, tmp_path):
    base, script = server
    script.routes["/clips/a.mp4"] = [(200, BODY)]
    path = fetch(f"{base}/clips/a.mp4", tmp_path)
    assert path.parent == tmp_path and path.suffix == ".mp4"
    assert path.read_bytes() == BODY
    assert path.name == cached_name(f"{base}/clips/a.mp4")

    again = fetch(f"{base}/clips/a.mp4", tmp_path)
    assert again == path
    assert script.hits["/clips/a.mp4"] == 1  # served from the cache: no second request
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name]  # no temporary files left behind


def test_a_503_is_transient_and_a_second_attempt_succeeds(server, tmp_path):
    base, script = server
    script.routes["/once.mp4"] = [(503, b"busy"), (200, BODY)]
    with pytest.raises(TransientDownloadError, match=r"once\.mp4.*HTTP 503"):
        fetch(f"{base}/once.mp4", tmp_path, attempts=1)
    assert script.hits["/once.mp4"] == 1

    script.routes["/twice.mp4"] = [(503, b"busy"), (200, BODY)]
    path = fetch(f"{base}/twice.mp4", tmp_path, attempts=2, backoff_s=0.01)
    assert path.read_bytes() == BODY
    assert script.hits["/twice.mp4"] == 2


def test_a_404_is_permanent_and_not_retried(server, tmp_path):
    base, script = server
    with pytest.raises(PermanentDownloadError, match=r"gone\.mp4.*HTTP 404"):
        fetch(f"{base}/gone.mp4", tmp_path, attempts=3, backoff_s=0.01)
    assert script.hits["/gone.mp4"] == 1
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("status", [408, 429, 500, 502, 504])
def test_retryable_statuses_are_transient(server, tmp_path, status):
    base, script = server
    script.routes["/x.mp4"] = [(status, b"")]
    with pytest.raises(TransientDownloadError, match=str(status)):
        fetch(f"{base}/x.mp4", tmp_path)


@pytest.mark.parametrize("status", [400, 401, 403, 410])
def test_other_client_errors_are_permanent(server, tmp_path, status):
    base, script = server
    script.routes["/x.mp4"] = [(status, b"")]
    with pytest.raises(PermanentDownloadError, match=str(status)):
        fetch(f"{base}/x.mp4", tmp_path, attempts=2, backoff_s=0.01)
    assert script.hits["/x.mp4"] == 1


def test_a_body_cut_short_leaves_no_file_and_is_transient(server, tmp_path):
    base, script = server
    script.routes["/cut.mp4"] = [(200, BODY, "truncated")]
    with pytest.raises(TransientDownloadError, match=r"cut\.mp4"):
        fetch(f"{base}/cut.mp4", tmp_path)
    assert list(tmp_path.iterdir()) == []  # neither the cached name nor a .part file
    # The next fetch downloads again instead of trusting a partial file.
    script.routes["/cut.mp4"] = [(200, BODY)]
    assert fetch(f"{base}/cut.mp4", tmp_path).read_bytes() == BODY


def test_a_timeout_is_transient(server, tmp_path):
    base, script = server
    script.routes["/slow.mp4"] = [(200, BODY, "slow")]
    with pytest.raises(TransientDownloadError, match="Timeout"):
        fetch(f"{base}/slow.mp4", tmp_path, timeout_s=0.2)
    assert list(tmp_path.iterdir()) == []


def test_a_refused_connection_is_transient(tmp_path):
    with socket.socket() as sock:  # a port that nothing listens on once this socket is closed
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with pytest.raises(TransientDownloadError, match="ConnectError"):
        fetch(f"http://127.0.0.1:{port}/x.mp4", tmp_path)


def test_secrets_stay_out_of_errors_and_logs(server, tmp_path, caplog):
    base, script = server
    secret_url = base.replace("http://", "http://alice:s3cr3t@") + "/private.mp4?token=hunter2"
    script.routes["/private.mp4"] = [(503, b"")]
    with caplog.at_level(logging.WARNING, logger="tasks.download"):
        with pytest.raises(TransientDownloadError) as error:
            fetch(secret_url, tmp_path, attempts=2, backoff_s=0.01)
    text = str(error.value) + caplog.text
    assert "private.mp4" in text and "retry 1 of 1" in caplog.text
    assert "s3cr3t" not in text and "hunter2" not in text and "alice" not in text
    assert error.value.__cause__ is None and error.value.__suppress_context__


def test_unsupported_schemes_are_permanent(tmp_path):
    with pytest.raises(PermanentDownloadError, match="nosuchproto:// is not a protocol fsspec"):
        fetch("nosuchproto://example.org/a.mp4", tmp_path)
    with pytest.raises(PermanentDownloadError, match="zip:// is not a protocol fsspec"):
        fetch("zip://a.mp4", tmp_path)  # a wrapper of another file system names no file by itself
    with pytest.raises(PermanentDownloadError, match="file:// names a local file"):
        fetch("file:///data/a.mp4", tmp_path)
    assert is_remote("HTTPS://example.org/a.mp4") and is_remote("http://x/y")
    assert not is_remote("/data/a.mp4") and not is_remote("file:///data/a.mp4")
    # Any protocol whose fsspec implementation imports here is remote: s3fs is a dependency, ftp is in fsspec.
    assert is_remote("s3://bucket/a.mp4") and is_remote("S3://bucket/a.mp4") and is_remote("memory://a.mp4")
    assert is_remote("ftp://host/a.mp4")
    assert not any(tmp_path.iterdir())


def test_a_protocol_whose_package_is_missing_names_the_package(tmp_path):
    scheme = next((s for s in ("gs", "az", "oci", "webdav") if "not installed" in (unsupported_reason(s) or "")), None)
    if scheme is None:
        pytest.skip("every candidate fsspec back end is installed here")
    assert not is_remote(f"{scheme}://bucket/a.mp4")
    with pytest.raises(PermanentDownloadError, match=rf"{scheme}:// needs a package that is not installed: .*install"):
        fetch(f"{scheme}://bucket/a.mp4", tmp_path)


@pytest.fixture
def memory_files():
    """fsspec's in-process memory file system, emptied afterwards."""
    fs = fsspec.filesystem("memory")
    yield fs
    if fs.exists("/fvlm-test"):
        fs.rm("/fvlm-test", recursive=True)


def test_fsspec_sources_are_fetched_into_the_cache(memory_files, tmp_path):
    memory_files.pipe("/fvlm-test/clips/a.MP4", BODY)
    path = fetch("memory://fvlm-test/clips/a.MP4", tmp_path)
    assert path.parent == tmp_path and path.name == cached_name("memory://fvlm-test/clips/a.MP4")
    assert path.suffix == ".mp4" and path.read_bytes() == BODY
    memory_files.rm("/fvlm-test/clips/a.MP4")
    assert fetch("memory://fvlm-test/clips/a.MP4", tmp_path) == path  # cached: the source is not read again
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name]  # no .part file left behind


def test_a_missing_fsspec_object_is_permanent_and_not_retried(memory_files, tmp_path, caplog):
    memory_files.mkdir("/fvlm-test")
    with caplog.at_level(logging.WARNING, logger="tasks.download"):
        with pytest.raises(PermanentDownloadError, match=r"download of memory://fvlm-test/gone\.mp4 failed: not found"):
            fetch("memory://fvlm-test/gone.mp4", tmp_path, attempts=3, backoff_s=0.01)
        with pytest.raises(PermanentDownloadError, match="failed: IsADirectoryError"):
            fetch("memory://fvlm-test", tmp_path, attempts=3, backoff_s=0.01)
    assert "retry" not in caplog.text
    assert not any(tmp_path.iterdir())


def test_cached_names_and_redaction():
    name = cached_name("https://host/v/clip.MP4?sig=abc")
    assert name.endswith(".mp4") and len(name) == 28
    assert cached_name("https://host/v/clip.mp4?sig=abc") != cached_name("https://host/v/clip.mp4?sig=xyz")
    assert "." not in cached_name("https://host/v/watch")  # no extension to keep
    assert "." not in cached_name("https://host/v/a.b%2F..%2Fetc")  # odd "extensions" are not kept
    assert redact_url("https://u:p@host:8443/a/b.mp4?token=t#f") == "https://host:8443/a/b.mp4"
