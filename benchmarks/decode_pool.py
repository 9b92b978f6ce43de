"""ms per clip through the project's decode pool (`tasks.decode.DecodePool`, a `tasks.workers.WorkerPool`) and
through pebble's ProcessPool (`schedule(fn, timeout=...)`, results pickled), on the same generated clips.

Both pools: spawned workers, the same number of them, the same decode function (`read_clip`, the seed's window:
24 frames of 256 x 256) and arguments; each is started and warmed up (one untimed pass) before it is timed. A pass
submits every clip and collects every result in the parent; ms per clip is the pass's time over the clips, best of
`--repeats`, the two pools' passes taking turns so that a busy machine slows both alike; the parent's CPU time
per clip (unpickling, copying: time taken from the encoder in the pipeline) is reported beside it. Measured twice:
- decode: decoding + transfer of the (24, 256, 256, 3) uint8 frames to the parent;
- transfer: a function that returns a ready-made clip, so only the transfer and the pool's own overhead count.
For scale, read_clip in this process (no pool) is timed too.

Needs pebble (`pip install pebble`; it is not a project dependency). Prints human lines and, last, one JSON line.

    python benchmarks/decode_pool.py --clips 16 --workers 2 --repeats 3
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# The project's modules and pebble are imported inside the functions: the workers are spawned processes that re-run
# this script's top-level imports.

_READY_CLIP: dict[tuple[int, int], np.ndarray] = {}  # per worker process: the clip transfer_only returns


def transfer_only(path: str, frames: int = 24, size: int = 256, num_threads: int = 1,
                  window: int | None = None) -> np.ndarray:
    """No decoding: a (frames, size, size, 3) uint8 clip made once per worker, so only its transfer is timed."""
    if (frames, size) not in _READY_CLIP:
        _READY_CLIP[(frames, size)] = np.random.default_rng(0).integers(0, 256, (frames, size, size, 3), np.uint8)
    return _READY_CLIP[(frames, size)]


def make_clips(folder: Path, count: int) -> list[str]:
    """`count` H.264 clips of 3 s at 10 fps, 320 x 240 (30 frames: the window keeps 24 of them)."""
    from tasks.samples import make_video

    return [str(make_video(folder / f"clip{i:02d}.mp4", duration_s=3, fps=10, size=(320, 240), seed=i))
            for i in range(count)]


def frames_of(value) -> np.ndarray:
    """The frames of what a decode function returned (a Clip or the frames alone)."""
    return value if isinstance(value, np.ndarray) else value.frames


def pass_ours(pool, paths: list[str], tag: str) -> tuple[float, float]:
    """(wall, parent CPU) seconds to submit every clip to the project's pool and collect every result."""
    started, cpu = time.perf_counter(), time.process_time()
    for i, path in enumerate(paths):
        pool.submit(f"{tag}-{i}", path)
    for i in range(len(paths)):
        result = pool.get(f"{tag}-{i}")
        assert result.error is None and result.frames.shape == (24, 256, 256, 3), result.error
    return time.perf_counter() - started, time.process_time() - cpu


def pass_pebble(pool, paths: list[str], fn, kwargs: dict, timeout_s: float) -> tuple[float, float]:
    """(wall, parent CPU) seconds to schedule every clip on pebble's pool and collect every (pickled) result."""
    started, cpu = time.perf_counter(), time.process_time()
    futures = [pool.schedule(fn, args=(path,), kwargs=kwargs, timeout=timeout_s) for path in paths]
    for future in futures:
        assert frames_of(future.result()).shape == (24, 256, 256, 3)
    return time.perf_counter() - started, time.process_time() - cpu


def compare(paths: list[str], fn, workers: int, repeats: int) -> dict[str, dict[str, float]]:
    """Best wall and parent-CPU ms per clip of each pool with `fn` as the decode function, passes taking turns."""
    from pebble import ProcessPool

    from tasks.decode import DecodeConfig, DecodePool

    config = DecodeConfig(workers=workers, timeout_s=60)
    kwargs = {"frames": config.frames, "size": config.size, "num_threads": config.threads_per_worker,
              "window": config.window}  # what DecodePool passes to its decode function
    best = {name: np.full(2, np.inf) for name in ("ours", "pebble")}  # wall, parent CPU
    with DecodePool(config, decode_fn=fn) as ours, \
            ProcessPool(max_workers=workers, context=mp.get_context("spawn")) as pebble:
        pass_ours(ours, paths, "warm")  # workers started, modules imported
        pass_pebble(pebble, paths, fn, kwargs, config.timeout_s)
        for r in range(repeats):
            best["ours"] = np.minimum(best["ours"], pass_ours(ours, paths, f"r{r}"))
            best["pebble"] = np.minimum(best["pebble"], pass_pebble(pebble, paths, fn, kwargs, config.timeout_s))
    return {name: {"wall": round(1000 * wall / len(paths), 2), "parent_cpu": round(1000 * cpu / len(paths), 2)}
            for name, (wall, cpu) in best.items()}


def in_process_ms(paths: list[str], repeats: int) -> float:
    """Best ms per clip of read_clip in this process, one clip after another (no pool)."""
    from tasks.decode import read_clip

    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        for path in paths:
            read_clip(path)
        best = min(best, time.perf_counter() - started)
    return round(1000 * best / len(paths), 2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clips", type=int, default=16)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3, help="timed passes per pool; the best one counts")
    args = parser.parse_args()
    try:
        import pebble  # noqa: F401
    except ImportError:
        sys.exit("this benchmark needs pebble, which is not a project dependency: pip install pebble")
    from tasks.decode import read_clip

    with tempfile.TemporaryDirectory(prefix="fvlm-pool-bench-") as tmp:
        paths = make_clips(Path(tmp), args.clips)
        single = in_process_ms(paths, args.repeats)
        decode = compare(paths, read_clip, args.workers, args.repeats)
        transfer = compare(paths, transfer_only, args.workers, args.repeats)
    print(f"{args.clips} clips of 3 s, 320x240 H.264 -> (24, 256, 256, 3) uint8; {args.workers} workers; "
          f"best of {args.repeats}")
    print(f"read_clip in this process        {single:7.2f} ms/clip")
    for name, label in [("ours", "ours (raw bytes over a pipe)"), ("pebble", "pebble ProcessPool (pickled)")]:
        d, t = decode[name], transfer[name]
        print(f"{label:32s} decode {d['wall']:6.2f} ms/clip (parent CPU {d['parent_cpu']:5.2f})   "
              f"transfer only {t['wall']:6.2f} ms/clip (parent CPU {t['parent_cpu']:5.2f})")
    ratio = {kind: round(result["pebble"]["wall"] / result["ours"]["wall"], 2)
             for kind, result in [("decode", decode), ("transfer", transfer)]}
    print(json.dumps({"clips": args.clips, "workers": args.workers, "repeats": args.repeats,
                      "in_process_ms": single, "decode_ms_per_clip": decode, "transfer_ms_per_clip": transfer,
                      "pebble_over_ours_wall": ratio}))


if __name__ == "__main__":
    main()
