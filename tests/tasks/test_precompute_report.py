"""The precompute's pictures: throughput per committed chunk and sample frames of what the store holds."""

import base64
import io
import re

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from model.encoders import EncoderConfig
from storage.store import FeatureStore, StoreConfig
from tasks.decode import DecodeConfig
from tasks.listing import Listing
from tasks.plots import ONE_GREY
from tasks.precompute import PrecomputeConfig, encode_chunks, format_bytes, precompute_table, prepare_store
from tasks.precompute_report import precompute_markdown, throughput_plot, throughput_points
from tasks.samples import make_video
from tests.tasks.test_training import make_tiny_store


def embedded_pngs(markdown):
    uris = re.findall(r"\(data:image/png;base64,([A-Za-z0-9+/=]+)\)", markdown)
    return [Image.open(io.BytesIO(base64.b64decode(uri))) for uri in uris]


@pytest.fixture(scope="module")
def encoded(tmp_path_factory):
    """Three short generated videos in chunks of two rows, encoded with the demo encoders."""
    folder = tmp_path_factory.mktemp("precompute")
    ids = ["v0", "v1", "v2"]
    for i, name in enumerate(ids):
        make_video(folder / f"{name}.mp4", 21, fps=2, size=(64, 48), seed=i)
    videos = pd.DataFrame({"video_id": ids, "source": [str(folder / f"{i}.mp4") for i in ids],
                           "caption": [f"caption of {i}" for i in ids], "duration_s": [21.0] * 3})
    listing = Listing(videos=videos, summary={"manifest": "m.csv", "rows": 3, "kept": 3, "dropped": {},
                                              "min_duration_s": 20.0, "max_duration_s": 60.0, "probed": 0})
    config = PrecomputeConfig(encoder=EncoderConfig(preset="demo"), device="cpu", decode=DecodeConfig(workers=1),
                              layout=StoreConfig(chunk_videos=2))
    path = str(folder / "s.zarr")
    report = encode_chunks(path, prepare_store(path, listing, config).pending_chunks(), config)
    return path, report.as_dict()


def test_each_committed_chunk_records_its_time_and_videos(encoded):
    _, report = encoded
    commits = report["commits"]
    assert [c["chunk"] for c in commits] == [0, 1] and [c["videos"] for c in commits] == [2, 1]
    assert 0 < commits[0]["seconds"] <= commits[1]["seconds"] <= report["seconds"]


def test_throughput_counts_each_chunk_from_the_commit_before():
    reports = [{"seconds": 10.0, "commits": [{"chunk": 0, "seconds": 4.0, "videos": 8},
                                             {"chunk": 1, "seconds": 6.0, "videos": 8}]},
               {"seconds": 5.0, "commits": [{"chunk": 2, "seconds": 2.0, "videos": 2}]}]
    assert throughput_points(reports) == [(4.0, 2.0), (6.0, 4.0), (12.0, 1.0)]
    assert throughput_points([{"seconds": 3.0, "videos_ok": 4}]) == []  # scale-out: no per-chunk times


def test_the_throughput_plot_marks_the_average():
    picture = np.asarray(throughput_plot([(4.0, 2.0), (6.0, 4.0)], average=3.0))
    grey_rows = [y for y in range(picture.shape[0]) if (picture[y, 90:700] == ONE_GREY).all(-1).sum() > 150]
    assert len(grey_rows) == 1  # one dashed line across the axes
    no_average = np.asarray(throughput_plot([(4.0, 2.0), (6.0, 4.0)], average=None))
    assert not any((no_average[y, 90:700] == ONE_GREY).all(-1).sum() > 150 for y in range(no_average.shape[0]))


def test_the_overview_embeds_the_throughput_and_sample_frames(encoded):
    path, report = encoded
    info = FeatureStore.open(path).info()
    markdown, description = precompute_markdown(path, info, [report])
    images = embedded_pngs(markdown)
    assert len(images) == 2 and all(image.format == "PNG" for image in images)
    assert images[0].size == (760, 340) and images[1].width > 800  # throughput, then 3 samples of 3 frames
    assert "3 ok videos with their captions" in markdown and len(markdown) < 300_000
    assert description.startswith("3 ok, 0 failed, 0 pending")
    size = {row["metric"]: row["value"] for row in precompute_table(info, [report])}["bytes per ok video"]
    assert re.fullmatch(r"[\d.]+ (KiB|MiB) \([\d,]+ bytes\)", size), size


def test_no_samples_when_no_source_can_be_read_again(tmp_path):
    path = make_tiny_store(tmp_path / "s.zarr", videos=4)  # sources "missing/..."
    info = FeatureStore.open(path).info()
    markdown, _ = precompute_markdown(path, info, [])
    assert embedded_pngs(markdown) == [] and "No ok video whose source" in markdown
    assert "No per-chunk times" in markdown


def test_byte_counts_have_units_and_separators():
    assert format_bytes(6874665) == "6.56 MiB (6,874,665 bytes)"
    assert format_bytes(512) == "512 bytes" and format_bytes(2048) == "2 KiB (2,048 bytes)"
