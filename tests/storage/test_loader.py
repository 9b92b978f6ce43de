"""The training loader over tiny real stores: split, block shuffle, resume, workers, values read."""

import itertools

import numpy as np
import pytest
import torch

from storage.loader import (
    BatchReader,
    LoaderConfig,
    LoaderError,
    LoaderPosition,
    epoch_order,
    eval_batches,
    frame_indices,
    make_train_loader,
    split_rows,
)
from storage.store import FAILED, OK, PENDING, ChunkRows, FeatureShapes, FeatureStore, StoreConfig

SHAPES = FeatureShapes(frames=24, tokens=5, feature_dim=8, latent_shape=(4, 2, 2))


def make_store(path, videos=30, chunk=4, status=None, compression="none", zero_rows=()):
    """A store of `videos` rows with distinct random values; `status` per row (default all ok)."""
    status = np.full(videos, OK, dtype=np.uint8) if status is None else np.asarray(status, dtype=np.uint8)
    store = FeatureStore.create(
        path, [f"video-{i}" for i in range(videos)], ["a caption"] * videos, ["src"] * videos, [30.0] * videos,
        attrs={}, config=StoreConfig(chunk_videos=chunk, compression=compression), shapes=SHAPES,
    )
    rng = np.random.default_rng(1)
    for c in range(store.num_chunks):
        rows = store.chunk_rows(c)
        n = len(rows)
        features = rng.standard_normal((n, 24, 5, 8)).astype(np.float16)
        latents = rng.standard_normal((n, 24, 4, 2, 2)).astype(np.float16)
        for i, row in enumerate(rows):
            if row in zero_rows:
                features[i] = 0
                latents[i] = 0
        st = status[rows.start:rows.stop]
        store.write_chunk(c, ChunkRows(features, latents, st, ["" if s == OK else "bad" for s in st]))
    return store


def take(loader, n):
    """n batches as (epoch, batch, rows, features copy, latents copy): batches live in reused buffers."""
    out = []
    for batch in itertools.islice(iter(loader), n):
        out.append((batch["epoch"], batch["batch"], batch["rows"].tolist(),
                    batch["features"].clone(), batch["latents"].clone()))
    return out


@pytest.fixture
def store(tmp_path):
    return make_store(tmp_path / "store.zarr")


def test_frame_indices_are_floor_of_linspace():
    assert frame_indices(24, 16).tolist() == [0, 1, 3, 4, 6, 7, 9, 10, 12, 13, 15, 16, 18, 19, 21, 23]
    assert frame_indices(24, 24).tolist() == list(range(24))
    assert frame_indices(24, 16).dtype == np.int64
    with pytest.raises(LoaderError, match="loader.frames"):
        frame_indices(8, 16)


def test_split_is_stable_disjoint_and_only_ok_rows():
    ids = [f"id-{i}" for i in range(400)]
    status = np.full(400, OK, dtype=np.uint8)
    status[::7] = FAILED
    status[3::11] = PENDING
    train, held = split_rows(ids, status, 0.2)
    assert set(train).isdisjoint(held)
    assert sorted([*train, *held]) == np.flatnonzero(status == OK).tolist()
    assert 0.1 < len(held) / (len(train) + len(held)) < 0.3
    again = split_rows(ids, status, 0.2)
    assert np.array_equal(again[0], train) and np.array_equal(again[1], held)
    # the store rebuilt in another order and extended: every id keeps its side
    perm = np.random.default_rng(0).permutation(400)
    ids2 = [ids[i] for i in perm] + [f"new-{i}" for i in range(100)]
    status2 = np.r_[status[perm], np.full(100, OK, dtype=np.uint8)]
    train2, held2 = split_rows(ids2, status2, 0.2)
    assert {ids2[r] for r in held2} & set(ids) == {ids[r] for r in held}
    assert {ids2[r] for r in train2} & set(ids) == {ids[r] for r in train}


def test_split_holds_out_one_row_when_the_rule_picks_none():
    train, held = split_rows(["a", "b", "c"], np.array([OK, OK, FAILED]), 1e-12)
    assert len(held) == 1 and len(train) == 1 and set([*train, *held]) == {0, 1}
    assert split_rows(["a", "b"], np.array([OK, OK]), 0.0)[1].size == 0  # eval_fraction 0: nothing held out
    assert split_rows(["a", "b"], np.array([OK, FAILED]), 1e-12)[1].size == 0  # one ok row: keep it for training


def test_order_is_a_pure_function_of_seed_and_epoch():
    rows = np.arange(40)
    config = LoaderConfig(batch_size=4, buffer_chunks=2, seed=3)
    first = epoch_order(rows, 4, config, epoch=0)
    assert first.shape == (10, 4)
    assert np.array_equal(first, epoch_order(rows[::-1].copy(), 4, config, epoch=0))  # a set: order irrelevant
    assert not np.array_equal(first, epoch_order(rows, 4, config, epoch=1))
    assert not np.array_equal(first, epoch_order(rows, 4, config.model_copy(update={"seed": 4}), epoch=0))
    assert sorted(first.ravel().tolist()) == rows.tolist()  # each row once per epoch
    assert (np.diff(first, axis=1) > 0).all()  # sorted inside a batch
    # block shuffle: a buffer of 2 chunks of 4 rows is 8 rows, so each batch of 4 comes from at most 2 chunks
    assert max(len(set((batch // 4).tolist())) for batch in first) <= 2
    full_shuffles = [epoch_order(rows, 4, config, epoch=e) for e in range(5)]
    assert len({tuple(o.ravel().tolist()) for o in full_shuffles}) == 5


def test_tail_is_dropped_and_every_epoch_has_the_same_batches():
    config = LoaderConfig(batch_size=8, buffer_chunks=3)
    orders = [epoch_order(np.arange(0, 60, 2), 4, config, epoch=e) for e in range(3)]
    assert {o.shape for o in orders} == {(3, 8)}  # 30 rows -> 3 whole batches of 8


def test_training_batches_never_hold_eval_failed_or_pending_rows(tmp_path):
    status = np.full(40, OK, dtype=np.uint8)
    status[[1, 2, 17]] = FAILED
    status[[5, 30, 31]] = PENDING
    store = make_store(tmp_path / "s.zarr", videos=40, status=status)
    train, held = split_rows(store.read_column("video_id"), store.read_status(), 0.15)
    assert held.size > 0
    config = LoaderConfig(batch_size=5, buffer_chunks=2, num_workers=0)
    loader = make_train_loader(store.path, train, config, LoaderPosition(), pin_memory=False)
    batches = take(loader, 3 * (len(train) // 5))
    seen = [row for _, _, rows, _, _ in batches for row in rows]
    assert set(seen) <= set(train.tolist())
    assert not set(seen) & {1, 2, 17, 5, 30, 31}
    assert not set(seen) & set(held.tolist())
    first_epoch = [row for epoch, _, rows, _, _ in batches if epoch == 0 for row in rows]
    assert len(first_epoch) == len(set(first_epoch)) == (len(train) // 5) * 5
    assert [b[0] for b in batches] == [e for e in range(3) for _ in range(len(train) // 5)]
    with pytest.raises(LoaderError, match="not ok"):
        make_train_loader(store.path, np.r_[train, 17], config, LoaderPosition(), pin_memory=False)


def test_values_and_dtypes_equal_the_store(store):
    train = np.arange(store.num_videos)
    config = LoaderConfig(batch_size=6, buffer_chunks=2, num_workers=0)
    features = np.asarray(store.group["dino_features"][:])
    latents = np.asarray(store.group["latents"][:])
    used = frame_indices(24, 16)
    for _, _, rows, f, lat in take(make_train_loader(store.path, train, config, LoaderPosition(), False), 7):
        assert f.dtype == torch.float16 and lat.dtype == torch.float16
        assert f.shape == (6, 16, 5, 8) and lat.shape == (6, 16, 4, 2, 2)
        assert np.array_equal(f.numpy(), features[rows][:, used])
        assert np.array_equal(lat.numpy(), latents[rows][:, used])


def test_direct_chunk_reads_equal_zarr_reads(tmp_path):
    store = make_store(tmp_path / "s.zarr", videos=22, chunk=8, zero_rows=range(8, 16))  # chunk 1 is all zero
    assert not (tmp_path / "s.zarr" / "dino_features" / "c" / "1").exists()  # zarr skips all-fill chunks
    direct, through_zarr = BatchReader(store.path, 16), BatchReader(store.path, 16, direct=False)
    assert direct.direct and not through_zarr.direct
    rows = np.array([21, 3, 9, 0, 20, 7, 15, 16])  # unsorted, edge chunk, missing chunk
    out = [(np.full((8, 16, 5, 8), 7, np.float16), np.full((8, 16, 4, 2, 2), 7, np.float16)) for _ in range(2)]
    direct.read(rows, *out[0])
    through_zarr.read(rows, *out[1])
    used = frame_indices(24, 16)
    assert np.array_equal(out[0][0], out[1][0]) and np.array_equal(out[0][1], out[1][1])
    assert np.array_equal(out[0][0], np.asarray(store.group["dino_features"][:])[rows][:, used])
    assert np.array_equal(out[0][1], np.asarray(store.group["latents"][:])[rows][:, used])
    assert not out[0][0][2].any()  # row 9 lies in the chunk that was never written


def test_compressed_store_reads_through_zarr(tmp_path):
    store = make_store(tmp_path / "z.zarr", videos=12, compression="zstd")
    reader = BatchReader(store.path, 16)
    assert not reader.direct
    with pytest.raises(LoaderError, match="compressed"):
        BatchReader(store.path, 16, direct=True)
    config = LoaderConfig(batch_size=4, buffer_chunks=2, num_workers=0)
    features = np.asarray(store.group["dino_features"][:])
    for _, _, rows, f, _ in take(make_train_loader(store.path, np.arange(12), config, LoaderPosition(), False), 4):
        assert np.array_equal(f.numpy(), features[rows][:, frame_indices(24, 16)])


def test_same_batches_with_0_1_and_2_workers(store):
    train = np.arange(2, 30)
    runs = {}
    for workers in (0, 1, 2):
        config = LoaderConfig(batch_size=4, buffer_chunks=2, num_workers=workers, prefetch_factor=2)
        runs[workers] = take(make_train_loader(store.path, train, config, LoaderPosition(), False), 16)
    expected = [epoch_order(train, 4, config, e) for e in range(3)]
    for workers, batches in runs.items():
        assert [(e, b) for e, b, *_ in batches] == [(e, b) for e in range(3) for b in range(7)][:16], workers
        assert [rows for _, _, rows, _, _ in batches] == [expected[e][b].tolist() for e, b, *_ in batches]
        for (_, _, _, f0, l0), (_, _, _, f, lat) in zip(runs[0], batches):
            assert torch.equal(f0, f) and torch.equal(l0, lat)


def test_resume_from_a_position_equals_continuing(store):
    train = np.arange(30)
    config = LoaderConfig(batch_size=4, buffer_chunks=2, num_workers=2)
    straight = take(make_train_loader(store.path, train, config, LoaderPosition(), False), 20)
    # stop after 9 batches, save the position as a checkpoint would, start again from it
    position = LoaderPosition()
    for epoch, batch, *_ in straight[:9]:
        position = position.advanced({"epoch": epoch, "batch": batch})
    state = position.to_dict()
    assert state == {"epoch": 1, "batch": 2} and all(type(v) is int for v in state.values())
    resumed = take(make_train_loader(store.path, train, config, LoaderPosition.from_dict(state), False), 11)
    assert [b[:3] for b in resumed] == [b[:3] for b in straight[9:]]
    assert all(torch.equal(a[3], b[3]) for a, b in zip(resumed, straight[9:]))
    # a position one past an epoch's last batch (saved right after it) starts the next epoch
    at_end = take(make_train_loader(store.path, train, config, LoaderPosition(0, 7), False), 1)
    assert at_end[0][:3] == straight[7][:3]
    # a position beyond the epoch (saved when there were more training rows) also starts the next epoch
    beyond = take(make_train_loader(store.path, train, config, LoaderPosition(0, 50), False), 1)
    assert beyond[0][:3] == straight[7][:3]


def test_position_round_trip_and_errors():
    position = LoaderPosition(epoch=3, batch=5)
    assert LoaderPosition.from_dict(position.to_dict()) == position
    assert position.global_index(7) == 26 and LoaderPosition.from_global(26, 7) == position
    with pytest.raises(LoaderError):
        LoaderPosition.from_dict({"epoch": 1})
    with pytest.raises(LoaderError):
        LoaderPosition(epoch=-1)


def test_a_batch_stays_intact_while_the_next_is_taken(store):
    config = LoaderConfig(batch_size=4, buffer_chunks=2, num_workers=2, prefetch_factor=2)
    features = np.asarray(store.group["dino_features"][:])
    used = frame_indices(24, 16)
    iterator = iter(make_train_loader(store.path, np.arange(30), config, LoaderPosition(), False))
    held = next(iterator)
    for _ in range(12):
        newer = next(iterator)
        assert np.array_equal(held["features"].numpy(), features[held["rows"].numpy()][:, used])
        held = newer


def test_settings_that_cannot_work_fail_in_the_training_process(store):
    with pytest.raises(LoaderError, match="batch_size"):
        make_train_loader(store.path, np.arange(3), LoaderConfig(batch_size=4), LoaderPosition(), False)
    with pytest.raises(LoaderError, match="loader.frames"):
        make_train_loader(store.path, np.arange(30), LoaderConfig(batch_size=4, frames=25), LoaderPosition(), False)
    with pytest.raises(LoaderError, match=r"\[0, 30\)"):
        make_train_loader(store.path, np.arange(31), LoaderConfig(batch_size=4), LoaderPosition(), False)


def test_eval_batches_in_row_order_with_a_short_last_batch(store):
    config = LoaderConfig(batch_size=4, frames=8)
    rows = np.array([29, 3, 17, 4, 11, 12])
    batches = [(b["batch"], b["rows"].tolist(), b["features"].clone(), b["latents"].dtype)
               for b in eval_batches(store.path, rows, config)]
    assert [(i, r) for i, r, _, _ in batches] == [(0, [3, 4, 11, 12]), (1, [17, 29])]
    features = np.asarray(store.group["dino_features"][:])
    for _, r, f, latent_dtype in batches:
        assert f.dtype == torch.float16 and latent_dtype == torch.float16
        assert np.array_equal(f.numpy(), features[r][:, frame_indices(24, 8)])
    assert len(list(eval_batches(store.path, rows, config, max_batches=1))) == 1
    assert list(eval_batches(store.path, np.array([], dtype=np.int64), config)) == []
