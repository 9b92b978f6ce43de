"""benchmarks/feature_codec.py's core on a tiny store: the int8 error report and the layouts' bytes and reads."""

import numpy as np
import pytest

from benchmarks import feature_codec
from storage.store import FAILED, OK, ChunkRows, FeatureShapes, FeatureStore, StoreConfig

SHAPES = FeatureShapes(frames=4, tokens=16, feature_dim=32, latent_shape=(4, 2, 2))


def tiny_features(n: int, seed: int = 0) -> np.ndarray:
    """(n, F, N, D) float16: channels of different scales; frames 1-3 repeat frame 0 (compressible)."""
    rng = np.random.default_rng(seed)
    scales = np.geomspace(0.1, 10.0, SHAPES.feature_dim)
    first = rng.normal(size=(n, 1, SHAPES.tokens, SHAPES.feature_dim)) * scales
    return np.repeat(first, SHAPES.frames, axis=1).astype(np.float16)


@pytest.fixture
def store(tmp_path) -> FeatureStore:
    """4 rows in chunks of 2, row 2 failed."""
    n = 4
    store = FeatureStore.create(tmp_path / "src.zarr", [f"v{i}" for i in range(n)], ["c"] * n, ["s"] * n, [30.0] * n,
                                config=StoreConfig(chunk_videos=2), shapes=SHAPES)
    features = tiny_features(n)
    latents = np.ones((n, SHAPES.frames, *SHAPES.latent_shape), np.float16)
    status = np.array([OK, OK, FAILED, OK], np.uint8)
    for chunk in range(store.num_chunks):
        rows = slice(2 * chunk, 2 * chunk + 2)
        store.write_chunk(chunk, ChunkRows(features[rows], latents[rows], status[rows], ["", ""]))
    return store


def test_codec_report_meets_the_targets_and_names_the_outlier_channel():
    clean = feature_codec.codec_report(tiny_features(3), ["a", "b", "c"])
    assert clean["relative_l2_max"] < 0.01 and clean["met"]["relative_l2_max"] and clean["met"]["cosine_min"]
    features = tiny_features(3)
    features[1, 2, 5, 7] = 300.0  # one far value stretches channel 7's int8 step for the whole video
    report = feature_codec.codec_report(features, ["a", "b", "c"])
    assert report["channels"][0]["channel"] == 7
    assert report["channels"][0]["range_over_std"] > 1.5 * max(c["range_over_std"] for c in clean["channels"])
    assert [v["video_id"] for v in report["videos"]] == ["a", "b", "c"]
    assert max(v["relative_l2"] for v in report["videos"]) == pytest.approx(report["relative_l2_max"])
    assert report["videos"][1]["relative_l2"] > clean["videos"][1]["relative_l2"]


def test_layouts_keep_the_values_and_measure_bytes_and_reads(store, tmp_path):
    rows = feature_codec.ok_rows(store)
    assert rows.tolist() == [0, 1, 3]
    results = feature_codec.measure_layouts(store, rows, tmp_path / "layouts", copies=2, batch=4, frames=2, reads=1)
    by = {r["layout"]: r for r in results}
    assert list(by) == [f"{c}/{z}" for c, z in feature_codec.LAYOUTS]
    raw = SHAPES.frames * SHAPES.tokens * SHAPES.feature_dim * 2  # float16 bytes of one video's features
    assert by["float16/none"]["feature_bytes_per_video"] >= raw
    assert by["int8/none"]["feature_bytes_per_video"] < 0.75 * by["float16/none"]["feature_bytes_per_video"]
    assert by["float16/zstd"]["feature_ratio"] < 0.75  # repeated frames compress
    assert by["float16/none"]["mode"] == "file" and by["float16/zstd"]["mode"] == "zarr"
    assert all(r["samples_per_s"] > 0 for r in results)
    original = store.group["dino_features"].oindex[rows].astype(np.float32)
    for layout in ("float16-zstd", "int8-none"):
        rewritten = FeatureStore.open(tmp_path / "layouts" / f"{layout}.zarr")
        assert rewritten.num_videos == 6 and rewritten.counts()["ok"] == 6
        back = np.stack([rewritten.read_features(i) for i in range(3)]).astype(np.float32)
        step = np.ptp(original, axis=(1, 2), keepdims=True) / 254  # int8's step per video and channel
        assert np.all(np.abs(back - original) <= step / 2 + 1e-2 * np.abs(original) + 1e-3)
