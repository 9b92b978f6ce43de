"""Training-loader throughput: storage/loader.py against a seed-style loader and the memory-copy limit, from local
disk and from an S3 API server, with float16 and int8 features; and the bytes per video of each store layout.

One run on the same data: V videos with the real shapes (random values) written as
  - a feature store (chunks of K videos, no compression), read by `make_train_loader` (ours), and the same
    values in a store of the int8 codec (ours int8; storage/feature_codec.py);
  - seed-format .pt files ({"dino_features": (24, 325, 384), "latents": (24, 4, 32, 32)} in bfloat16, "caption"),
    read the seed's way (baseline): a torch Dataset with one torch.load per sample, bf16 -> float32 on the CPU,
    16 of 24 frames by linspace, default collate, num_workers=0;
  - flat numpy memmaps (limit): the 16 needed frames of each sample of a batch copied, run of consecutive frames
    by run, into a preallocated batch buffer in this one process. That is the memory-copy limit of a loader
    that serves each batch from the page cache (ours may beat it with several workers).
The page cache is warmed for all of them first (every file read once), and ours (both stores) and the limit are
measured over the same number of batches after the same number of warm-up batches, in interleaved rounds with
the baseline (the best round of each counts: the machine may be shared; CPU ms per batch, this process plus the
loader's workers, is printed too, as it hardly depends on other work). The consumer only takes batches (no
device copy), so this measures what the loader can deliver. The seed-style baseline is some 70 times slower
than ours and steady per sample, so it is measured over fewer batches (--baseline-batches) to keep the run short.

Object store: the first --s3-videos videos of the same data (default 64: each batch then reads 8 whole chunks, as
a batch of the local store does with 8 buffer chunks) written as a float16 and an int8 store to a bucket of
moto's S3 server on loopback (tests/s3_server.py), and read by the same loader with concurrent ranged requests.
moto answers a ranged GET by reading the whole object and slicing it (moto/s3/responses.py,
`_handle_range_header`), so there each request costs a whole chunk object (K videos), unlike on S3: the figures
are a floor, set by the local server; the rate of one batch's requests alone (one process, no loader) is printed
beside them.

Bytes per video of each layout (float16 none/zstd/blosc, int8 none/zstd): raw layouts hold the same bytes for
any values, but random values do not compress like features, so the compressed sizes are measured on two sets,
labelled: one chunk of this run's random values, and the features of the real sample videos that
benchmarks/feature_codec.py precomputes (demo encoders unless it was run with --dino; made here when missing).

The last line printed is JSON:
{"ours": samples/s, "baseline": .., "limit": .., "ratio": ours/baseline, "of_limit": ours/limit,
 "ours_int8": .., "s3": {"float16": .., "int8": ..}, "bytes_per_video": {...}, ...}.

    python benchmarks/loader.py --videos 192 --workers 2 --batches 12
    python benchmarks/loader.py --s3-batches 12 --baseline-batches 12     # longer S3 and baseline measures
"""

import argparse
import itertools
import json
import logging
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from benchmarks import feature_codec  # noqa: E402
from storage.loader import (  # noqa: E402
    LoaderConfig, LoaderPosition, frame_runs, epoch_order, frame_indices, make_train_loader, merged_spans,
)
from storage.store import OK, ChunkRows, FeatureStore, StoreConfig  # noqa: E402

FRAMES, TOKENS, DIM, LATENT = 24, 325, 384, (4, 32, 32)


# ---- the data, three ways ------------------------------------------------------------------------------


def write_data(root: Path, videos: int, chunk: int, seed: int) -> None:
    """The same random videos as a store, as seed .pt files and as flat memmaps."""
    store = FeatureStore.create(
        root / "store.zarr", [f"video-{i}" for i in range(videos)], ["caption"] * videos, ["bench"] * videos,
        [30.0] * videos, attrs={"benchmark": "loader"}, config=StoreConfig(chunk_videos=chunk, compression="none"),
    )
    (root / "pt").mkdir()
    flat_features = np.lib.format.open_memmap(root / "features.npy", mode="w+", dtype=np.float16,
                                              shape=(videos, FRAMES, TOKENS, DIM))
    flat_latents = np.lib.format.open_memmap(root / "latents.npy", mode="w+", dtype=np.float16,
                                             shape=(videos, FRAMES, *LATENT))
    generator = torch.Generator().manual_seed(seed)
    for c in range(store.num_chunks):
        rows = store.chunk_rows(c)
        n = len(rows)
        # bfloat16 first, as the seed stores it; float16 holds these values exactly
        features = torch.randn((n, FRAMES, TOKENS, DIM), generator=generator).to(torch.bfloat16)
        latents = torch.randn((n, FRAMES, *LATENT), generator=generator).to(torch.bfloat16)
        features16, latents16 = features.to(torch.float16).numpy(), latents.to(torch.float16).numpy()
        store.write_chunk(c, ChunkRows(features16, latents16, np.full(n, OK, np.uint8), [""] * n))
        flat_features[rows.start:rows.stop] = features16
        flat_latents[rows.start:rows.stop] = latents16
        for i, row in enumerate(rows):
            sample = {"dino_features": features[i].clone(), "latents": latents[i].clone(), "caption": f"video {row}"}
            torch.save(sample, root / "pt" / f"{row:06d}.pt")
    flat_features.flush()
    flat_latents.flush()


def write_int8_store(root: Path) -> None:
    """The store's values again, in a store of the int8 codec (same chunks, no compression)."""
    store = FeatureStore.open(root / "store.zarr")
    feature_codec.rewrite(store, np.arange(store.num_videos), root / "store-int8.zarr", "int8", "none",
                          store.chunk_videos)


def warm_page_cache(root: Path) -> int:
    """Read every file under root once; returns the bytes read."""
    block = bytearray(16 << 20)
    total = 0
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        with open(path, "rb", buffering=0) as f:
            while (n := f.readinto(block)) > 0:
                total += n
    return total


# ---- the three loaders --------------------------------------------------------------------------------


class SeedStyleDataset(Dataset):
    """The seed's loader: one torch.load per sample, bf16 -> float32 on the CPU, 16 of 24 frames by linspace."""

    def __init__(self, files: list[Path], frames: int):
        self.files = files
        self.indices = torch.linspace(0, FRAMES - 1, frames).long()

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        sample = torch.load(self.files[i], map_location="cpu", weights_only=True)
        return {"dino_features": sample["dino_features"][self.indices].float(),
                "latents": sample["latents"][self.indices].float()}


def endless(loader: DataLoader):
    while True:
        yield from loader


def process_cpu_s(pids: list[int]) -> float:
    """CPU seconds (user + system) used so far by other processes of this machine (Linux /proc)."""
    total = 0.0
    for pid in pids:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return total


def timed(batches, warmup: int, measured: int, batch_size: int, pids: list[int] = ()) -> tuple[float, float]:
    """(samples/s, CPU ms per batch) over `measured` batches taken after `warmup` batches. CPU time counts this
    process and `pids` (the loader's workers); it hardly depends on what else runs on the machine."""
    for _ in itertools.islice(batches, warmup):
        pass
    cpu = time.process_time() + process_cpu_s(pids)
    start = time.perf_counter()
    taken = sum(1 for _ in itertools.islice(batches, measured))
    seconds = time.perf_counter() - start
    cpu = time.process_time() + process_cpu_s(pids) - cpu
    assert taken == measured
    return measured * batch_size / seconds, cpu / measured * 1e3


def run_ours(store: Path | str, videos: int, config: LoaderConfig, warmup: int, measured: int) -> tuple[float, float]:
    loader = make_train_loader(store, np.arange(videos), config, LoaderPosition(), pin_memory=False)
    batches = iter(loader)
    try:
        pids = [worker.pid for worker in getattr(batches, "_workers", [])]  # DataLoader internals, for CPU time
        return timed(batches, warmup, measured, config.batch_size, pids)
    finally:
        del batches  # stops the workers


def run_baseline(root: Path, frames: int, batch_size: int, warmup: int, measured: int) -> tuple[float, float]:
    dataset = SeedStyleDataset(sorted((root / "pt").glob("*.pt")), frames)
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=True, num_workers=0, drop_last=True)
    return timed(endless(loader), warmup, measured, batch_size)


def limit_batches(root: Path, videos: int, chunk: int, config: LoaderConfig):
    """Batches of the same rows as ours, copied from flat memmaps into one preallocated buffer."""
    features = np.load(root / "features.npy", mmap_mode="r")  # (V, F, N, D)
    latents = np.load(root / "latents.npy", mmap_mode="r")  # (V, F, C, S, S)
    runs = frame_runs(frame_indices(FRAMES, config.frames))
    out_features = np.empty((config.batch_size, config.frames, TOKENS, DIM), np.float16)
    out_latents = np.empty((config.batch_size, config.frames, *LATENT), np.float16)
    for epoch in itertools.count():
        for rows in epoch_order(np.arange(videos), chunk, config, epoch):
            for b, row in enumerate(rows.tolist()):
                for first, out_first, length in runs:
                    out_features[b, out_first:out_first + length] = features[row, first:first + length]
                    out_latents[b, out_first:out_first + length] = latents[row, first:first + length]
            yield out_features, out_latents


def run_limit(root: Path, videos: int, chunk: int, config: LoaderConfig, warmup: int,
              measured: int) -> tuple[float, float]:
    batches = limit_batches(root, videos, chunk, config)
    for _ in itertools.islice(batches, -(-videos // config.batch_size)):  # one pass: map every page once
        pass
    return timed(batches, warmup, measured, config.batch_size)


# ---- from an object store --------------------------------------------------------------------------------


def copy_to_s3(root: Path, bucket: str, videos: int) -> dict[str, str]:
    """The first `videos` rows of the data as a float16 and an int8 store in `bucket` (s3://name), written as
    precompute writes a remote store (one PUT per chunk); their URLs."""
    source = FeatureStore.open(root / "store.zarr")
    rows = np.arange(min(videos, source.num_videos))
    return {codec: feature_codec.rewrite(source, rows, f"{bucket}/store-{codec}.zarr", codec, "none",
                                         source.chunk_videos).path for codec in ("float16", "int8")}


def row_spans(store: FeatureStore, name: str, frames: int) -> tuple[int, list[tuple[int, int]]]:
    """Bytes of one frame of array `name`, and the (first, stop) stored frames of each ranged request the loader
    makes for one row (runs of the sample's frames close together merged, storage.loader.merged_spans)."""
    array = store.group[name]
    frame_bytes = int(np.prod(array.shape[2:])) * array.dtype.itemsize
    runs = frame_runs(frame_indices(store.shapes.frames, frames))
    return frame_bytes, [(first, stop) for first, stop, _ in merged_spans(runs, frame_bytes)]


def requested_bytes(store: FeatureStore, frames: int) -> int:
    """Bytes the ranged requests of one sample fetch, features and latents."""
    total = 0
    for name in ("dino_features", "latents"):
        frame_bytes, spans = row_spans(store, name, frames)
        total += sum(stop - first for first, stop in spans) * frame_bytes
    return total


def fetch_rate(store: FeatureStore, frames: int, batch: int) -> float:
    """Samples/s of one batch's ranged requests alone: the loader's fetch (storage.zarr_files.read_byte_ranges)
    in this process, without workers or copies into a batch, i.e. about what the server allows one reader."""
    from storage.zarr_files import read_byte_ranges

    rows = np.arange(min(batch, store.num_videos))
    chunk, in_chunk = rows // store.chunk_videos, rows % store.chunk_videos
    started = time.perf_counter()
    for name in ("dino_features", "latents"):
        frame_bytes, spans = row_spans(store, name, frames)
        base = in_chunk * store.shapes.frames  # (B,) first stored frame of each row in its chunk
        requests = [(int(c), int(b + first) * frame_bytes, int(b + stop) * frame_bytes)
                    for c, b in zip(chunk, base) for first, stop in spans]
        read_byte_ranges(store.group[name], requests)
    return rows.size / (time.perf_counter() - started)


def measure_s3(root: Path, args: argparse.Namespace, config: LoaderConfig) -> dict[str, dict[str, float]]:
    """Our loader on both stores copied to moto's S3 server on loopback: samples/s, CPU ms per batch (loader
    processes only, not the server's) and the bytes a sample's ranged requests fetch."""
    from tests.s3_server import S3Server

    # The workers finish their batches in step, so a count of measured batches that is not a multiple of the
    # workers would count a batch that was ready when the clock started (few batches are measured here).
    workers = max(1, args.workers)
    measured = -(-args.s3_batches // workers) * workers
    # s3fs leaves its aiohttp sessions open when a worker exits; asyncio would log each one ("Unclosed client
    # session"), which says nothing about the loader.
    logging.getLogger("asyncio").setLevel(logging.CRITICAL)
    server = S3Server.start()
    try:
        os.environ.update(server.env())  # the standard AWS variables; the loader's workers inherit them
        started = time.perf_counter()
        videos = min(args.s3_videos, args.videos)
        urls = copy_to_s3(root, server.make_bucket("fvlm-loader-bench"), videos)
        print(f"wrote the first {videos} videos as a float16 and an int8 store to moto's S3 server "
              f"({server.endpoint}) in {time.perf_counter() - started:.1f} s")
        results = {}
        for codec, url in urls.items():
            rate, cpu = run_ours(url, videos, config, args.s3_warmup, measured)
            store = FeatureStore.open(url)
            results[codec] = {"samples_per_s": rate, "cpu_ms_per_batch": cpu, "videos": videos,
                              "bytes_per_sample": requested_bytes(store, args.frames),
                              "fetch_only_samples_per_s": fetch_rate(store, args.frames, args.batch)}
            print(f"s3 {codec}: {rate:.1f} samples/s; load average {os.getloadavg()[0]:.2f}")
        return results
    finally:
        server.stop()


# ---- bytes per video of each layout ----------------------------------------------------------------------


def layout_sizes(root: Path, args: argparse.Namespace) -> dict[str, Any]:
    """Bytes per video of each layout on two sets: one chunk of this run's random values, and the features of
    the real sample videos that benchmarks/feature_codec.py precomputes (reused from its workdir, else made)."""
    random = FeatureStore.open(root / "store.zarr")
    first_chunk = np.arange(min(args.chunk, random.num_videos))
    sizes: dict[str, Any] = {"random": feature_codec.measure_layouts(random, first_chunk, root / "layouts-random")}
    codec_args = feature_codec.parse_args(["--workdir", str(args.codec_workdir)])
    real = feature_codec.feature_store(args.codec_workdir, codec_args)
    rows = feature_codec.ok_rows(real)
    sizes["real"] = feature_codec.measure_layouts(real, rows, root / "layouts-real")
    sizes["real_set"] = (f"{rows.size} ok videos, shared and generated (benchmarks/feature_codec.py shows the "
                         f"shared ones alone), dino {real.attrs.get('dino', {}).get('id')}")
    return sizes


# ---- main ---------------------------------------------------------------------------------------------


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--videos", type=int, default=192)
    parser.add_argument("--chunk", type=int, default=8, help="videos per store chunk (K)")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--frames", type=int, default=16)
    parser.add_argument("--workers", type=int, default=2, help="DataLoader workers of our loader")
    parser.add_argument("--prefetch", type=int, default=2)
    parser.add_argument("--buffer-chunks", type=int, default=8)
    parser.add_argument("--batches", type=int, default=12, help="measured batches of ours (both codecs) and the limit")
    parser.add_argument("--baseline-batches", type=int, default=4,
                        help="measured batches of the seed-style baseline (after one warm-up batch)")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved rounds; the best round of each counts")
    parser.add_argument("--warmup", type=int, default=3, help="batches taken before measuring")
    parser.add_argument("--s3-batches", type=int, default=4,
                        help="measured batches from moto's S3 server, per codec, rounded up to a multiple of "
                             "--workers (0: skip the object store)")
    parser.add_argument("--s3-warmup", type=int, default=1, help="batches taken from S3 before measuring")
    parser.add_argument("--s3-videos", type=int, default=64,
                        help="the first this many videos go to S3 (at least --batch; --videos: all of them)")
    parser.add_argument("--codec-workdir", type=Path, default=feature_codec.default_workdir(),
                        help="benchmarks/feature_codec.py's workdir: the real sample videos' feature store")
    parser.add_argument("--workdir", type=Path, default=None, help="where to write the data (default: a temp dir)")
    parser.add_argument("--keep", action="store_true", help="keep the data (and reuse it when it is there)")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args()


def prepare_data(root: Path, args: argparse.Namespace) -> None:
    """Write the data four ways, unless --keep finds it already written; then warm the page cache."""
    if not (args.keep and (root / "done").exists()):
        shutil.rmtree(root, ignore_errors=True)
        root.mkdir(parents=True)
        start = time.perf_counter()
        write_data(root, args.videos, args.chunk, args.seed)
        write_int8_store(root)
        (root / "done").touch()
        print(f"wrote {args.videos} videos four ways to {root} in {time.perf_counter() - start:.1f} s")
    warmed = warm_page_cache(root)
    print(f"page cache warmed: {warmed / 2**30:.2f} GiB read; load average {os.getloadavg()[0]:.2f}")


def measure_rounds(root: Path, args: argparse.Namespace, config: LoaderConfig) -> dict[str, list[tuple[float, float]]]:
    """(samples/s, CPU ms per batch) of each loader per round, interleaved round by round."""
    measure = (args.warmup, args.batches)
    rounds: dict[str, list[tuple[float, float]]] = {"ours": [], "ours_int8": [], "baseline": [], "limit": []}
    for round_ in range(args.repeats):  # interleaved, so that a burst of other work hits all of them alike
        rounds["ours"].append(run_ours(root / "store.zarr", args.videos, config, *measure))
        rounds["ours_int8"].append(run_ours(root / "store-int8.zarr", args.videos, config, *measure))
        rounds["limit"].append(run_limit(root, args.videos, args.chunk, config, *measure))
        rounds["baseline"].append(run_baseline(root, args.frames, args.batch, 1, args.baseline_batches))
        print(f"round {round_ + 1}: " + ", ".join(f"{k} {v[-1][0]:.1f}" for k, v in rounds.items())
              + f" samples/s; load average {os.getloadavg()[0]:.2f}")
    return rounds


def print_rates(best: dict[str, float], cpu: dict[str, float], s3: dict | None, args: argparse.Namespace) -> None:
    """One line per loader: local ones from their best round, then the S3 ones beside the same local store."""
    lines = {
        "ours": f"({args.workers} workers, float16 batches in shared memory, local disk)",
        "ours_int8": "(the same values in an int8 store, int8 codes + per-video scales, local disk)",
        "baseline": "(seed style: torch.load per sample, float32, 0 workers)",
        "limit": "(memmap copy of the needed frames, one process)",
    }
    for name, what in lines.items():
        print(f"{name:10s}{best[name]:8.1f} samples/s  {cpu[name]:6.1f} CPU ms/batch  {what}")
    for codec, result in (s3 or {}).items():
        local = best["ours" if codec == "float16" else "ours_int8"]
        print(f"s3 {codec:7s}{result['samples_per_s']:8.1f} samples/s  {result['cpu_ms_per_batch']:6.1f} CPU ms/batch  "
              f"(moto on loopback, first {result['videos']} videos, {result['bytes_per_sample'] / 2**20:.2f} MiB "
              f"requested per sample; "
              f"{result['samples_per_s'] / local:.3f} of the same store on local disk; one batch's requests "
              f"alone, one process: {result['fetch_only_samples_per_s']:.1f} samples/s)")


def print_sizes(sizes: dict[str, Any]) -> None:
    """Bytes per video of each layout, random values beside the real sample videos' features."""
    print(f"bytes per video, MiB (features alone): random values (1 chunk of this run's data; compressed sizes NOT "
          f"representative) | real sample videos' features ({sizes['real_set']})")
    for random, real in zip(sizes["random"], sizes["real"]):
        exact = "  (raw: the same for any values)" if random["compression"] == "none" else ""
        print(f"  {random['layout']:14s} {random['bytes_per_video'] / 2**20:7.3f} "
              f"({random['feature_bytes_per_video'] / 2**20:.3f}, {random['feature_ratio']:.3f})  |  "
              f"{real['bytes_per_video'] / 2**20:7.3f} ({real['feature_bytes_per_video'] / 2**20:.3f}, "
              f"{real['feature_ratio']:.3f} of float16/none){exact}")


def summary(rounds: dict[str, list[tuple[float, float]]], s3: dict | None, sizes: dict[str, Any],
            args: argparse.Namespace) -> dict[str, Any]:
    """Human lines, then the JSON line's content."""
    best = {k: max(v)[0] for k, v in rounds.items()}  # the best round of each: least disturbed by other work
    cpu = {k: min(c for _, c in v) for k, v in rounds.items()}
    print_rates(best, cpu, s3, args)
    print_sizes(sizes)

    def per_layout(results: list[dict[str, Any]]) -> dict[str, int]:
        return {r["layout"]: round(r["bytes_per_video"]) for r in results}

    return {
        "ours": round(best["ours"], 1), "baseline": round(best["baseline"], 1), "limit": round(best["limit"], 1),
        "ratio": round(best["ours"] / best["baseline"], 2), "of_limit": round(best["ours"] / best["limit"], 3),
        "ours_int8": round(best["ours_int8"], 1),
        "s3": {k: {"samples_per_s": round(v["samples_per_s"], 1), "cpu_ms_per_batch": round(v["cpu_ms_per_batch"], 1),
                   "bytes_per_sample": v["bytes_per_sample"],
                   "fetch_only_samples_per_s": round(v["fetch_only_samples_per_s"], 1),
                   "of_local": round(v["samples_per_s"] / best[
                       "ours" if k == "float16" else "ours_int8"], 4)} for k, v in (s3 or {}).items()},
        "bytes_per_video": {"random_values": per_layout(sizes["random"]), "real_features": per_layout(sizes["real"]),
                            "real_set": sizes["real_set"]},
        "cpu_ms_per_batch": {k: round(v, 1) for k, v in cpu.items()},
        "workers": args.workers, "batch_size": args.batch, "batches": args.batches, "videos": args.videos,
        "baseline_batches": args.baseline_batches, "s3_batches": args.s3_batches, "chunk": args.chunk,
        "repeats": args.repeats, "cpus": os.cpu_count(), "load_avg": round(os.getloadavg()[0], 2),
        "rounds": {k: [round(x, 1) for x, _ in v] for k, v in rounds.items()},
    }


def main() -> None:
    args = parse_args()
    parent = args.workdir or Path(tempfile.gettempdir())
    root = parent / f"fvlm-loader-bench-{args.videos}x{args.chunk}"
    config = LoaderConfig(frames=args.frames, batch_size=args.batch, buffer_chunks=args.buffer_chunks,
                          num_workers=args.workers, prefetch_factor=args.prefetch, seed=args.seed, eval_fraction=0.0)
    started = time.perf_counter()
    try:
        prepare_data(root, args)
        rounds = measure_rounds(root, args, config)
        s3 = measure_s3(root, args, config) if args.s3_batches > 0 else None
        sizes = layout_sizes(root, args)
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    result = summary(rounds, s3, sizes, args)
    print(f"({time.perf_counter() - started:.0f} s, load average {os.getloadavg()[0]:.2f}, {os.cpu_count()} CPUs)")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
