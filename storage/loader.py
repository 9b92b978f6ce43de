"""The training data loader over the feature store: held-out split, block shuffle, resumable positions.

What a training step gets is a whole batch, read straight into a batch buffer:

    features  (B, T, N, D)        float16   T = `frames` of the F stored frames, floor(linspace(0, F-1, T));
                                            int8 codes in a store of the compact codec, with
    feature_scale, feature_offset (B, D) float32   (only then: storage.feature_codec.features_on_device)
    latents   (B, T, 4, 32, 32)   float16
    rows      (B,)                int64     store rows, sorted inside the batch
    epoch, batch                  int       the batch's position, for the checkpoint

Casting to float32 is left to the device (the training loop moves with non_blocking=True and casts there).

Order of an epoch (block shuffle, as MosaicML Streaming and LitData do): permute the store chunks that hold
training rows, take `buffer_chunks` chunks at a time, permute their training rows inside that buffer,
concatenate, cut into batches of `batch_size` and drop the incomplete tail, so every epoch has the same
number of batches. The order is a pure function of (seed, epoch, the set of training rows, chunk size, batch
size, buffer size): a resumed run, any number of workers and any machine see the same batches. Rows inside a
batch are sorted: the loss is a mean over the batch, so their order does not matter, and sorted rows read
their chunk files front to back.

Reading: a batch touches at most a few store chunks. When the feature arrays are stored without compression
in a local folder (the default layout), a chunk file is the raw little-endian array in C order, so the frames
a batch needs are read with `os.preadv` straight from the chunk file into the batch buffer: one copy, no
decode, only the needed frames of the needed rows. A batch of 64 real-sized samples takes ~50 ms so, the time
of a memory copy, against ~430 ms through zarr, which decodes whole chunks. The same raw layout on an object
store (s3://...) is read with ranged requests, one per row and array (runs of frames close together share a
request), all of a batch's requests at once; the DataLoader workers prefetch batches, so a step does not wait
on the network. Any other layout (zstd, blosc, sharding) is read through zarr, each chunk a batch touches once,
and the needed frames are copied out. Tests check that every path reads the same values.

The compact int8 codec (storage.feature_codec) stores codes in the same raw layout; a batch then carries its
int8 codes and each row's per-channel `feature_scale` and `feature_offset`, and the training device dequantises.

Batch buffers are allocated once per reading process, as a ring of a few slots, in shared memory when the
process is a DataLoader worker, so that the DataLoader hands them to the training process without copying.
The price: a batch is valid until the next batch has been taken from the loader (the training loop moves it
to the device before taking the next one); clone it to keep it longer.
"""

from __future__ import annotations

import hashlib
import logging
import os
from dataclasses import dataclass
from typing import Any, Iterator, Mapping, Sequence

import numpy as np
import torch
import zarr
from pydantic import BaseModel, Field
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from storage.store import OK, FeatureStore, StoreError
from storage.zarr_files import chunk_file, is_raw, raw_chunk_folder, read_byte_ranges

log = logging.getLogger(__name__)


class LoaderError(ValueError):
    """Training rows, a position or a loader setting that cannot work; the message says what to change."""


class LoaderConfig(BaseModel):
    """How training batches are drawn from the feature store."""

    frames: int = Field(
        16, ge=1, le=1024,
        description="frames per sample, taken from the stored frames at floor(linspace(0, F-1, frames))",
    )
    batch_size: int = Field(
        64, ge=1, le=65536, description="samples per batch (the incomplete tail of an epoch is dropped)"
    )
    buffer_chunks: int = Field(
        8, ge=1, le=65536, description="block-shuffle buffer, in store chunks: rows are shuffled within this many"
    )
    eval_fraction: float = Field(
        0.05, ge=0.0, lt=1.0, description="share of ok rows held out for evaluation, chosen by a hash of the video id"
    )
    num_workers: int = Field(
        2, ge=0, le=64, description="DataLoader worker processes (0 reads in the training process)"
    )
    seed: int = Field(0, ge=0, description="seed of the shuffle; the order of an epoch depends on (seed, epoch) only")
    prefetch_factor: int = Field(2, ge=1, le=16, description="batches each worker prepares ahead")


# ---- frames and rows ----------------------------------------------------------------------------------


def frame_indices(stored: int, frames: int) -> np.ndarray:
    """Which of the `stored` frames a sample uses: floor(linspace(0, stored-1, frames)), e.g. 16 of 24."""
    if not 1 <= frames <= stored:
        raise LoaderError(f"cannot take {frames} frames from {stored} stored frames: set loader.frames <= {stored}")
    return np.floor(np.linspace(0, stored - 1, frames)).astype(np.int64)


def _unit_hash(video_id: str) -> float:
    """A stable number in [0, 1) from a video id (blake2b; the same on every machine and Python run)."""
    digest = hashlib.blake2b(str(video_id).encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2.0**64


def split_rows(video_ids: Sequence[str], status: np.ndarray, eval_fraction: float) -> tuple[np.ndarray, np.ndarray]:
    """(train_rows, eval_rows), both sorted int64, of the rows whose status is ok.

    A row is held out when the hash of its video id falls below `eval_fraction`, so the split depends on the
    id alone: rebuilding or extending a store never moves a held-out video into training. One exception, for
    tiny stores: when the rule holds out nothing, `eval_fraction` > 0 and there are at least 2 ok rows, the ok
    row with the smallest hash is held out (so there is something to evaluate); that row may return to
    training once the store grows enough for the rule to pick rows of its own.
    """
    status = np.asarray(status)
    if len(video_ids) != len(status):
        raise LoaderError(f"{len(video_ids)} video ids but {len(status)} status values: read both from one store")
    ok = np.flatnonzero(status == OK).astype(np.int64)
    hashes = np.array([_unit_hash(video_ids[r]) for r in ok], dtype=np.float64)
    held = hashes < eval_fraction
    if eval_fraction > 0 and not held.any() and ok.size >= 2:
        held[np.argmin(hashes)] = True
    return ok[~held], ok[held]


# ---- the order of an epoch ----------------------------------------------------------------------------


def batches_per_epoch(num_train_rows: int, batch_size: int) -> int:
    """Whole batches in an epoch (the incomplete tail is dropped)."""
    return num_train_rows // batch_size


def epoch_order(train_rows: np.ndarray, chunk_videos: int, config: LoaderConfig, epoch: int) -> np.ndarray:
    """(batches_per_epoch, batch_size) rows of one epoch, block-shuffled; rows sorted inside each batch."""
    rows = np.unique(np.asarray(train_rows, dtype=np.int64))  # the set: order and duplicates do not matter
    rng = np.random.default_rng([config.seed, epoch])
    chunk_of = rows // chunk_videos
    chunk_start = np.flatnonzero(np.r_[True, chunk_of[1:] != chunk_of[:-1]])
    by_chunk = np.split(rows, chunk_start[1:])  # the training rows of each chunk, in chunk order
    chunk_order = rng.permutation(len(by_chunk))
    shuffled = []
    for first in range(0, len(chunk_order), config.buffer_chunks):
        buffer = np.concatenate([by_chunk[c] for c in chunk_order[first:first + config.buffer_chunks]])
        shuffled.append(rng.permutation(buffer))
    order = np.concatenate(shuffled) if shuffled else rows
    n = batches_per_epoch(rows.size, config.batch_size)
    return np.sort(order[: n * config.batch_size].reshape(n, config.batch_size), axis=1)


@dataclass(frozen=True)
class LoaderPosition:
    """Where the next batch comes from: batch `batch` of epoch `epoch`. Saved in checkpoints as plain ints."""

    epoch: int = 0
    batch: int = 0

    def __post_init__(self) -> None:
        if self.epoch < 0 or self.batch < 0:
            raise LoaderError(f"loader position must be non-negative, got epoch {self.epoch} batch {self.batch}")

    def to_dict(self) -> dict[str, int]:
        return {"epoch": int(self.epoch), "batch": int(self.batch)}

    @classmethod
    def from_dict(cls, state: Mapping[str, Any]) -> "LoaderPosition":
        try:
            return cls(epoch=int(state["epoch"]), batch=int(state["batch"]))
        except (KeyError, TypeError, ValueError) as err:
            raise LoaderError(f"checkpoint loader position {state!r} is not {{'epoch': int, 'batch': int}}") from err

    def advanced(self, batch: Mapping[str, Any]) -> "LoaderPosition":
        """The position after a batch just trained on (its "epoch" and "batch"). It may point one past an
        epoch's last batch; the loader starts such a position at the next epoch."""
        return LoaderPosition(epoch=int(batch["epoch"]), batch=int(batch["batch"]) + 1)

    def global_index(self, batches_per_epoch: int) -> int:
        """g = epoch * batches_per_epoch + batch: the number of batches before this position."""
        if batches_per_epoch < 1:
            raise LoaderError("an epoch has no whole batch: lower loader.batch_size or add training rows")
        return self.epoch * batches_per_epoch + self.batch

    @classmethod
    def from_global(cls, index: int, batches_per_epoch: int) -> "LoaderPosition":
        epoch, batch = divmod(int(index), batches_per_epoch)
        return cls(epoch=epoch, batch=batch)


# ---- reading frames of rows into a batch buffer ---------------------------------------------------------


def frame_runs(indices: np.ndarray) -> list[tuple[int, int, int]]:
    """(first stored frame, first output frame, length) of each run of consecutive stored frames."""
    runs: list[tuple[int, int, int]] = []
    for out, stored in enumerate(indices.tolist()):
        if runs and runs[-1][0] + runs[-1][2] == stored:
            first, out_first, length = runs[-1]
            runs[-1] = (first, out_first, length + 1)
        else:
            runs.append((stored, out, 1))
    return runs


def _rows_by_chunk(rows: np.ndarray, chunk_videos: int) -> Iterator[tuple[int, np.ndarray]]:
    """(chunk, positions in `rows` of that chunk's rows, in row order) for every chunk the rows touch."""
    positions = np.argsort(rows, kind="stable")
    chunks = rows[positions] // chunk_videos
    starts = np.flatnonzero(np.r_[True, chunks[1:] != chunks[:-1]])
    for start, stop in zip(starts, np.r_[starts[1:], len(rows)]):
        yield int(chunks[start]), positions[start:stop]


MERGE_GAP_BYTES = 256 * 1024  # ranged reads: runs of frames this close are fetched in one request


def merged_spans(runs: list[tuple[int, int, int]], frame_bytes: int,
                 max_gap_bytes: int = MERGE_GAP_BYTES) -> list[tuple[int, int, list[tuple[int, int, int]]]]:
    """(first stored frame, stop, runs inside) of the byte ranges a ranged reader requests for one row: runs
    (sorted, from `frame_runs`) separated by at most `max_gap_bytes` share a request, so an object store sees a
    few large GETs rather than many small ones (16 of 24 frames: one request per row and array)."""
    spans: list[tuple[int, int, list[tuple[int, int, int]]]] = []
    for run in runs:
        first, _, length = run
        if spans and (first - spans[-1][1]) * frame_bytes <= max_gap_bytes:
            start, _, inside = spans[-1]
            spans[-1] = (start, first + length, inside + [run])
        else:
            spans.append((first, first + length, [run]))
    return spans


class _ArrayReader:
    """Copies the chosen frames of rows of one (V, F, ...) array into an output buffer (B, T, ...).

    Three ways, chosen once: `file` (raw chunk files of a local store, os.preadv), `ranges` (raw chunk objects
    of a remote store, concurrent ranged requests for the whole batch), `zarr` (anything else: whole chunks
    decoded by zarr)."""

    def __init__(self, array: zarr.Array, indices: np.ndarray, direct: bool | None):
        self.array = array
        self.indices = indices
        self.runs = frame_runs(indices)
        self.chunk_videos = array.chunks[0]
        self.stored_frames = array.shape[1]
        self.frame_bytes = int(np.prod(array.shape[2:])) * array.dtype.itemsize
        self.spans = merged_spans(self.runs, self.frame_bytes)
        raw = is_raw(array) and direct is not False
        self.folder = raw_chunk_folder(array) if raw else None
        self.mode = "zarr" if not raw else ("file" if self.folder is not None else "ranges")
        if direct and not raw:
            raise LoaderError(f"array {array.path} is compressed or sharded: its chunks cannot be read directly")

    def read(self, rows: np.ndarray, out: np.ndarray) -> None:
        """out[i] = array[rows[i], indices] for every i."""
        if out.dtype != self.array.dtype:
            raise LoaderError(f"batch buffer is {out.dtype}, array {self.array.path} is {self.array.dtype}")
        if self.mode == "ranges":
            self._read_ranges(rows, out)
            return
        for chunk, positions in _rows_by_chunk(rows, self.chunk_videos):
            if self.mode == "file":
                self._read_file(chunk, rows, positions, out)
            else:
                self._read_zarr(chunk, rows, positions, out)

    def _damaged(self, where: str, chunk: int) -> StoreError:
        return StoreError(f"chunk {where} is shorter than its array's chunk shape: the store is damaged; rewrite "
                          f"chunk {chunk} (fvlm precompute redoes rows not ok)")

    def _read_file(self, chunk: int, rows: np.ndarray, positions: np.ndarray, out: np.ndarray) -> None:
        path = chunk_file(self.array, chunk)
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            # zarr does not write a chunk that holds only the fill value
            out[positions] = self.array.fill_value
            return
        out_bytes = out.reshape(out.shape[0], out.shape[1], -1).view(np.uint8)  # (B, T, frame_bytes)
        try:
            for position in positions.tolist():
                in_chunk = int(rows[position]) - chunk * self.chunk_videos
                for first, out_first, length in self.runs:
                    target = out_bytes[position, out_first:out_first + length]  # contiguous frames
                    offset = (in_chunk * self.stored_frames + first) * self.frame_bytes
                    if os.preadv(fd, [target], offset) != target.nbytes:
                        raise self._damaged(f"file {path}", chunk)
        finally:
            os.close(fd)

    def _read_ranges(self, rows: np.ndarray, out: np.ndarray) -> None:
        """Every span of every row of the batch in one concurrent round of ranged requests."""
        out_bytes = out.reshape(out.shape[0], out.shape[1], -1).view(np.uint8)
        requests, targets = [], []
        for position, row in enumerate(rows.tolist()):
            chunk, in_chunk = divmod(int(row), self.chunk_videos)
            base = in_chunk * self.stored_frames
            for first, stop, inside in self.spans:
                requests.append((chunk, (base + first) * self.frame_bytes, (base + stop) * self.frame_bytes))
                targets.append((position, first, stop, inside))
        for data, (position, first, stop, inside) in zip(read_byte_ranges(self.array, requests), targets):
            if data is None:  # a chunk never written holds the fill value
                out[position] = self.array.fill_value
                continue
            if len(data) != (stop - first) * self.frame_bytes:
                raise self._damaged(f"object of row {int(rows[position])} in {self.array.path}",
                                    int(rows[position]) // self.chunk_videos)
            frames = np.frombuffer(data, dtype=np.uint8).reshape(stop - first, self.frame_bytes)
            for stored, out_first, length in inside:
                out_bytes[position, out_first:out_first + length] = frames[stored - first:stored - first + length]

    def _read_zarr(self, chunk: int, rows: np.ndarray, positions: np.ndarray, out: np.ndarray) -> None:
        first = int(rows[positions[0]])
        block = np.asarray(self.array[first:int(rows[positions[-1]]) + 1])  # one chunk, decoded once
        for position in positions.tolist():
            np.take(block[int(rows[position]) - first], self.indices, axis=0, out=out[position])


class BatchReader:
    """Reads the frames a sample uses of any rows of a store. Open it in the process that reads.

    `read` fills the caller's feature and latent buffers (features in the store's dtype: float16, or int8 codes
    of the compact codec) and returns what else a batch carries: for an int8 store, the rows' `feature_scale`
    and `feature_offset` (B, D) float32, which the training device applies (storage.feature_codec)."""

    def __init__(self, store_path: str | os.PathLike, frames: int, direct: bool | None = None):
        """direct: None reads raw chunks directly where the layout allows, True insists, False always uses zarr."""
        store = FeatureStore.open(store_path)
        self.indices = frame_indices(store.shapes.frames, frames)
        self.frames = frames
        self.feature_shape = (frames, store.shapes.tokens, store.shapes.feature_dim)  # (T, N, D)
        self.latent_shape = (frames, *store.shapes.latent_shape)  # (T, C, S, S)
        self.features = _ArrayReader(store.group["dino_features"], self.indices, direct)
        self.latents = _ArrayReader(store.group["latents"], self.indices, direct)
        self.feature_dtype = store.group["dino_features"].dtype
        self.quantised = store.feature_codec == "int8"
        self.scales = (store.group["dino_scale"], store.group["dino_offset"]) if self.quantised else None

    @property
    def direct(self) -> bool:
        return self.features.folder is not None and self.latents.folder is not None

    @property
    def mode(self) -> str:
        """'file', 'ranges' or 'zarr': how the feature chunks are read."""
        return self.features.mode

    def read(self, rows: np.ndarray, features: np.ndarray, latents: np.ndarray) -> dict[str, torch.Tensor]:
        """features[i], latents[i] = the chosen frames of row rows[i]; returns the batch's other tensors."""
        self.features.read(rows, features)
        self.latents.read(rows, latents)
        if self.scales is None:
            return {}
        scale, offset = (np.asarray(array.get_orthogonal_selection((rows, slice(None))), dtype=np.float32)
                         for array in self.scales)
        return {"feature_scale": torch.from_numpy(scale), "feature_offset": torch.from_numpy(offset)}


class BatchRing:
    """A few batch buffers allocated once, up front, and reused in turn (in shared memory inside DataLoader
    workers, so that the DataLoader passes them on without a copy). Allocating a 256 MiB shared buffer costs
    ~0.2 s, so it is done before the first batch rather than in the middle of a run."""

    def __init__(self, slots: int, batch_size: int, feature_shape: tuple[int, ...], latent_shape: tuple[int, ...],
                 shared: bool, feature_dtype: torch.dtype = torch.float16):
        self.slots = slots
        self.feature_dtype = feature_dtype
        self.feature_shape = (batch_size, *feature_shape)  # (B, T, N, D)
        self.latent_shape = (batch_size, *latent_shape)  # (B, T, C, S, S)
        self.shared = shared
        self.buffers = [self._allocate() for _ in range(slots)]
        self.turn = 0

    def next(self) -> tuple[torch.Tensor, torch.Tensor]:
        buffers = self.buffers[self.turn % self.slots]
        self.turn += 1
        return buffers

    def _allocate(self) -> tuple[torch.Tensor, torch.Tensor]:
        try:
            features = torch.empty(self.feature_shape, dtype=self.feature_dtype)
            latents = torch.empty(self.latent_shape, dtype=torch.float16)
            if self.shared:
                features, latents = features.share_memory_(), latents.share_memory_()
        except RuntimeError as err:
            item = self.feature_dtype.itemsize
            mib = (item * np.prod(self.feature_shape) + 2 * np.prod(self.latent_shape)) / 2**20
            raise LoaderError(
                f"cannot allocate a batch buffer of {mib:.0f} MiB{' in shared memory' if self.shared else ''} "
                f"({self.slots} per reading process): {err}. Give the machine or container more /dev/shm "
                "(docker: --shm-size), or lower loader.batch_size, loader.prefetch_factor or loader.num_workers"
            ) from err
        return features, latents


# ---- the training stream --------------------------------------------------------------------------------


class TrainBatches(IterableDataset):
    """Endless block-shuffled batches of the training rows, from a start position, across epochs.

    With W DataLoader workers, worker w makes global batches start + w, start + w + W, ..., which the
    DataLoader's round-robin delivers as start, start + 1, ...: the same stream for any W, 0 included.
    Holds only plain data, so that workers can be started by fork or spawn; each worker opens the store itself.
    Its ring of batch buffers is sized for a DataLoader with config.prefetch_factor: build it with
    make_train_loader.

    `part` = (p, P): of every global batch, only the p-th of P equal contiguous slices of its (sorted) rows, for
    a training process that is one of P (tasks/distributed.py). The global order, and with it "epoch" and
    "batch" of each batch, do not depend on P.
    """

    def __init__(self, store_path: str | os.PathLike, train_rows: np.ndarray, config: LoaderConfig,
                 position: LoaderPosition, chunk_videos: int, part: tuple[int, int] = (0, 1)):
        self.store_path = str(store_path)
        index, parts = part
        if not 0 <= index < parts or config.batch_size % parts:
            raise LoaderError(f"cannot cut batches of {config.batch_size} into {parts} equal parts (part {index}): "
                              f"set loader.batch_size to a multiple of the number of training processes")
        self.part = (index, parts)
        self.train_rows = np.unique(np.asarray(train_rows, dtype=np.int64))
        self.config = config
        self.chunk_videos = chunk_videos
        self.batches_per_epoch = batches_per_epoch(self.train_rows.size, config.batch_size)
        if self.batches_per_epoch < 1:
            raise LoaderError(f"{self.train_rows.size} training rows make no batch of {config.batch_size}: "
                              "lower loader.batch_size or precompute more videos")
        if position.batch >= self.batches_per_epoch:
            # saved right after an epoch's last batch, or with more training rows than now: next epoch
            position = LoaderPosition(epoch=position.epoch + 1, batch=0)
        self.start = position.global_index(self.batches_per_epoch)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        # The DataLoader asks a worker for its next batch while the training loop may still hold two earlier
        # ones (the one it trains on and the one being handed over) and up to prefetch_factor wait in the
        # queue: prefetch_factor + 2 slots never overwrite a batch in use. Without workers, the loop holds one.
        slots = self.config.prefetch_factor + 2 if info is not None else 2
        reader = BatchReader(self.store_path, self.config.frames)
        size = self.config.batch_size // self.part[1]
        first = self.part[0] * size
        ring = BatchRing(slots, size, reader.feature_shape, reader.latent_shape,
                         shared=info is not None, feature_dtype=torch_dtype(reader.feature_dtype))
        order_epoch, order = -1, np.empty((0, 0), dtype=np.int64)
        index = self.start + worker
        while True:
            epoch, batch = divmod(index, self.batches_per_epoch)
            if epoch != order_epoch:
                order_epoch, order = epoch, epoch_order(self.train_rows, self.chunk_videos, self.config, epoch)
            rows = order[batch, first:first + size]
            features, latents = ring.next()
            extra = reader.read(rows, features.numpy(), latents.numpy())
            yield {"features": features, "latents": latents, "rows": torch.from_numpy(rows.copy()),
                   "epoch": epoch, "batch": batch, **extra}
            index += workers


def torch_dtype(dtype: np.dtype) -> torch.dtype:
    return torch.from_numpy(np.empty(0, dtype=dtype)).dtype


def _describe_reads(store: FeatureStore) -> str:
    features = store.group["dino_features"]
    how = ("direct chunk-file reads" if raw_chunk_folder(features) is not None
           else "concurrent ranged reads" if is_raw(features) else "zarr reads")
    return f"{how}, {store.feature_codec} features"


def _check_rows(store: FeatureStore, rows: np.ndarray, what: str) -> None:
    rows = np.asarray(rows, dtype=np.int64)
    if rows.size and (rows.min() < 0 or rows.max() >= store.num_videos):
        raise LoaderError(f"{what} rows must lie in [0, {store.num_videos}) of store {store.path}")
    status = store.read_status()
    bad = rows[status[rows] != OK] if rows.size else rows
    if bad.size:
        raise LoaderError(f"{what} row {int(bad[0])} of store {store.path} is not ok (status "
                          f"{int(status[bad[0]])}): take the rows from split_rows on this store")


def make_train_loader(store_path: str | os.PathLike, train_rows: np.ndarray, config: LoaderConfig,
                      position: LoaderPosition, pin_memory: bool, part: tuple[int, int] = (0, 1)) -> DataLoader:
    """A DataLoader of endless training batches from `position` (see TrainBatches; `part`: this process's slice
    of each batch); batch_size=None because the dataset yields whole batches. A batch is valid until the next one
    is taken (ring buffers)."""
    store = FeatureStore.open(store_path)
    frame_indices(store.shapes.frames, config.frames)  # fails here, not in a worker
    _check_rows(store, train_rows, "training")
    dataset = TrainBatches(store_path, train_rows, config, position, store.chunk_videos, part)
    log.info("train loader: %d rows, %d batches of %d per epoch, from epoch %d batch %d, %d workers, %s",
             dataset.train_rows.size, dataset.batches_per_epoch, config.batch_size, position.epoch,
             position.batch, config.num_workers,
             _describe_reads(store))
    extra: dict[str, Any] = {}
    if config.num_workers > 0:
        extra["prefetch_factor"] = config.prefetch_factor
    return DataLoader(dataset, batch_size=None, num_workers=config.num_workers, pin_memory=pin_memory, **extra)


def eval_batches(store_path: str | os.PathLike, eval_rows: np.ndarray, config: LoaderConfig,
                 max_batches: int | None = None) -> Iterator[dict[str, Any]]:
    """The held-out rows in row order, batch_size at a time (the last batch may be short), in this process.

    Yields {"features", "latents", "rows", "batch"}; a batch is valid until the next one is taken."""
    rows = np.unique(np.asarray(eval_rows, dtype=np.int64))
    if rows.size == 0:
        return
    store = FeatureStore.open(store_path)
    _check_rows(store, rows, "held-out")
    reader = BatchReader(store_path, config.frames)
    size = config.batch_size
    ring = BatchRing(2, min(size, rows.size), reader.feature_shape, reader.latent_shape, shared=False,
                     feature_dtype=torch_dtype(reader.feature_dtype))
    count = -(-rows.size // size)
    if max_batches is not None:
        count = min(count, max_batches)
    for batch in range(count):
        chunk = rows[batch * size:(batch + 1) * size]
        features, latents = (buffer[: chunk.size] for buffer in ring.next())
        extra = reader.read(chunk, features.numpy(), latents.numpy())
        yield {"features": features, "latents": latents, "rows": torch.from_numpy(chunk.copy()), "batch": batch,
               **extra}
