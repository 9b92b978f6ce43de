"""Property tests of the listing: manifests with bad rows mixed into good ones, in CSV, JSON lines and Parquet.

Every generated row carries the reason it should be dropped for (or none), and a small reference model replays
the documented rules (first reason in DROP_REASONS order wins, duplicates count against rows that got that far),
so each example checks the exact counts, not only that nothing crashed. Invariants checked on every example:
the listing never raises on a row; kept + sum(dropped) == rows written; kept rows are unique, captioned and
within the duration bounds. Files, folders and the HTTP server are real; nothing is mocked.
"""

import json
import threading
import time
import unicodedata
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tasks.listing import DROP_REASONS, ListingConfig, ManifestError, list_videos
from tasks.samples import make_video

MAX_CAPTION = 200
FAST = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])

# Durations as a manifest may write them, with the seconds they mean (None: unusable).
GOOD_DURATIONS = [(20, 20.0), (60, 60.0), (33.5, 33.5), ("45", 45.0), (" 22.5 ", 22.5), ("PT00H00M22S", 22.0),
                  ("PT30S", 30.0), ("PT1M", 60.0), ("pt0h0m59.9s", 59.9), ("P0DT0H0M21S", 21.0), ("2.5e1", 25.0),
                  ("00:00:22", 22.0), ("0:45.5", 45.5)]
SHORT_DURATIONS = [(0, 0.0), (19.999, 19.999), ("PT5S", 5.0), ("PT00H00M07S", 7.0), ("0", 0.0)]
LONG_DURATIONS = [(60.001, 60.001), (1e12, 1e12), ("PT24H", 86400.0), ("P365D", 365 * 86400.0), ("1e300", 1e300)]
BAD_DURATIONS = [("", None), ("NaN", None), ("nan", None), ("-5", None), (-5, None), ("inf", None), ("-inf", None),
                 ("1e400", None), ("PT", None), ("P", None), ("PT1H2", None), ("P1Y", None), ("PT-5S", None),
                 ("22 s", None), ("twenty", None), ("PT1.2.3S", None), ("1:2:3:4", None), ("12:", None), (None, None)]
BLANK_CAPTIONS = ["", "   ", "\t\n", "\u200b", "\u00a0\u2003", "\ufeff", "\x00", " \r\n "]
# A CSV cell holding exactly one of these is missing (Arrow's and pandas' convention: R writes NA, SQL NULL).
CSV_NULLS = set(pacsv.ConvertOptions().null_values)
NON_UTF8 = [b"caf\xe9 au lait", b"\xff\xfe broken", b"half \xe2\x82 a euro", b"\xc3"]


@dataclass
class Row:
    """One generated manifest row: what is written, and what the listing should make of it."""

    video_id: object
    path: str
    caption: object  # str, bytes (not UTF-8), or a JSON list (no text)
    duration: object
    seconds: float | None  # what the duration means
    kind: str = "row"  # "row", or "malformed" (a CSV line with an extra field, a JSON line that is no object)


def is_blank(text: str) -> bool:
    """Only whitespace, separators, control and format characters: what the listing calls no caption."""
    return all(c.isspace() or unicodedata.category(c) in {"Zs", "Zl", "Zp", "Cc", "Cf"} for c in text)


# ---- strategies --------------------------------------------------------------------------------------------

captions = st.one_of(
    st.text(st.characters(blacklist_categories=("Cs",)), min_size=1, max_size=40),
    st.sampled_from(["a dog runs", "Aerial view of a city", "surfer, at sunset", 'he said "hi"', "é ü ß 北京 🎥",
                     "NA", "NULL", "nan", "None", "null "]),
)


@st.composite
def rows(draw, index: int = 0) -> Row:
    """A good row with, most of the time, one pathology mixed in."""
    video_id = draw(st.sampled_from(["v", "clip", "1066674", "x y"])) + str(draw(st.integers(0, 30)))
    path = draw(st.sampled_from(["videos/a.mp4", "videos/b.webm", "{root}/videos/a.mp4", "file://{root}/videos/b.webm",
                                 "https://example.invalid/v/{id}.mp4"]))
    duration, seconds = draw(st.sampled_from(GOOD_DURATIONS))
    row = Row(video_id, path, draw(captions), duration, seconds)
    flaw = draw(st.sampled_from([None] * 6 + [
        "malformed", "no_source", "unsupported", "no_id", "blank_caption", "long_caption", "missing_file",
        "folder", "short", "long", "bad_duration", "non_utf8", "caption_list",
    ]))
    if flaw == "malformed":
        row.kind = "malformed"
    elif flaw == "no_source":
        row.path = draw(st.sampled_from(["", "   "]))
    elif flaw == "unsupported":
        # (s3://, ftp://... are remote: fsspec opens them; these name no protocol it can use on its own)
        row.path = draw(st.sampled_from(["nosuchproto://bucket/a.mp4", "zip://a.mp4", "NoSuch+Proto://x/y",
                                         "simplecache://b/c.mp4"]))
    elif flaw == "no_id":
        row.video_id = draw(st.sampled_from(["", "  ", "\u200b"]))
    elif flaw == "blank_caption":
        row.caption = draw(st.sampled_from(BLANK_CAPTIONS))
    elif flaw == "long_caption":
        row.caption = "x" * draw(st.integers(MAX_CAPTION + 1, 3 * MAX_CAPTION))
    elif flaw == "missing_file":
        row.path = draw(st.sampled_from(["videos/nope.mp4", "{root}/absent/a.mp4", "file:///no/such/file.mp4",
                                         "file://[::1/x.mp4", "videos/a.mp4\x00.mp4"]))
    elif flaw == "folder":
        row.path = draw(st.sampled_from(["videos", ".", "{root}/videos/", "file://{root}"]))
    elif flaw in ("short", "long", "bad_duration"):
        table = {"short": SHORT_DURATIONS, "long": LONG_DURATIONS, "bad_duration": BAD_DURATIONS}[flaw]
        row.duration, row.seconds = draw(st.sampled_from(table))
    elif flaw == "non_utf8":
        row.caption = draw(st.sampled_from(NON_UTF8))
    elif flaw == "caption_list":
        row.caption = ["a", "list"]
    return row


def manifests(formats=("csv", "jsonl", "parquet")):
    return st.tuples(st.sampled_from(formats), st.lists(rows(), min_size=3, max_size=80), st.integers(1, 50))


# ---- writing manifests -------------------------------------------------------------------------------------


def _text(value, root: Path, video_id) -> object:
    return value.format(root=root, id=video_id) if isinstance(value, str) else value


def write_manifest(folder: Path, fmt: str, rows_: list[Row]) -> tuple[Path, list[Row]]:
    """Write the rows; returns the manifest and the rows it really holds (Parquet has no malformed rows)."""
    if fmt == "parquet":
        rows_ = [r for r in rows_ if r.kind != "malformed"]
    paths = [_text(r.path, folder, r.video_id) for r in rows_]
    if fmt == "csv":
        lines = [b'"videoid","contentUrl","duration","name"']
        for r, path in zip(rows_, paths):
            if r.kind == "malformed":
                lines.append(b"1,videos/a.mp4,30,caption,an extra field")
                continue
            caption = "" if isinstance(r.caption, list) else r.caption
            fields = [r.video_id, path, "" if r.duration is None else r.duration, caption]
            lines.append(b",".join(_csv_field(f) for f in fields))
        manifest = folder / "m.csv"
        manifest.write_bytes(b"\n".join(lines) + b"\n")
    elif fmt == "jsonl":
        lines = []
        for r, path in zip(rows_, paths):
            if r.kind == "malformed":
                lines.append(b'["a JSON list", "not an object"]' if len(lines) % 2 else b'{"videoid": "broken",')
                continue
            caption = "\x01CAPTION\x01" if isinstance(r.caption, bytes) else r.caption
            record = {"videoid": r.video_id, "contentUrl": path, "duration": r.duration, "name": caption}
            line = json.dumps(record, ensure_ascii=False).encode()
            if isinstance(r.caption, bytes):  # raw bytes that are not UTF-8, inside the JSON string
                line = line.replace(b"\\u0001CAPTION\\u0001", r.caption.replace(b'"', b""))
            lines.append(line)
        manifest = folder / "m.jsonl"
        manifest.write_bytes(b"\n".join(lines) + b"\n")
    else:
        as_bytes = any(isinstance(r.caption, bytes) for r in rows_)
        caption_values = [None if isinstance(r.caption, list) else r.caption for r in rows_]
        if as_bytes:
            caption_values = [c if isinstance(c, bytes) or c is None else c.encode() for c in caption_values]
        table = pa.table({
            "videoid": pa.array([str(r.video_id) for r in rows_], pa.string()),
            "contentUrl": pa.array(paths, pa.string()),
            "duration": pa.array([None if r.duration is None else str(r.duration) for r in rows_], pa.string()),
            "name": pa.array(caption_values, pa.binary() if as_bytes else pa.string()),
        })  # fmt: skip
        manifest = folder / "m.parquet"
        pq.write_table(table, manifest)
    return manifest, rows_


def _csv_field(value) -> bytes:
    raw = value if isinstance(value, bytes) else str(value).encode()
    return b'"' + raw.replace(b'"', b'""') + b'"'


# ---- the reference model -----------------------------------------------------------------------------------


def expected_listing(
    rows_: list[Row], folder: Path, config: ListingConfig, fmt: str
) -> tuple[list[Row], dict[str, int]]:
    """Kept rows and drop counts by the documented rules (probing off: an unusable duration is no_duration)."""
    dropped = dict.fromkeys(DROP_REASONS, 0)
    kept, seen = [], set()
    for r in rows_:
        reason = _reason(r, folder, config, seen, nulls=CSV_NULLS if fmt == "csv" else set())
        if reason is None:
            kept.append(r)
        else:
            dropped[reason] += 1
    return kept, dropped


def _reason(r: Row, folder: Path, config: ListingConfig, seen: set, nulls: set) -> str | None:
    if r.kind == "malformed":
        return "malformed_row"
    path = _text(r.path, folder, r.video_id)
    if path in nulls or is_blank(path):
        return "no_source"
    path = path.strip()
    scheme = path.split("://")[0].lower() if "://" in path else None
    if scheme not in (None, "http", "https", "file"):
        return "unsupported_source"
    video_id = str(r.video_id)
    if video_id in nulls or is_blank(video_id):
        return "no_id"
    video_id = video_id.strip()
    if video_id in seen:
        return "duplicate_id"
    seen.add(video_id)
    caption = r.caption.decode("utf-8", "replace") if isinstance(r.caption, bytes) else r.caption
    if isinstance(caption, list) or caption in nulls or is_blank(caption):
        return "no_caption"
    if len(caption.strip()) > config.max_caption_chars:
        return "caption_too_long"
    if scheme != "http" and scheme != "https" and not _is_file(path, folder):
        return "missing_file"
    if r.seconds is None:
        return "no_duration"
    if r.seconds < config.min_duration_s:
        return "too_short"
    if r.seconds > config.max_duration_s:
        return "too_long"
    return None


def _is_file(path: str, folder: Path) -> bool:
    if path.lower().startswith("file://"):
        path = path[len("file://"):]
    try:
        return (folder / path).is_file()
    except ValueError:  # a NUL byte
        return False


def check_invariants(listing, rows_written: int, config: ListingConfig) -> None:
    """What must hold for any manifest, whatever the model says."""
    summary, videos = listing.summary, listing.videos
    assert summary["rows"] == rows_written == summary["kept"] + sum(summary["dropped"].values())
    assert len(videos) == summary["kept"]
    assert videos["video_id"].is_unique
    assert all(v and not is_blank(v) for v in videos["video_id"])
    assert all(c and not is_blank(c) and len(c) <= config.max_caption_chars for c in videos["caption"])
    durations = videos["duration_s"].to_numpy()
    assert np.all(np.isfinite(durations))
    assert np.all((durations >= config.min_duration_s) & (durations <= config.max_duration_s))


# ---- fixtures ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def collection(tmp_path_factory) -> Path:
    """A manifest folder with two (tiny, not decodable) video files and a sub-folder."""
    folder = tmp_path_factory.mktemp("collection")
    (folder / "videos").mkdir()
    (folder / "videos" / "a.mp4").write_bytes(b"durations come from the manifest; never opened")
    (folder / "videos" / "b.webm").write_bytes(b"same")
    return folder


# ---- properties --------------------------------------------------------------------------------------------


@FAST
@given(manifests())
def test_bad_rows_are_dropped_with_their_reason_and_good_rows_kept(collection, case):
    fmt, rows_, chunk_rows = case
    config = ListingConfig(max_caption_chars=MAX_CAPTION, probe_missing_durations=False, read_chunk_rows=chunk_rows)
    for old in collection.glob("m.*"):
        old.unlink()
    manifest, written = write_manifest(collection, fmt, rows_)
    if fmt == "jsonl" and all(r.kind == "malformed" for r in written):  # no JSON object at all: not JSON lines
        with pytest.raises(ManifestError, match=r"m\.jsonl could not be read as JSON lines"):
            list_videos(manifest, config)
        return
    listing = list_videos(manifest, config)

    check_invariants(listing, len(written), config)
    kept, dropped = expected_listing(written, collection, config, fmt)
    assert listing.summary["dropped"] == dropped
    assert listing.videos["video_id"].tolist() == [str(r.video_id).strip() for r in kept]
    for listed, row in zip(listing.videos["caption"], kept):
        if isinstance(row.caption, bytes):  # not UTF-8: kept, bad bytes replaced
            assert listed.strip() == row.caption.decode("utf-8", "replace").strip()
        else:
            assert listed.strip() == row.caption.strip()


@FAST
@given(st.sampled_from(["csv", "jsonl", "parquet"]), st.binary(max_size=3000), st.booleans())
def test_random_bytes_as_a_manifest_raise_manifest_error_or_list(collection, fmt, content, with_header):
    """Feed it anything: garbage raises ManifestError naming the file, or lists with consistent counts."""
    manifest = collection / f"garbage.{fmt}"
    header = {"csv": b"path,caption,duration\n", "jsonl": b'{"path": "videos/a.mp4", "caption": "c", "duration": 30}\n',
              "parquet": b"PAR1"}[fmt]
    manifest.write_bytes((header if with_header else b"") + content)
    config = ListingConfig(probe_missing_durations=False)
    try:
        listing = list_videos(manifest, config)
    except ManifestError as err:
        assert str(manifest) in str(err)
        return
    summary = listing.summary
    assert summary["rows"] == summary["kept"] + sum(summary["dropped"].values())
    assert listing.videos["video_id"].is_unique


# ---- remote sources and probing: a real HTTP server that answers, fails or hangs -----------------------------

HANG_S = 3.0  # the hanging route answers after this; the listing gives up long before (probe_timeout_s)


def _route_handler(clip: bytes):
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):
            route = self.path.strip("/").split("/")[0]
            if route == "hang":
                time.sleep(HANG_S)
            status, body = {"ok": (200, clip), "missing": (404, b"no"), "error": (500, b"boom")}.get(route, (200, clip))
            try:
                self.send_response(status)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)
            except (BrokenPipeError, ConnectionResetError):
                pass  # the client timed out and left

        def log_message(self, *args):
            pass

    return Handler


@pytest.fixture(scope="module")
def clip_server(tmp_path_factory):
    """(base URL, folder with a real 21 s clip, a text file and a sub-folder) of a server on 127.0.0.1."""
    folder = tmp_path_factory.mktemp("remote")
    clip = make_video(folder / "clip.mp4", duration_s=21, fps=2, size=(32, 24))
    (folder / "text.mp4").write_text("not a video: ffmpeg finds no duration")
    (folder / "sub").mkdir()
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _route_handler(clip.read_bytes()))
    httpd.daemon_threads = True
    threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}", folder
    httpd.shutdown()
    httpd.server_close()


PROBED = {  # source -> what a row without a duration becomes once probed
    "{base}/ok/{n}.mp4": None, "{base}/missing/{n}.mp4": "download_failed", "{base}/error/{n}.mp4": "download_failed",
    "{base}/hang/{n}.mp4": "download_failed", "clip.mp4": None, "text.mp4": "no_duration", "sub": "missing_file",
    "absent.mp4": "missing_file",
}


@pytest.mark.slow
@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.sampled_from(sorted(PROBED)), min_size=1, max_size=6), st.sampled_from(["csv", "jsonl"]))
def test_sources_that_fail_or_hang_while_probed_are_dropped_in_time(clip_server, tmp_path_factory, sources, fmt):
    """404, 500 and a server that never answers in time: download_failed rows, within the timeout, no crash."""
    base, folder = clip_server
    rows_ = [{"videoid": f"r{n}", "contentUrl": s.format(base=base, n=n), "name": f"row {n}"}
             for n, s in enumerate(sources)]
    manifest = folder / f"m.{fmt}"
    if fmt == "csv":
        pd.DataFrame(rows_).to_csv(manifest, index=False)
    else:
        manifest.write_text("".join(json.dumps(r) + "\n" for r in rows_))
    config = ListingConfig(probe_timeout_s=0.5, download_attempts=1,
                           download_dir=str(tmp_path_factory.mktemp("downloads")))
    started = time.perf_counter()
    listing = list_videos(manifest, config)
    elapsed = time.perf_counter() - started

    check_invariants(listing, len(rows_), config)
    expected = dict.fromkeys(DROP_REASONS, 0)
    for s in sources:
        if PROBED[s]:
            expected[PROBED[s]] += 1
    assert listing.summary["dropped"] == expected
    assert listing.videos["duration_s"].round().tolist() == [21.0] * listing.summary["kept"]
    hangs = sources.count("{base}/hang/{n}.mp4")
    assert elapsed < hangs * (config.probe_timeout_s + 0.5) + 0.5 * len(sources) + 3  # never waits for HANG_S


def test_a_transient_failure_is_retried_then_recorded(clip_server, tmp_path):
    base, folder = clip_server
    manifest = folder / "retry.csv"
    pd.DataFrame([{"contentUrl": f"{base}/error/a.mp4", "name": "500 twice"},
                  {"contentUrl": f"{base}/ok/b.mp4", "name": "fine"}]).to_csv(manifest, index=False)
    config = ListingConfig(probe_timeout_s=2, download_attempts=2, download_dir=str(tmp_path))
    listing = list_videos(manifest, config)
    assert listing.videos["video_id"].tolist() == ["b"]
    assert listing.summary["dropped"]["download_failed"] == 1 and listing.summary["probed"] == 2


# ---- whole-file pathologies and typed columns: examples --------------------------------------------------------


@pytest.mark.parametrize("header, message", [
    ("videoid,contentUrl,duration,captoin", r"no caption column.*is 'captoin' meant to be 'caption'\? rename it"),
    ("videoid,contntUrl,duration,name", r"no source column.*is 'contntUrl' meant to be 'path'\? rename it"),
    ("videoid,url,duration,name", r"no source column: expected one of 'contentUrl', 'path' \(columns found: "
                                  r"'videoid', 'url', 'duration', 'name'\)$"),
])
def test_a_misspelled_required_column_names_the_file_and_the_column(tmp_path, header, message):
    manifest = tmp_path / "m.csv"
    manifest.write_text(header + "\n1,a.mp4,30,a caption\n")
    with pytest.raises(ManifestError, match=rf"manifest {tmp_path}/m\.csv has {message}"):
        list_videos(manifest)


def test_a_misspelled_optional_column_falls_back_with_a_warning(collection, caplog):
    """No `duration` column (only `duraton`): durations are probed, as documented, and the log says why."""
    manifest = collection / "optional.csv"
    manifest.write_text("vidoeid,contentUrl,duraton,name\n7,videos/a.mp4,30,a caption\n")
    listing = list_videos(manifest, ListingConfig(probe_missing_durations=False))
    assert listing.summary["dropped"]["no_duration"] == 1  # the misspelled column was not used
    assert "a column 'duraton': durations are probed from the files" in caplog.text
    assert "a column 'vidoeid': video_ids are taken from the file names" in caplog.text


@pytest.mark.parametrize("fmt", ["csv", "jsonl", "parquet"])
def test_a_huge_caption_is_dropped_by_default_and_kept_without_a_limit(collection, fmt):
    """1 MB captions: usually rows glued together by a broken quote, so caption_too_long unless the limit is off."""
    huge = "a very long caption " * 50_000  # 1 MB
    frame = pd.DataFrame({"videoid": ["huge", "fine"], "contentUrl": ["videos/a.mp4", "videos/b.webm"],
                          "duration": [30, 40], "name": [huge, "fine"]})
    manifest = collection / f"huge.{fmt}"
    if fmt == "csv":
        frame.to_csv(manifest, index=False)
    elif fmt == "jsonl":
        frame.to_json(manifest, orient="records", lines=True)
    else:
        frame.to_parquet(manifest)
    default = list_videos(manifest)
    assert default.videos["video_id"].tolist() == ["fine"]
    assert default.summary["dropped"]["caption_too_long"] == 1
    unlimited = list_videos(manifest, ListingConfig(max_caption_chars=None))
    assert unlimited.videos["caption"].str.len().tolist() == [len(huge.strip()), 4]


def test_parquet_columns_of_odd_types(collection):
    """Float ids with NaN and 1e20, binary captions that are not UTF-8, NaN captions, durations as Timedelta."""
    table = pa.table({
        "video_id": pa.array([1.0, float("nan"), 1e20, 4.0, 5.0]),
        "path": ["videos/a.mp4"] * 5,
        "caption": pa.array([b"caf\xe9", b"ok", b"ok", b"\xe2\x80\x8b", None], pa.binary()),
        "duration": pa.array([30, 30, 30, 30, 30], pa.duration("s")),
    })  # fmt: skip
    pq.write_table(table, collection / "typed.parquet")
    listing = list_videos(collection / "typed.parquet")
    assert listing.videos["video_id"].tolist() == ["1", "1e+20"]
    assert listing.videos["caption"].tolist() == ["caf\ufffd", "ok"]
    assert listing.videos["duration_s"].tolist() == [30.0, 30.0]
    assert listing.summary["dropped"] == dict.fromkeys(DROP_REASONS, 0) | {"no_id": 1, "no_caption": 2}


def test_json_values_that_are_no_text_count_as_missing(collection):
    lines = [{"videoid": "a", "path": "videos/a.mp4", "caption": ["a", "list"], "duration": 30},
             {"videoid": {"an": "object"}, "path": "videos/a.mp4", "caption": "c", "duration": 30},
             {"videoid": "b", "path": "videos/a.mp4", "caption": 12345, "duration": "30"},
             {"videoid": "c", "path": "videos/a.mp4", "caption": True, "duration": [30]}]
    (collection / "types.jsonl").write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    listing = list_videos(collection / "types.jsonl", ListingConfig(probe_missing_durations=False))
    assert listing.videos[["video_id", "caption"]].values.tolist() == [["b", "12345"]]
    assert listing.summary["dropped"] == dict.fromkeys(DROP_REASONS, 0) | {
        "no_caption": 1, "no_id": 1, "no_duration": 1}


def test_an_unterminated_quote_swallows_the_lines_after_it(collection):
    """The file's quoting decides: the lines after an unclosed quote belong to that field. A row that then
    has too few fields is one malformed row; one whose field count still fits keeps a glued caption, which
    max_caption_chars catches once many lines are glued (the usual case: the quote is never closed)."""
    header = "videoid,path,duration,caption\n"
    middle = collection / "quote_middle.csv"
    middle.write_text(header + '1,"never closed,videos/a.mp4,30\n2,videos/a.mp4,30,ok\n')
    listing = list_videos(middle)
    assert listing.summary["rows"] == 1 and listing.summary["dropped"]["malformed_row"] == 1

    last = collection / "quote_last.csv"
    last.write_text(header + '1,videos/a.mp4,30,"never closed\n' + "2,videos/a.mp4,30,ok\n" * 1000)
    listing = list_videos(last)
    assert listing.summary["rows"] == 1 and listing.summary["dropped"]["caption_too_long"] == 1
