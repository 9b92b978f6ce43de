"""Benchmark of the video listing on a WebVid-10M-sized manifest.

Generates a WebVid-style CSV (videoid, contentUrl, duration as ISO-8601, page_dir, name) with a spread of
durations, some blank captions and some duplicate ids, then runs `list_videos` on it in a child process and
reports the child's time and peak memory. The last line of the output is JSON:
{"rows": N, "seconds": s, "rows_per_s": r, "peak_mb": m, "kept": k}.

    python benchmarks/listing.py --rows 10000000 --workdir fvlm-bench
"""

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv

REPO_ROOT = Path(__file__).resolve().parents[1]
WORDS = (
    "aerial view of a city at night with traffic lights woman smiling in slow motion young man running on the "
    "beach at sunset close up of hands typing on a laptop keyboard abstract background loop with colorful "
    "particles forest river flowing over rocks in autumn business people meeting in a modern office"
).split()


def _captions(rng: np.random.Generator, n_distinct: int = 4096) -> pa.Array:
    """A pool of distinct stock-footage-like captions (30-120 characters), the first one blank."""
    lengths = rng.integers(5, 18, size=n_distinct)
    pool = [" ".join(rng.choice(WORDS, size=k)).capitalize() + "." for k in lengths]
    pool[0] = ""  # blank caption: the listing drops these as no_caption
    return pa.array(pool, type=pa.string())


def _durations() -> pa.Array:
    """ISO-8601 strings for 0..120 s, indexed by whole seconds, as WebVid writes them (PT00H00M22S)."""
    return pa.array([f"PT00H{s // 60:02d}M{s % 60:02d}S" for s in range(121)], type=pa.string())


def _batch(rng: np.random.Generator, start: int, n: int, captions: pa.Array, durations: pa.Array) -> pa.Table:
    """Rows [start, start + n) of the synthetic manifest."""
    ids = np.arange(start, start + n, dtype=np.int64) + 1_000_000
    dup = rng.random(n) < 0.005  # about 0.5% of rows repeat an earlier id
    ids[dup] = np.maximum(ids[dup] - rng.integers(1, 50_000, size=int(dup.sum())), 1_000_000)
    id_text = pa.array(ids).cast(pa.string())
    url = pc.binary_join_element_wise(
        "https://ak.picdn.net/shutterstock/videos/", id_text, "/preview/stock-footage-clip.mp4", ""
    )
    caption_idx = rng.integers(0, len(captions), size=n)
    caption_idx[rng.random(n) < 0.01] = 0  # about 1% blank captions
    page_lo = ((ids - 1) // 50) * 50 + 1
    page_dir = pc.binary_join_element_wise(
        pa.array(page_lo).cast(pa.string()), pa.array(page_lo + 49).cast(pa.string()), "_"
    )
    return pa.table(
        {
            "videoid": pa.array(ids),
            "contentUrl": url,
            "duration": durations.take(pa.array(rng.integers(1, 121, size=n))),
            "page_dir": page_dir,
            "name": captions.take(pa.array(caption_idx)),
        }
    )


def generate_manifest(path: Path, rows: int, seed: int = 0, batch_rows: int = 1_000_000) -> None:
    """Write a WebVid-style CSV of `rows` rows to `path`, batch by batch (bounded memory)."""
    rng = np.random.default_rng(seed)
    captions, durations = _captions(rng), _durations()
    first = _batch(rng, 0, min(batch_rows, rows), captions, durations)
    with pacsv.CSVWriter(path, first.schema) as writer:
        writer.write_table(first)
        for start in range(batch_rows, rows, batch_rows):
            writer.write_table(_batch(rng, start, min(batch_rows, rows - start), captions, durations))


CHILD = textwrap.dedent(
    """
    import json, sys, time
    sys.path.insert(0, sys.argv[1])
    from tasks.listing import ListingConfig, list_videos
    start = time.perf_counter()
    listing = list_videos(sys.argv[2], ListingConfig())
    seconds = time.perf_counter() - start
    print(json.dumps({"seconds": seconds, "kept": len(listing.videos), "summary": listing.summary}))
    """
)


def run_listing(manifest: Path) -> dict:
    """Run list_videos in a child process; return its timing, kept count and peak RSS."""
    start = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-c", CHILD, str(REPO_ROOT), str(manifest)], capture_output=True, text=True, check=False
    )
    wall = time.perf_counter() - start
    if done.returncode != 0:
        sys.exit(f"listing child failed with exit code {done.returncode}:\n{done.stderr}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    # ru_maxrss of the waited-for children, in KiB on Linux.
    result["peak_mb"] = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    result["wall_s"] = wall
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=10_000_000, help="rows of the synthetic manifest")
    parser.add_argument("--workdir", type=Path, default=None, help="folder for the manifest (default: a temp dir)")
    parser.add_argument("--keep", action="store_true", help="reuse an existing manifest of the same size")
    args = parser.parse_args()

    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="fvlm-bench-listing-"))
    workdir.mkdir(parents=True, exist_ok=True)
    manifest = workdir / f"webvid_{args.rows}.csv"
    start = time.perf_counter()
    if not (args.keep and manifest.exists()):
        generate_manifest(manifest, args.rows)
    generate_s = time.perf_counter() - start

    result = run_listing(manifest)
    seconds = result["seconds"]
    print(
        f"listing {args.rows:,} rows ({manifest.stat().st_size / 2**30:.2f} GiB CSV, generated in {generate_s:.1f} s): "
        f"{seconds:.1f} s in list_videos ({result['wall_s']:.1f} s child wall incl. imports), "
        f"{args.rows / seconds:,.0f} rows/s, peak RSS {result['peak_mb']:,.0f} MB, kept {result['kept']:,}; "
        f"dropped {result['summary']['dropped']}"
    )
    print(
        json.dumps(
            {
                "rows": args.rows,
                "seconds": round(seconds, 3),
                "rows_per_s": round(args.rows / seconds, 1),
                "peak_mb": round(result["peak_mb"], 1),
                "kept": result["kept"],
            }
        )
    )


if __name__ == "__main__":
    main()
