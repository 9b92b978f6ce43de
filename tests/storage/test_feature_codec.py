"""The compact int8 codec of dino_features: its error bounds, its store layout, and batches dequantised on the
device that equal what the store holds."""

import numpy as np
import pytest
import torch

from storage.feature_codec import codec_error, dequantise_int8, features_on_device, quantise_int8
from storage.loader import BatchReader, LoaderConfig, LoaderPosition, eval_batches, frame_indices, make_train_loader
from storage.store import OK, ChunkRows, FeatureShapes, FeatureStore, StoreConfig

REAL = FeatureShapes()  # 24 frames, 325 tokens x 384 dims, latents 4 x 32 x 32
SMALL = FeatureShapes(frames=24, tokens=5, feature_dim=8, latent_shape=(4, 2, 2))


def features_like_dino(n: int, shapes: FeatureShapes, seed: int = 0) -> np.ndarray:
    """Token features whose channels differ in mean and spread by orders of magnitude, as DINOv2's do."""
    rng = np.random.default_rng(seed)
    spread = np.exp(rng.uniform(-3, 2, shapes.feature_dim))
    mean = rng.standard_normal(shapes.feature_dim) * spread
    x = rng.standard_normal((n, shapes.frames, shapes.tokens, shapes.feature_dim)) * spread + mean
    return x.astype(np.float16)


def make_store(path, codec: str, features: np.ndarray, shapes: FeatureShapes = SMALL, chunk: int = 4,
               atomic: bool = False):
    n = len(features)
    store = FeatureStore.create(path, [f"v{i}" for i in range(n)], [""] * n, [""] * n, [30.0] * n,
                                config=StoreConfig(chunk_videos=chunk, feature_codec=codec), shapes=shapes,
                                atomic=atomic)
    latents = np.random.default_rng(1).standard_normal((n, shapes.frames, *shapes.latent_shape)).astype(np.float16)
    for c in range(store.num_chunks):
        rows = store.chunk_rows(c)
        sl = slice(rows.start, rows.stop)
        store.write_chunk(c, ChunkRows(features[sl], latents[sl], np.full(len(rows), OK, np.uint8), [""] * len(rows)))
    return store


def test_int8_keeps_real_sized_features_within_one_percent():
    x = features_like_dino(2, REAL)
    codes, scale, offset = quantise_int8(x)
    assert codes.dtype == np.int8 and scale.shape == offset.shape == (2, REAL.feature_dim)
    restored = dequantise_int8(codes, scale, offset)
    error = codec_error(x, restored)
    assert error["relative_l2_max"] <= 0.01 and error["cosine_min"] >= 0.999
    # no value is further than half a step from where it was
    assert np.all(np.abs(restored - x.astype(np.float32)) <= scale[:, None, None, :] / 2 * 1.001 + 1e-6)


def test_codec_error_sees_a_planted_error_and_none_without_one():
    x = features_like_dino(2, SMALL)
    assert codec_error(x, x) == pytest.approx({"relative_l2_max": 0, "relative_l2_mean": 0, "cosine_min": 1,
                                               "cosine_q001": 1})
    noisy = x + 0.05 * np.abs(x).mean() * np.random.default_rng(2).standard_normal(x.shape)
    error = codec_error(x, noisy)
    assert error["relative_l2_max"] > 0.01 and error["cosine_min"] < 0.999


def test_per_channel_scales_matter():
    """Negative control of the design: one scale for all channels loses the small channels."""
    x = features_like_dino(1, SMALL)
    codes, scale, offset = quantise_int8(x)
    one = np.full_like(scale, scale.max())
    shared = dequantise_int8(quantise_int8_with(x, one, offset), one, offset)
    per_channel = dequantise_int8(codes, scale, offset)
    small = int(np.argmin(x.astype(np.float32).std(axis=(0, 1, 2))))  # the channel of the smallest spread

    def channel_error(restored):
        centred = x[..., small].astype(np.float64) - x[..., small].astype(np.float64).mean()
        return np.linalg.norm(restored[..., small] - x[..., small]) / np.linalg.norm(centred)

    assert channel_error(per_channel) < 0.02 < 0.2 < channel_error(shared)


def quantise_int8_with(x, scale, offset):
    return np.clip(np.rint((x.astype(np.float32) - offset[:, None, None, :]) / scale[:, None, None, :]),
                   -127, 127).astype(np.int8)


def test_a_constant_channel_comes_back_exactly():
    x = features_like_dino(1, SMALL)
    x[..., 3] = 2.5
    codes, scale, offset = quantise_int8(x)
    assert np.all(dequantise_int8(codes, scale, offset)[..., 3] == 2.5)


def test_an_int8_store_takes_half_the_bytes_of_float16(tmp_path):
    x = features_like_dino(2, REAL)
    sizes = {}
    for codec in ("float16", "int8"):
        store = make_store(tmp_path / f"{codec}.zarr", codec, x, shapes=REAL, chunk=2)
        info = store.info()
        sizes[codec] = info["sizes"]
        assert info["feature_codec"] == codec
    assert sizes["float16"]["feature_bytes_per_video"] == 6_187_008  # the 6.19 MB of the issue
    assert sizes["int8"]["feature_bytes_per_video"] <= 3_200_000
    assert sizes["int8"]["disk_bytes_per_ok_video"] <= 3_200_000 + 20_000  # what the files take, metadata included
    assert sizes["int8"]["disk_bytes"] < 0.52 * sizes["float16"]["disk_bytes"]


def test_an_int8_store_reads_back_what_was_written(tmp_path):
    x = features_like_dino(10, SMALL)
    store = make_store(tmp_path / "s.zarr", "int8", x)
    again = FeatureStore.open(store.path)
    assert again.feature_codec == "int8" and again.check_compatible(_anything()) == []
    assert codec_error(x[3:4], again.read_features(3)[None])["relative_l2_max"] <= 0.01
    kept = again.read_chunk(1)  # what a partial redo keeps: rewriting it changes (almost) nothing
    FeatureStore.open(store.path, mode="r+").write_chunk(1, kept)
    assert codec_error(kept.features, FeatureStore.open(store.path).read_chunk(1).features)["relative_l2_max"] < 1e-3


def _anything():
    from storage.attrs import StoreExpectation

    return StoreExpectation()


def test_int8_batches_are_dequantised_on_the_device_to_the_stored_values(tmp_path):
    x = features_like_dino(12, SMALL)
    int8 = make_store(tmp_path / "i.zarr", "int8", x)
    half = make_store(tmp_path / "h.zarr", "float16", x)
    used = frame_indices(24, 16)
    config = LoaderConfig(batch_size=4, buffer_chunks=2, num_workers=0)
    stored = np.stack([int8.read_features(r) for r in range(12)]).astype(np.float32)
    batches = zip(make_train_loader(int8.path, np.arange(12), config, LoaderPosition(), False),
                  make_train_loader(half.path, np.arange(12), config, LoaderPosition(), False))
    for _, (a, b) in zip(range(3), batches):
        assert a["features"].dtype == torch.int8 and a["feature_scale"].shape == (4, SMALL.feature_dim)
        assert a["rows"].tolist() == b["rows"].tolist()
        on_device = features_on_device(a, "cpu")
        assert on_device.dtype == torch.float16
        np.testing.assert_allclose(on_device.float().numpy(), stored[a["rows"].numpy()][:, used], rtol=1e-3,
                                   atol=1e-3)
        assert codec_error(b["features"].numpy(), on_device.numpy())["relative_l2_max"] <= 0.01
        assert torch.equal(a["latents"], b["latents"])  # latents stay float16
    held = next(eval_batches(int8.path, np.array([2, 7]), config))
    assert set(held) >= {"feature_scale", "feature_offset"}
    reader = BatchReader(int8.path, 16)
    assert reader.mode == "file" and reader.feature_dtype == np.int8
