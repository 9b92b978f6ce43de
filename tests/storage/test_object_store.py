"""A feature store at an s3:// URL, on a real S3 API server on loopback (moto): creation, reopening, sizes, an
interrupted creation, and batches read with concurrent ranged requests that equal the local store's."""

import logging

import numpy as np
import pytest
import torch
import zarr

from storage.loader import BatchReader, LoaderConfig, LoaderPosition, eval_batches, make_train_loader
from storage.store import FeatureStore, StoreError
from tests.s3_server import TEST_SECRET_KEY
from tests.storage.test_feature_codec import SMALL, features_like_dino, make_store


@pytest.fixture
def stores(s3_env, tmp_path):
    """The same rows in a local store and at a URL, for both codecs: {(codec, 'local'|'s3'): store}."""
    x = features_like_dino(14, SMALL)
    return {(codec, where): make_store(path, codec, x)
            for codec in ("float16", "int8")
            for where, path in (("local", tmp_path / f"{codec}.zarr"), ("s3", f"{s3_env}/{codec}.zarr"))}


def test_a_store_at_a_url_reopens_with_its_rows(stores, s3_env):
    store = FeatureStore.open(f"{s3_env}/int8.zarr")
    assert store.path.startswith("s3://") and store.feature_codec == "int8"
    assert store.counts() == {"videos": 14, "ok": 14, "failed": 0, "pending": 0}
    assert FeatureStore.exists(store.path) and not FeatureStore.exists(f"{s3_env}/absent.zarr")
    local = stores[("int8", "local")]
    assert np.array_equal(store.read_features(5), local.read_features(5))
    info = store.info()
    assert info["sizes"]["disk_bytes"] == pytest.approx(local.disk_bytes(), rel=0.05)  # measured by a listing


def test_ranged_reads_equal_local_reads(stores):
    rows = np.array([13, 0, 6, 5, 9, 2])  # unsorted, several chunks, the short last chunk
    for codec in ("float16", "int8"):
        local, remote = BatchReader(stores[(codec, "local")].path, 16), BatchReader(stores[(codec, "s3")].path, 16)
        assert (local.mode, remote.mode) == ("file", "ranges")
        through_zarr = BatchReader(stores[(codec, "s3")].path, 16, direct=False)
        assert through_zarr.mode == "zarr"
        outs = []
        for reader in (local, remote, through_zarr):
            out = (np.full((6, 16, 5, 8), 7, reader.feature_dtype), np.full((6, 16, 4, 2, 2), 7, np.float16))
            extra = reader.read(rows, *out)
            outs.append((*out, {k: v.numpy() for k, v in extra.items()}))
        for other in outs[1:]:
            assert np.array_equal(outs[0][0], other[0]) and np.array_equal(outs[0][1], other[1])
            assert outs[0][2].keys() == other[2].keys()
            assert all(np.array_equal(outs[0][2][k], other[2][k]) for k in other[2])


def test_training_batches_from_the_url_with_worker_processes(stores):
    """DataLoader workers (forked after this process used zarr's event loop) read the URL: same batches."""
    config = LoaderConfig(batch_size=4, buffer_chunks=2, num_workers=2, prefetch_factor=1)
    local = make_train_loader(stores[("int8", "local")].path, np.arange(14), config, LoaderPosition(), False)
    remote = make_train_loader(stores[("int8", "s3")].path, np.arange(14), config, LoaderPosition(), False)
    for _, a, b in zip(range(5), local, remote):
        assert a["rows"].tolist() == b["rows"].tolist() and (a["epoch"], a["batch"]) == (b["epoch"], b["batch"])
        assert torch.equal(a["features"], b["features"]) and torch.equal(a["feature_scale"], b["feature_scale"])
    held = [b["rows"].tolist() for b in eval_batches(stores[("float16", "s3")].path, np.array([1, 8, 12]), config)]
    assert held == [[1, 8, 12]]


def test_an_interrupted_creation_at_a_url_is_replaced(s3_env, caplog):
    url = f"{s3_env}/half.zarr"
    group = zarr.open_group(url, mode="w-")  # what a killed `create` leaves: arrays, no schema_version
    group.create_array("dino_features", shape=(4, 24, 5, 8), chunks=(2, 24, 5, 8), dtype="float16")
    with pytest.raises(StoreError, match="creation was interrupted"):
        FeatureStore.open(url)
    with caplog.at_level(logging.WARNING, logger="storage.store"):
        store = make_store(url, "float16", features_like_dino(4, SMALL), atomic=True)
    assert "creation was interrupted" in caplog.text
    assert FeatureStore.open(store.path).counts()["ok"] == 4


def test_a_url_holding_something_else_is_refused(s3_env):
    url = f"{s3_env}/other.zarr"
    zarr.open_group(url, mode="w-").create_array("weights", shape=(3,), dtype="float32")
    with pytest.raises(StoreError, match="not a feature store"):
        make_store(url, "float16", features_like_dino(2, SMALL), atomic=True)
    assert "weights" in zarr.open_group(url, mode="r")  # nothing of it removed


def test_a_missing_store_at_a_url_is_a_clear_error(s3_env):
    with pytest.raises(StoreError, match="absent.zarr"):
        FeatureStore.open(f"{s3_env}/absent.zarr")


def test_a_failure_at_a_url_does_not_print_the_secret(s3_env):
    """A store in a bucket that does not exist: the error names the URL, not the credentials."""
    with pytest.raises(StoreError) as err:
        FeatureStore.open("s3://no-such-bucket-fvlm/x.zarr")
    assert TEST_SECRET_KEY not in str(err.value) and TEST_SECRET_KEY not in repr(err.value.__cause__)


def test_import_pt_into_a_url_with_the_compact_codec(s3_env, tmp_path):
    from storage.import_pt import import_pt_folder
    from storage.store import StoreConfig
    from tests.storage.test_import_pt import SEED_ENCODERS, write_seed_folder

    expected = write_seed_folder(tmp_path / "pt")
    url = f"{s3_env}/imported.zarr"
    config = StoreConfig(chunk_videos=2, feature_codec="int8")
    assert import_pt_folder(tmp_path / "pt", url, config, **SEED_ENCODERS)["ok"] == 5
    store = FeatureStore.open(url)
    assert store.feature_codec == "int8" and store.attributes.dino.id == SEED_ENCODERS["dino_id"]
    for row, video in enumerate(store.read_column("video_id")):
        want = expected[str(video)]["dino_features"].float().numpy()
        assert np.abs(store.read_features(row).astype(np.float32) - want).max() <= np.abs(want).max() / 100
    assert import_pt_folder(tmp_path / "pt", url, config, **SEED_ENCODERS)["ok"] == 5  # a rerun does nothing new
