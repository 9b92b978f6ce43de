"""list_videos on real manifests (CSV, TSV, Parquet, JSON lines, folders), real videos and a real HTTP server."""

import functools
import json
import logging
import shutil
import subprocess
import threading
import time
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import fsspec
import imageio_ffmpeg
import numpy as np
import pandas as pd
import pyarrow as pa
import pytest
from pydantic import ValidationError

from tasks.download import unsupported_reason

from tasks.listing import (
    DROP_REASONS,
    ListingConfig,
    ManifestError,
    list_videos,
    parse_durations,
    probe_duration,
)

COLUMNS = ["video_id", "source", "caption", "duration_s"]


def _make_clip(path: Path, seconds: float) -> Path:
    """A tiny real video (64x48, 10 fps) made by the ffmpeg binary of imageio-ffmpeg."""
    subprocess.run(
        [imageio_ffmpeg.get_ffmpeg_exe(), "-v", "error", "-y", "-f", "lavfi",
         "-i", "testsrc=size=64x48:rate=10", "-t", str(seconds), "-pix_fmt", "yuv420p", str(path)],
        check=True,
    )  # fmt: skip
    return path


@pytest.fixture(scope="module")
def clips(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("clips")
    return {"21s": _make_clip(folder / "clip_21s.mp4", 21), "5s": _make_clip(folder / "clip_5s.mp4", 5)}


def _csv(path: Path, rows: list[dict]) -> Path:
    pd.DataFrame(rows).to_csv(path, index=False)
    return path


def _dropped(**counts: int) -> dict[str, int]:
    return {reason: counts.get(reason, 0) for reason in DROP_REASONS}


URL = "https://ak.picdn.net/shutterstock/videos/{}/preview/stock-footage-clip.mp4"


def test_webvid_csv_with_iso_durations(tmp_path):
    rows = [
        (1066674, "PT00H00M22S", "Aerial view of a city"),
        (1066675, "PT22S", " Surfer at sunset  "),
        (1066676, "PT1M5.5S", "too long: 65.5 s"),
        (1066677, "PT00H01M00S", "exactly sixty seconds"),
        (1066678, "PT00H00M07S", "too short"),
        (1066679, "PT0H0M20.0S", "exactly twenty seconds"),
    ]
    manifest = _csv(
        tmp_path / "results_10M_train.csv",
        [{"videoid": i, "contentUrl": URL.format(i), "duration": d, "page_dir": "006001_006050", "name": n}
         for i, d, n in rows],
    )  # fmt: skip
    listing = list_videos(manifest)

    videos = listing.videos
    assert list(videos.columns) == COLUMNS
    assert videos["video_id"].tolist() == ["1066674", "1066675", "1066677", "1066679"]
    assert videos["source"].tolist() == [URL.format(i) for i in (1066674, 1066675, 1066677, 1066679)]
    assert videos["caption"].tolist() == [
        "Aerial view of a city", "Surfer at sunset", "exactly sixty seconds", "exactly twenty seconds"
    ]  # fmt: skip
    assert videos["duration_s"].tolist() == [22.0, 22.0, 60.0, 20.0]
    assert videos["duration_s"].dtype == np.float64
    assert all(isinstance(v, str) for v in videos["video_id"])
    assert listing.summary == {
        "manifest": str(manifest),
        "rows": 6,
        "kept": 4,
        "dropped": _dropped(too_short=1, too_long=1),
        "min_duration_s": 20.0,
        "max_duration_s": 60.0,
        "probed": 0,
    }


def test_duration_bounds_are_inclusive(tmp_path):
    durations = [19.99, 20, 45, 60, 60.01]
    manifest = _csv(
        tmp_path / "m.csv",
        [{"video_id": f"v{d}", "path": URL.format(d), "caption": "c", "duration": d} for d in durations],
    )
    listing = list_videos(manifest)
    assert listing.videos["duration_s"].tolist() == [20.0, 45.0, 60.0]
    assert listing.summary["dropped"] == _dropped(too_short=1, too_long=1)

    narrow = list_videos(manifest, ListingConfig(min_duration_s=45, max_duration_s=45))
    assert narrow.videos["video_id"].tolist() == ["v45"]


def test_every_drop_reason_is_counted_once_in_order(tmp_path):
    (tmp_path / "not_a_video.mp4").write_bytes(b"this is text, ffmpeg finds no duration in it")
    (tmp_path / "real.mp4").write_bytes(b"exists; the duration column is trusted")
    ok = dict(path="real.mp4", caption="fine", duration="30")
    rows = [
        dict(video_id="junk", path="not_a_video.mp4", caption="probed, fails", duration=""),  # no_duration
        dict(ok, video_id="a", caption="first a wins"),  # kept (limit 1 reached here)
        dict(ok, video_id="x", path=""),  # no_source (also no caption: first reason only)
        dict(ok, video_id="", caption=""),  # no_id
        dict(ok, video_id="a", caption="second a"),  # duplicate_id
        dict(ok, video_id="b", caption="   "),  # no_caption
        dict(ok, video_id="b"),  # duplicate_id: the first "b" wins although it was dropped
        dict(ok, video_id="c", path="missing.mp4"),  # missing_file
        dict(ok, video_id="d", duration="PT00H00M05S"),  # too_short
        dict(ok, video_id="e", duration="PT2M"),  # too_long
        dict(ok, video_id="f"),  # over_limit
        dict(ok, video_id="g", path="not_a_video.mp4", duration=""),  # over_limit, never probed
        dict(ok, video_id="h", duration="120"),  # too_long even after the limit: earlier reason
    ]
    listing = list_videos(_csv(tmp_path / "m.csv", rows), ListingConfig(limit=1))
    assert listing.videos["video_id"].tolist() == ["a"]
    assert listing.videos["caption"].tolist() == ["first a wins"]
    assert listing.summary["dropped"] == _dropped(
        no_source=1, no_id=1, duplicate_id=2, no_caption=1, missing_file=1, no_duration=1,
        too_short=1, too_long=2, over_limit=2,
    )  # fmt: skip
    assert listing.summary["rows"] == len(rows) == listing.summary["kept"] + sum(listing.summary["dropped"].values())
    assert listing.summary["probed"] == 1


def test_parquet_jsonl_and_tsv_give_the_same_listing_as_csv(tmp_path):
    frame = pd.DataFrame(
        {
            "videoid": [11, 12, 13, 14, 12, 15],
            "contentUrl": [URL.format(i) for i in (11, 12, 13, 14, 12, 15)],
            "duration": ["PT00H00M22S", "31.5", "PT1M", "PT00H00M10S", "PT25S", "PT40S"],
            "name": ["one", "two", None, "four", "dup", "six"],
        }
    )
    frame.to_csv(tmp_path / "m.csv", index=False)
    frame.to_csv(tmp_path / "m.tsv", index=False, sep="\t")
    frame.to_parquet(tmp_path / "m.parquet")
    frame.to_json(tmp_path / "m.jsonl", orient="records", lines=True)
    frame.to_json(tmp_path / "m.json", orient="records", lines=True)

    expected = list_videos(tmp_path / "m.csv")
    assert expected.videos["video_id"].tolist() == ["11", "12", "15"]
    assert expected.summary["dropped"] == _dropped(duplicate_id=1, no_caption=1, too_short=1)
    for name in ("m.tsv", "m.parquet", "m.jsonl", "m.json"):
        listing = list_videos(tmp_path / name)
        pd.testing.assert_frame_equal(listing.videos, expected.videos)
        assert {**listing.summary, "manifest": ""} == {**expected.summary, "manifest": ""}, name


def test_jsonl_whose_columns_change_type_is_read_all_the_same(tmp_path):
    rows = [
        {"video_id": 7, "path": URL.format(7), "caption": None, "duration": 22},
        {"video_id": "007", "path": URL.format("007"), "caption": "text id", "duration": "PT30S"},
        {"video_id": 8.0, "path": URL.format(8), "caption": "float id", "duration": 40.5},
        {"video_id": "7", "path": URL.format("7b"), "caption": "same as the int 7", "duration": 30},
    ]
    manifest = tmp_path / "mixed.jsonl"
    manifest.write_text("".join(json.dumps(row) + "\n" for row in rows))
    listing = list_videos(manifest)
    assert listing.videos["video_id"].tolist() == ["007", "8"]
    assert listing.videos["duration_s"].tolist() == [30.0, 40.5]
    assert listing.summary["dropped"] == _dropped(no_caption=1, duplicate_id=1)


def test_relative_paths_and_file_uris_resolve(tmp_path):
    (tmp_path / "clips").mkdir()
    (tmp_path / "meta").mkdir()
    for name in ("rel.mp4", "uri me.mp4", "abs.mp4"):
        (tmp_path / "clips" / name).write_bytes(b"x")
    rows = [
        {"path": "../clips/rel.mp4", "caption": "relative", "duration": 30},
        {"path": (tmp_path / "clips" / "uri me.mp4").as_uri(), "caption": "file uri", "duration": 30},
        {"path": str(tmp_path / "clips" / "abs.mp4"), "caption": "absolute", "duration": 30},
        {"path": "gone.mp4", "caption": "relative to meta/: missing", "duration": 30},
        {"path": "https://host/v/remote.webm?sig=1", "caption": "remote", "duration": 30},
    ]
    listing = list_videos(_csv(tmp_path / "meta" / "m.csv", rows))
    assert listing.videos["source"].tolist() == [
        str(tmp_path / "clips" / "rel.mp4"),
        str(tmp_path / "clips" / "uri me.mp4"),
        str(tmp_path / "clips" / "abs.mp4"),
        "https://host/v/remote.webm?sig=1",
    ]
    # Without an id column the id is the source's file stem.
    assert listing.videos["video_id"].tolist() == ["rel", "uri me", "abs", "remote"]
    assert listing.summary["dropped"] == _dropped(missing_file=1)


def test_a_folder_of_videos(tmp_path, clips):
    root = tmp_path / "videos"
    (root / "b").mkdir(parents=True)
    shutil.copy(clips["21s"], root / "b" / "surfer_at-sunset.mp4")
    shutil.copy(clips["21s"], root / "a_clip.MKV")  # an .mp4 inside, named .MKV: ffmpeg reads the content
    (root / "a_clip.txt").write_text("  A caption from the sidecar file.\n")
    shutil.copy(clips["5s"], root / "b" / "short.mp4")
    (root / "notes.txt").write_text("not a video")
    listing = list_videos(root)
    assert listing.videos["video_id"].tolist() == ["a_clip", "b/surfer_at-sunset"]
    assert listing.videos["caption"].tolist() == ["A caption from the sidecar file.", "surfer at sunset"]
    assert listing.videos["source"].tolist() == [str(root / "a_clip.MKV"), str(root / "b" / "surfer_at-sunset.mp4")]
    np.testing.assert_allclose(listing.videos["duration_s"], [21.0, 21.0], atol=0.2)
    assert listing.summary["probed"] == 3
    assert listing.summary["dropped"] == _dropped(too_short=1)


def test_missing_columns_and_bad_files_raise_manifest_errors(tmp_path):
    no_source = _csv(tmp_path / "m.csv", [{"videoid": 1, "url": "a.mp4", "name": "c"}])
    with pytest.raises(ManifestError, match=r"m\.csv has no source column: expected one of 'contentUrl', 'path'"):
        list_videos(no_source)

    no_caption = _csv(tmp_path / "n.csv", [{"path": "https://h/a.mp4", "duration": 30}])
    with pytest.raises(ManifestError, match=r"n\.csv has no caption column: expected one of 'name', 'caption'"):
        list_videos(no_caption)
    listing = list_videos(no_caption, ListingConfig(require_caption=False))
    assert listing.videos["caption"].tolist() == [""]

    garbage = tmp_path / "broken.parquet"
    garbage.write_bytes(b"\x00PAR1 certainly not parquet" * 10)
    with pytest.raises(ManifestError, match=r"broken\.parquet could not be read as Parquet"):
        list_videos(garbage)
    ragged = tmp_path / "ragged.csv"
    ragged.write_text('path,caption\n"a.mp4,x\n')  # an unterminated quote: one bad row, not a bad file
    assert list_videos(ragged).summary["dropped"] == _dropped(malformed_row=1)
    array_json = tmp_path / "array.json"
    array_json.write_text('[\n{"path": "a.mp4",\n "caption": "x"}\n]\n')
    with pytest.raises(ManifestError, match=r"array\.json could not be read as JSON lines"):
        list_videos(array_json)
    with pytest.raises(ManifestError, match=r"nowhere\.csv does not exist"):
        list_videos(tmp_path / "nowhere.csv")
    (tmp_path / "m.xlsx").write_bytes(b"x")
    with pytest.raises(ManifestError, match=r"m\.xlsx has an unknown format '\.xlsx'"):
        list_videos(tmp_path / "m.xlsx")


def test_limit_and_duplicates_across_chunks(tmp_path):
    ids = ["a", "b", "a", "c", "0042", "42", "b", "d", "e"]
    frame = pd.DataFrame(
        {"video_id": ids, "path": [URL.format(i) for i in range(len(ids))], "caption": "c", "duration": 30.0}
    )
    frame.to_parquet(tmp_path / "m.parquet")
    config = ListingConfig(read_chunk_rows=2)  # every duplicate sits in a later chunk than its first
    listing = list_videos(tmp_path / "m.parquet", config)
    assert listing.videos["video_id"].tolist() == ["a", "b", "c", "0042", "42", "d", "e"]
    assert listing.summary["dropped"] == _dropped(duplicate_id=2)

    limited = list_videos(tmp_path / "m.parquet", config.model_copy(update={"limit": 4}))
    assert limited.videos["video_id"].tolist() == ["a", "b", "c", "0042"]
    assert limited.summary["dropped"] == _dropped(duplicate_id=2, over_limit=3)


def test_missing_durations_are_probed_from_real_files(tmp_path, clips, shared_videos):
    rows = [
        {"path": str(clips["21s"]), "caption": "generated, 21 s"},
        {"path": str(shared_videos / "moviepy_no_duration.webm"), "caption": "no duration in the container"},
        {"path": str(shared_videos / "moviepy_big_buck_bunny_0_30.webm"), "caption": "bunny, 30 s"},
        {"path": str(shared_videos / "decord_corrupted.mp4"), "caption": "5 s"},
    ]
    manifest = _csv(tmp_path / "m.csv", rows)
    listing = list_videos(manifest)
    assert listing.videos["video_id"].tolist() == ["clip_21s", "moviepy_big_buck_bunny_0_30"]
    np.testing.assert_allclose(listing.videos["duration_s"], [21.0, 30.0], atol=0.1)
    assert listing.summary["dropped"] == _dropped(no_duration=1, too_short=1)
    assert listing.summary["probed"] == 4

    unprobed = list_videos(manifest, ListingConfig(probe_missing_durations=False))
    assert unprobed.summary["kept"] == 0 and unprobed.summary["probed"] == 0
    assert unprobed.summary["dropped"] == _dropped(no_duration=4)


def test_probe_duration(clips, tmp_path):
    assert probe_duration(str(clips["5s"])) == pytest.approx(5.0, abs=0.1)
    (tmp_path / "text.mp4").write_text("not a video")
    assert probe_duration(str(tmp_path / "text.mp4")) is None
    assert probe_duration(str(tmp_path / "absent.mp4")) is None


@pytest.fixture
def static_server(tmp_path):
    """A plain file server on 127.0.0.1 over tmp_path/www."""
    www = tmp_path / "www"
    www.mkdir()
    handler = functools.partial(SimpleHTTPRequestHandler, directory=str(www))
    handler.log_message = lambda *args: None
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}", www
    httpd.shutdown()
    httpd.server_close()


def test_a_remote_source_without_duration_is_downloaded_and_probed(tmp_path, clips, static_server):
    base, www = static_server
    shutil.copy(clips["21s"], www / "clip.mp4")
    rows = [
        {"contentUrl": f"{base}/clip.mp4", "name": "remote clip"},
        {"contentUrl": f"{base}/absent.mp4", "name": "404: download_failed"},
        {"contentUrl": f"{base}/known.mp4", "name": "duration given, never downloaded", "duration": "PT30S"},
    ]
    downloads = tmp_path / "downloads"
    listing = list_videos(_csv(tmp_path / "m.csv", rows), ListingConfig(download_dir=str(downloads)))
    assert listing.videos["source"].tolist() == [f"{base}/clip.mp4", f"{base}/known.mp4"]
    assert listing.videos["video_id"].tolist() == ["clip", "known"]
    assert listing.videos["duration_s"].iloc[0] == pytest.approx(21.0, abs=0.1)
    assert listing.summary["dropped"] == _dropped(download_failed=1)
    assert listing.summary["probed"] == 2
    assert [p.suffix for p in downloads.iterdir()] == [".mp4"]  # only the probed file, cached for decoding


def _uninstalled_protocol() -> str | None:
    """A protocol fsspec knows whose package is not installed here (gs:// without gcsfs, ...), if any."""
    candidates = ("gs", "az", "oci", "webdav")
    return next((s for s in candidates if "not installed" in (unsupported_reason(s) or "")), None)


def test_sources_are_remote_local_or_unsupported_by_their_scheme(tmp_path, clips, caplog):
    memory = fsspec.filesystem("memory")
    memory.pipe("/fvlm-listing/clip.mp4", clips["21s"].read_bytes())
    uninstalled = _uninstalled_protocol()
    rows = [
        {"path": "memory://fvlm-listing/clip.mp4", "caption": "fsspec source, downloaded and probed"},
        {"path": "S3://bucket/given.mp4", "caption": "s3 with a duration: kept, never downloaded", "duration": 30},
        {"path": "ftp://host/other.mp4", "caption": "ftp: fsspec's own implementation", "duration": 30},
        {"path": "nosuchproto://host/a.mp4", "caption": "unknown protocol", "duration": 30},
        {"path": "zip://inner.mp4", "caption": "a wrapper names no file", "duration": 30},
    ]
    if uninstalled:
        rows.append({"path": f"{uninstalled}://bucket/b.mp4", "caption": "package missing", "duration": 30})
    downloads = tmp_path / "downloads"
    try:
        with caplog.at_level(logging.WARNING, logger="tasks.listing.filters"):
            listing = list_videos(_csv(tmp_path / "m.csv", rows), ListingConfig(download_dir=str(downloads)))
    finally:
        memory.rm("/fvlm-listing", recursive=True)
    assert listing.videos["source"].tolist() == [r["path"] for r in rows[:3]]
    assert listing.videos["video_id"].tolist() == ["clip", "given", "other"]
    assert listing.videos["duration_s"].iloc[0] == pytest.approx(21.0, abs=0.1)
    assert listing.summary["dropped"] == _dropped(unsupported_source=len(rows) - 3)
    assert listing.summary["probed"] == 1 and len(list(downloads.iterdir())) == 1
    assert "1 rows dropped as unsupported_source: nosuchproto:// is not a protocol fsspec" in caplog.text
    assert "zip:// is not a protocol fsspec" in caplog.text
    if uninstalled:
        assert f"{uninstalled}:// needs a package that is not installed" in caplog.text


def test_parse_durations():
    text = pa.chunked_array([[
        "PT00H00M22S", "PT22S", "PT1M5.5S", "P1DT1S", "pt2m", "22", " 22.5 ", ".5",
        "", None, "PT", "P", "abc", "-5", "nan", "inf", "PT00H00M2S",
    ]])  # fmt: skip
    expected = [22, 22, 65.5, 86401, 120, 22, 22.5, 0.5] + [np.nan] * 8 + [2]
    np.testing.assert_array_equal(parse_durations(text), expected)
    clock = pa.chunked_array([["00:00:22", "0:22", "1:05.5", "01:02:03", " 00:00:30 ", "1:2:3:4", "12:", ":5", "a:bc"]])
    np.testing.assert_array_equal(parse_durations(clock), [22, 22, 65.5, 3723, 30] + [np.nan] * 4)
    numbers = pa.chunked_array([[22, None, -1]], type=pa.int64())
    np.testing.assert_array_equal(parse_durations(numbers), [22.0, np.nan, np.nan])


def test_config_rejects_inverted_bounds():
    with pytest.raises(ValidationError, match="must not exceed"):
        ListingConfig(min_duration_s=61, max_duration_s=60)
    with pytest.raises(ValidationError):
        ListingConfig(min_duration_s=-1)


@pytest.mark.slow
def test_prefect_task_lists_and_returns_the_listing(tmp_path, prefect_harness):
    from prefect import flow

    from tasks.listing import list_videos_task

    manifest = _csv(tmp_path / "m.csv", [{"path": URL.format(1), "caption": "c", "duration": 30}])

    @flow
    def listing_flow(path: str):
        return list_videos_task(path, ListingConfig(max_duration_s=40))

    listing = listing_flow(str(manifest))
    assert listing.videos["video_id"].tolist() == ["stock-footage-clip"]
    assert listing.summary["kept"] == 1 and listing.summary["max_duration_s"] == 40.0


@pytest.mark.slow
def test_prefect_task_fails_an_unusable_manifest_at_once_without_retrying(tmp_path, prefect_harness):
    """A ManifestError is permanent: the task fails on its first try instead of waiting out its retries."""
    from prefect import flow
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    from tasks.listing import list_videos_task

    manifest = _csv(tmp_path / "m.csv", [{"video_id": "a", "caption": "no source column", "duration": 30}])

    @flow
    def listing_flow(path: str):
        return list_videos_task(path)

    started = time.monotonic()
    state = listing_flow(str(manifest), return_state=True)
    seconds = time.monotonic() - started
    assert state.is_failed()
    with pytest.raises(ManifestError, match="has no source column"):
        state.result()
    assert seconds < list_videos_task.retry_delay_seconds  # no retry was waited for
    with get_client(sync_client=True) as client:
        deadline = time.monotonic() + 30  # the server records task run states from events, a moment later
        while True:
            runs = client.read_task_runs(
                flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[state.state_details.flow_run_id])))
            if (runs and runs[0].state and runs[0].state.is_final()) or time.monotonic() > deadline:
                break
            time.sleep(0.2)
    assert len(runs) == 1 and runs[0].state.is_failed(), runs
    assert runs[0].run_count == 1
