"""Training-loader throughput: storage/loader.py against a seed-style loader and the memory-copy limit.

One run on the same data: V videos with the real shapes (random values) written as
  - a feature store (chunks of K videos, no compression), read by `make_train_loader` (ours);
  - seed-format .pt files ({"dino_features": (24, 325, 384), "latents": (24, 4, 32, 32)} in bfloat16, "caption"),
    read the seed's way (baseline): a torch Dataset with one torch.load per sample, bf16 -> float32 on the CPU,
    16 of 24 frames by linspace, default collate, num_workers=0;
  - flat numpy memmaps (limit): the 16 needed frames of each sample of a batch copied, run of consecutive frames
    by run, into a preallocated batch buffer in this one process. That is the memory-copy limit of a loader
    that serves each batch from the page cache (ours may beat it with several workers).
The page cache is warmed for all three first (every file read once), and each is measured over the same number
of batches after the same number of warm-up batches, in interleaved rounds (the best round of each counts:
the machine may be shared; CPU ms per batch, this process plus the loader's workers, is printed too, as it
hardly depends on other work). The consumer only takes batches (no device copy), so this
measures what the loader can deliver. The last line printed is JSON:
{"ours": samples/s, "baseline": .., "limit": .., "ratio": ours/baseline, "of_limit": ours/limit, ...}.

    python benchmarks/loader.py --videos 192 --workers 2 --batches 12
"""

import argparse
import itertools
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from storage.loader import (  # noqa: E402
    LoaderConfig, LoaderPosition, frame_runs, epoch_order, frame_indices, make_train_loader,
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


def run_ours(root: Path, videos: int, config: LoaderConfig, warmup: int, measured: int) -> tuple[float, float]:
    loader = make_train_loader(root / "store.zarr", np.arange(videos), config, LoaderPosition(), pin_memory=False)
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
    parser.add_argument("--batches", type=int, default=12, help="measured batches, the same for all three")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved rounds; the best round of each counts")
    parser.add_argument("--warmup", type=int, default=3, help="batches taken before measuring")
    parser.add_argument("--workdir", type=Path, default=None, help="where to write the data (default: a temp dir)")
    parser.add_argument("--keep", action="store_true", help="keep the data (and reuse it when it is there)")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args()


def prepare_data(root: Path, args: argparse.Namespace) -> None:
    """Write the data three ways, unless --keep finds it already written; then warm the page cache."""
    if not (args.keep and (root / "done").exists()):
        shutil.rmtree(root, ignore_errors=True)
        root.mkdir(parents=True)
        start = time.perf_counter()
        write_data(root, args.videos, args.chunk, args.seed)
        (root / "done").touch()
        print(f"wrote {args.videos} videos three ways to {root} in {time.perf_counter() - start:.1f} s")
    warmed = warm_page_cache(root)
    print(f"page cache warmed: {warmed / 2**30:.2f} GiB read; load average {os.getloadavg()[0]:.2f}")


def measure_rounds(root: Path, args: argparse.Namespace, config: LoaderConfig) -> dict[str, list[tuple[float, float]]]:
    """(samples/s, CPU ms per batch) of each loader per round, the three interleaved round by round."""
    measure = (args.warmup, args.batches)
    rounds: dict[str, list[tuple[float, float]]] = {"ours": [], "baseline": [], "limit": []}
    for round_ in range(args.repeats):  # interleaved, so that a burst of other work hits all three alike
        rounds["ours"].append(run_ours(root, args.videos, config, *measure))
        rounds["limit"].append(run_limit(root, args.videos, args.chunk, config, *measure))
        rounds["baseline"].append(run_baseline(root, args.frames, args.batch, *measure))
        print(f"round {round_ + 1}: " + ", ".join(f"{k} {v[-1][0]:.1f}" for k, v in rounds.items())
              + f" samples/s; load average {os.getloadavg()[0]:.2f}")
    return rounds


def print_summary(rounds: dict[str, list[tuple[float, float]]], args: argparse.Namespace) -> None:
    """One line per loader from its best round, then the JSON line."""
    best = {k: max(v) for k, v in rounds.items()}  # the best round of each: least disturbed by other work
    cpu = {k: min(c for _, c in v) for k, v in rounds.items()}
    ours, baseline, limit = best["ours"][0], best["baseline"][0], best["limit"][0]
    print(f"ours      {ours:8.1f} samples/s  {cpu['ours']:6.1f} CPU ms/batch  "
          f"({args.workers} workers, float16 batches in shared memory)")
    print(f"baseline  {baseline:8.1f} samples/s  {cpu['baseline']:6.1f} CPU ms/batch  "
          "(seed style: torch.load per sample, float32, 0 workers)")
    print(f"limit     {limit:8.1f} samples/s  {cpu['limit']:6.1f} CPU ms/batch  "
          "(memmap copy of the needed frames, one process)")
    result = {
        "ours": round(ours, 1), "baseline": round(baseline, 1), "limit": round(limit, 1),
        "ratio": round(ours / baseline, 2), "of_limit": round(ours / limit, 3),
        "cpu_ms_per_batch": {k: round(v, 1) for k, v in cpu.items()},
        "workers": args.workers, "batch_size": args.batch, "batches": args.batches, "videos": args.videos,
        "chunk": args.chunk, "repeats": args.repeats, "cpus": os.cpu_count(),
        "load_avg": round(os.getloadavg()[0], 2),
        "rounds": {k: [round(x, 1) for x, _ in v] for k, v in rounds.items()},
    }
    print(json.dumps(result))


def main() -> None:
    args = parse_args()
    parent = args.workdir or Path(tempfile.gettempdir())
    root = parent / f"fvlm-loader-bench-{args.videos}x{args.chunk}"
    config = LoaderConfig(frames=args.frames, batch_size=args.batch, buffer_chunks=args.buffer_chunks,
                          num_workers=args.workers, prefetch_factor=args.prefetch, seed=args.seed, eval_fraction=0.0)
    try:
        prepare_data(root, args)
        rounds = measure_rounds(root, args, config)
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    print_summary(rounds, args)


if __name__ == "__main__":
    main()
