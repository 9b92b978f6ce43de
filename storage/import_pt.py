"""Import a seed-format folder of `.pt` files (one per video) into a feature store.

Each file holds {"dino_features": (T, N, D), "latents": (T, 4, 32, 32), "caption": str}, often in bfloat16.
Files are loaded with `torch.load(weights_only=True)`, so a file can hold tensors and plain data, never code.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from storage.attrs import SEED_WINDOW_FRAMES, VAE_SCALING_FACTOR, EncoderRecord, SamplingRecord, StoreAttrs
from storage.checkpoints import describe_load_error
from storage.store import FAILED, OK, ChunkRows, FeatureShapes, FeatureStore, StoreConfig, StoreError

log = logging.getLogger(__name__)


class SeedFileError(ValueError):
    """A .pt file that is not a usable seed sample; recorded as a failed row."""


def load_seed_file(path: Path) -> tuple[np.ndarray, np.ndarray, str]:
    """(T, N, D) features and (T, C, H, W) latents as float16, and the caption, of one seed file."""
    try:
        sample = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - the unpickler raises anything on a bad file; the import goes on
        reason = describe_load_error(err)
        log.warning("cannot load %s: %s", path, reason)
        raise SeedFileError(f"cannot load {path.name}: {reason}") from err
    if not isinstance(sample, dict):
        raise SeedFileError(f"{path.name} holds a {type(sample).__name__}, not a dict")
    missing = [key for key in ("dino_features", "latents") if not torch.is_tensor(sample.get(key))]
    if missing:
        raise SeedFileError(f"{path.name} has no tensor {missing[0]!r}")
    features, latents = sample["dino_features"], sample["latents"]
    if features.ndim != 3 or latents.ndim != 4 or features.shape[0] != latents.shape[0]:
        raise SeedFileError(f"{path.name}: dino_features {tuple(features.shape)} and latents "
                            f"{tuple(latents.shape)} are not (T, N, D) and (T, C, H, W) with the same T")
    caption = sample.get("caption", "")
    features16, latents16 = features.to(torch.float16), latents.to(torch.float16)
    for name, values in (("dino_features", features16), ("latents", latents16)):
        if not torch.isfinite(values).all():  # NaN/inf (or beyond float16's range) would poison training batches
            raise SeedFileError(f"{path.name}: {name} has NaN or inf values (in float16)")
    return features16.numpy(), latents16.numpy(), caption if isinstance(caption, str) else str(caption)


def _shapes_from(files: list[Path]) -> FeatureShapes:
    for path in files:
        try:
            features, latents, _ = load_seed_file(path)
        except SeedFileError:
            continue
        return FeatureShapes(frames=features.shape[0], tokens=features.shape[1], feature_dim=features.shape[2],
                             latent_shape=tuple(latents.shape[1:]))
    raise StoreError(f"none of the {len(files)} .pt files can be read: nothing to import")


def seed_store_attrs(folder: Path, files: list[Path], shapes: FeatureShapes, dino_id: str,
                     vae_id: str) -> StoreAttrs:
    """What a store imported from the seed's files records: their encoders and, assumed, the seed's window."""
    return StoreAttrs(
        frame_size=None, resize="unknown (imported)", encoder_preset="full",
        # The seed's precompute_dino.py keeps 24 of the first 72 frames; its files do not say so themselves.
        sampling=SamplingRecord(mode="window", window_frames=SEED_WINDOW_FRAMES, frames=shapes.frames,
                                rule="imported .pt files, assumed made by the seed's precompute_dino.py (24 of the "
                                     "first 72 frames); seconds between frames unknown"),
        dino=EncoderRecord(id=dino_id, tokens=shapes.tokens, dim=shapes.feature_dim),
        vae=EncoderRecord(id=vae_id, scaling_factor=VAE_SCALING_FACTOR, latent_shape=list(shapes.latent_shape)),
        listing={"manifest": str(folder), "source": "import-pt", "rows": len(files), "kept": len(files),
                 "dropped": {}},
    )


def import_pt_folder(folder: str | os.PathLike, store_path: str | os.PathLike, config: StoreConfig | None = None,
                     *, dino_id: str, vae_id: str) -> dict[str, Any]:
    """Convert every `*.pt` of a folder into a store; a rerun only does chunks that are not complete.

    dino_id, vae_id: the encoders the files came from (`fvlm store import-pt` defaults to EncoderConfig's, the
    seed's)."""
    folder, store_path = Path(folder), str(store_path)  # the store may be a URL (s3://...): kept as text
    files = sorted(folder.glob("*.pt"))
    if not files:
        raise StoreError(f"no .pt files in {folder} (expected the seed's one-file-per-video folder)")
    ids = [f.stem for f in files]
    if FeatureStore.exists(store_path):
        store = FeatureStore.open(store_path, mode="r+")
        if [str(v) for v in store.read_column("video_id")] != ids:
            raise StoreError(f"store {store_path} holds other videos than {folder}; import into a new store")
    else:
        shapes = _shapes_from(files)
        store = FeatureStore.create(store_path, ids, [""] * len(ids), [str(f.resolve()) for f in files],
                                    [float("nan")] * len(ids), seed_store_attrs(folder, files, shapes, dino_id, vae_id),
                                    config, shapes, atomic=True)
    for chunk in store.pending_chunks():
        store.write_chunk(chunk, _read_chunk(store, files, chunk))
    counts = store.counts()
    log.info("imported %s into %s: %s", folder, store_path, counts)
    return counts


def _read_chunk(store: FeatureStore, files: list[Path], chunk: int) -> ChunkRows:
    span = store.chunk_rows(chunk)
    shapes = store.shapes
    n = len(span)
    rows = ChunkRows(
        features=np.zeros((n, shapes.frames, shapes.tokens, shapes.feature_dim), np.float16),
        latents=np.zeros((n, shapes.frames, *shapes.latent_shape), np.float16),
        status=np.full(n, FAILED, np.uint8), error=[""] * n, caption=[""] * n,
    )
    expected = ((shapes.frames, shapes.tokens, shapes.feature_dim), (shapes.frames, *shapes.latent_shape))
    for j, row in enumerate(span):
        try:
            features, latents, caption = load_seed_file(files[row])
            if (features.shape, latents.shape) != expected:
                raise SeedFileError(f"{files[row].name}: shapes {features.shape} / {latents.shape}, "
                                    f"the store holds {expected[0]} / {expected[1]}")
        except SeedFileError as err:
            rows.error[j] = str(err)
            continue
        rows.features[j], rows.latents[j], rows.caption[j] = features, latents, caption
        rows.status[j] = OK
    return rows
