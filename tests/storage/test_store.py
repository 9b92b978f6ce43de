import numpy as np
import pytest

from storage.store import FAILED, OK, PENDING, ChunkRows, FeatureShapes, FeatureStore, StoreConfig, StoreError

SHAPES = FeatureShapes(frames=4, tokens=5, feature_dim=8, latent_shape=(4, 2, 2))


def make_store(path, n=10, k=4, **kwargs):
    ids = [f"v{i}" for i in range(n)]
    return FeatureStore.create(path, ids, [f"caption {i}" for i in range(n)], [f"/videos/{i}.mp4" for i in ids],
                               [20.0 + i for i in range(n)], {"dino": {"id": "d"}, "vae": {"id": "v"},
                                                              "listing": {"kept": n}},
                               StoreConfig(chunk_videos=k, **kwargs), SHAPES)


def rows_for(store, chunk, seed, status=OK):
    n = len(store.chunk_rows(chunk))
    rng = np.random.default_rng(seed)
    return ChunkRows(
        features=rng.standard_normal((n, 4, 5, 8)).astype(np.float16),
        latents=rng.standard_normal((n, 4, 4, 2, 2)).astype(np.float16),
        status=np.full(n, status, np.uint8), error=["" if status == OK else "bad"] * n,
    )


def test_create_writes_rows_pending_and_attributes(tmp_path):
    store = make_store(tmp_path / "s.zarr")
    again = FeatureStore.open(tmp_path / "s.zarr")
    assert again.num_videos == 10 and again.chunk_videos == 4 and again.num_chunks == 3
    assert list(again.read_column("video_id")) == [f"v{i}" for i in range(10)]
    assert again.read_column("caption")[3] == "caption 3"
    assert np.allclose(again.read_column("duration_s"), np.arange(20, 30))
    assert (again.read_status() == PENDING).all()
    assert again.attrs["frames"] == 4 and again.attrs["tokens"] == 5 and again.attrs["chunk_videos"] == 4
    assert again.attrs["listing"] == {"kept": 10}
    assert store.group["dino_features"].chunks == (4, 4, 5, 8)
    assert store.group["status"].chunks == (4,)


def test_round_trip_of_a_chunk_and_its_commit_mark(tmp_path):
    store = make_store(tmp_path / "s.zarr")
    rows = rows_for(store, 1, seed=1)
    store.write_chunk(1, rows)
    back = FeatureStore.open(tmp_path / "s.zarr").read_chunk(1)
    assert np.array_equal(back.features, rows.features) and back.features.dtype == np.float16
    assert np.array_equal(back.latents, rows.latents)
    assert list(store.read_status()) == [PENDING] * 4 + [OK] * 4 + [PENDING] * 2
    assert store.pending_chunks() == [0, 2]


def test_last_chunk_is_short_and_failures_are_reported(tmp_path):
    store = make_store(tmp_path / "s.zarr")
    assert list(store.chunk_rows(2)) == [8, 9]
    store.write_chunk(2, rows_for(store, 2, seed=2, status=FAILED))
    info = store.info()
    assert (info["videos"], info["ok"], info["failed"], info["pending"]) == (10, 0, 2, 8)
    assert info["failed_by_reason"] == {"bad": 2}
    assert [f["video_id"] for f in info["failures"]] == ["v8", "v9"]
    assert store.pending_chunks(retry_failed=False) == [0, 1]
    assert store.pending_chunks() == [0, 1, 2]
    assert info["sizes"]["disk_bytes"] > 0


def test_write_chunk_refuses_wrong_shapes(tmp_path):
    store = make_store(tmp_path / "s.zarr")
    rows = rows_for(store, 0, seed=0)
    rows.features = rows.features[:, :, :3]
    with pytest.raises(ValueError, match="features per video"):
        store.write_chunk(0, rows)
    assert (store.read_status() == PENDING).all()


def test_open_refuses_what_is_not_a_store(tmp_path):
    with pytest.raises(StoreError, match="does not exist"):
        FeatureStore.open(tmp_path / "missing.zarr")
    import zarr

    zarr.open_group(tmp_path / "other.zarr", mode="w")
    with pytest.raises(StoreError, match="not a feature store"):
        FeatureStore.open(tmp_path / "other.zarr")


def test_create_refuses_to_overwrite(tmp_path):
    make_store(tmp_path / "s.zarr")
    with pytest.raises(Exception):
        make_store(tmp_path / "s.zarr")
    assert FeatureStore.open(tmp_path / "s.zarr").num_videos == 10


def test_zstd_layout_round_trips(tmp_path):
    store = make_store(tmp_path / "z.zarr", compression="zstd")
    rows = rows_for(store, 0, seed=3)
    store.write_chunk(0, rows)
    assert np.array_equal(FeatureStore.open(tmp_path / "z.zarr").read_chunk(0).features, rows.features)
    assert store.attrs["compression"] == "zstd"
