"""Videos/s of the precompute pipeline against the seed's own loop, on the same videos and encoders.

Baseline: what the seed's `precompute_dino.py` does per video, one video at a time: `ffmpeg -i VIDEO -vf
scale=256:256:force_original_aspect_ratio=increase,crop=256:256 -frames:v 72 -q:v 2 frame_%04d.jpg` (the first
72 frames, scaled and cropped by ffmpeg, as JPEG files), the 24 files at `linspace(0, n-1, 24).astype(int)` read
with PIL, the encoders on those 24 frames, and one `.pt` file per video (bfloat16 tensors and the caption).

Ours: the precompute pipeline (listing, store creation, decode worker processes that decode only the window's
frames, frames of several videos per encoder batch, decoding of the next chunk overlapping the encoding of this
one, chunked Zarr writes).

Also measured, decode alone: the seed's window (`read_clip`, the default) against the whole-video spread this
project used before (`window=None`), per video, on the generated clips and on the shared 30 s WebM when present.

Prints human lines and, last, one JSON line {"ours": .., "baseline": .., "ratio": .., "decode": ..}.

    python benchmarks/precompute.py                      # CPU, demo encoders
    python benchmarks/precompute.py --device cuda --preset full --dino DIR --vae DIR   # on a GPU host
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import imageio_ffmpeg
import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# torch, Prefect and the project's modules are imported inside the functions: the decode workers are spawned
# processes that re-run this script's top-level imports, and `fvlm`'s own entry point imports nothing heavy either.

FFMPEG = imageio_ffmpeg.get_ffmpeg_exe()


def make_videos(folder: Path, count: int, size: str, fps: int, seed: int) -> Path:
    """Web-like H.264 videos of 20-60 s (ffmpeg's own test sources, so generation is quick); a manifest."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    rows = []
    sources = ["testsrc2", "smptehdbars", "mandelbrot", "life"]
    for i in range(count):
        seconds = int(rng.integers(20, 61))
        path = folder / f"bench{i:03d}.mp4"
        if not path.exists():
            source = sources[i % len(sources)]
            subprocess.run([FFMPEG, "-v", "error", "-y", "-f", "lavfi", "-i", f"{source}=size={size}:rate={fps}",
                            "-t", str(seconds), "-c:v", "libx264", "-preset", "veryfast", "-pix_fmt", "yuv420p",
                            str(path)], check=True)
        rows.append({"videoid": path.stem, "contentUrl": path.name, "duration": seconds, "name": f"test {i}"})
    from tasks.samples import write_manifest

    return write_manifest(folder / "manifest.csv", rows)


def seed_frames(path: str, frames: int = 24, size: int = 256) -> np.ndarray | None:
    """The seed's `extract_frames`: the first 3 * frames frames as JPEGs, `frames` of them read with PIL."""
    with tempfile.TemporaryDirectory() as tmp:
        vf = f"scale={size}:{size}:force_original_aspect_ratio=increase,crop={size}:{size}"
        done = subprocess.run([FFMPEG, "-i", path, "-vf", vf, "-frames:v", str(frames * 3), "-q:v", "2",
                               f"{tmp}/frame_%04d.jpg", "-y", "-loglevel", "error"], capture_output=True)
        files = sorted(Path(tmp).glob("frame_*.jpg"))
        if done.returncode != 0 or len(files) < frames:
            return None
        indices = np.linspace(0, len(files) - 1, frames).astype(int)
        return np.stack([np.array(Image.open(files[i]).convert("RGB")) for i in indices])


def baseline(videos: list[tuple[str, float]], encoder, out: Path, frames: int = 24) -> float:
    """The seed's loop: per video, ffmpeg -> 72 JPEG files -> 24 read with PIL -> encoders -> one .pt file."""
    import torch

    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    for path, _ in videos:
        batch = seed_frames(path, frames)
        if batch is None:
            continue
        features, latents = encoder.encode(batch)
        torch.save({"dino_features": torch.from_numpy(features).to(torch.bfloat16),
                    "latents": torch.from_numpy(latents).to(torch.bfloat16), "caption": Path(path).stem},
                   out / f"{Path(path).stem}.pt")
    return time.perf_counter() - started


def decode_seconds(paths: list[str], window: int | None, repeats: int = 2) -> float:
    """Mean seconds to decode the 24 kept frames of one video in this process (best of `repeats` passes)."""
    from tasks.decode import read_clip

    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        for path in paths:
            read_clip(path, window=window)
        best = min(best, time.perf_counter() - started)
    return best / len(paths)


def compare_decoding(generated: list[str], shared: Path | None) -> dict:
    """Per-video decode time, window against whole-video spread, on the generated clips and the shared WebM."""
    from tasks.decode import SEED_WINDOW_FRAMES

    sets = {"generated": generated}
    if shared is not None and shared.is_file():
        sets["shared_30s_webm"] = [str(shared)]
    result = {}
    for name, paths in sets.items():
        window, spread = decode_seconds(paths, SEED_WINDOW_FRAMES), decode_seconds(paths, None)
        result[name] = {"window_ms": round(1000 * window, 1), "spread_ms": round(1000 * spread, 1),
                        "ratio": round(spread / window, 2)}
        print(f"decode    {name:16s} window {1000 * window:6.1f} ms/video, whole-video spread "
              f"{1000 * spread:6.1f} ms/video: {spread / window:.2f}x cheaper")
    return result


def ours(manifest: Path, store: Path, config) -> tuple[float, dict]:
    """The pipeline from the manifest to a committed store. Returns seconds and the encode report, with the
    steady rate: videos/s from the first chunk's commit to the last (start-up of the decode workers and the
    encoders excluded)."""
    from tasks.listing import ListingConfig, list_videos
    from tasks.precompute import encode_chunks, prepare_store

    started = time.perf_counter()
    listing = list_videos(manifest, ListingConfig())
    prepared = prepare_store(str(store), listing, config)
    commits: list[tuple[float, int]] = []
    report = encode_chunks(str(store), prepared.pending_chunks(), config,
                           on_chunk=lambda _, r: commits.append((time.perf_counter(), r.videos_ok + r.videos_failed)))
    seconds = time.perf_counter() - started
    (first_t, first_n), (last_t, last_n) = commits[0], commits[-1]
    steady = (last_n - first_n) / (last_t - first_t) if last_t > first_t else float("nan")
    return seconds, {**report.as_dict(), "steady_videos_per_s": steady, "startup_s": first_t - started}


def cpu_seconds() -> float:
    """CPU time of this process and of its finished children (ffmpeg runs, decode workers)."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    # WebVid-10M's clips (the seed's data) are 596 x 336 previews at 25-30 fps.
    parser.add_argument("--videos", type=int, default=48)
    parser.add_argument("--size", default="596x336", help="video size (W x H)")
    parser.add_argument("--fps", type=int, default=25)
    parser.add_argument("--preset", choices=["demo", "full"], default="demo")
    parser.add_argument("--dino", default=None, help="DINOv2 hub id or folder (full preset)")
    parser.add_argument("--vae", default=None, help="VAE hub id or folder (full preset)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--decode-workers", type=int, default=2)
    parser.add_argument("--chunk-videos", type=int, default=8)
    parser.add_argument("--workdir", default=None, help="keep videos here between runs (default: a temp dir)")
    parser.add_argument("--shared-webm", default=str(Path(__file__).resolve().parents[2] / "shared" / "data" /
                                                     "videos" / "moviepy_big_buck_bunny_0_30.webm"),
                        help="a real 30 s video for the decode comparison (skipped when absent)")
    return parser.parse_args()


def measure_baseline(videos: list[tuple[str, float]], encoder_config, device: str,
                     work: Path) -> tuple[float, float]:
    """Seconds and CPU seconds of the seed's loop; the encoders are warmed up first and freed after."""
    from model.encoders import FrameEncoder

    encoder = FrameEncoder(encoder_config, device)
    encoder.encode(np.zeros((24, 256, 256, 3), np.uint8))  # warm up kernels for both
    for path in work.glob("run-*"):
        shutil.rmtree(path)
    cpu = cpu_seconds()
    seconds = baseline(videos, encoder, work / "run-baseline-pt")
    return seconds, cpu_seconds() - cpu


def measure_ours(manifest: Path, work: Path, config) -> tuple[tuple[float, float], dict]:
    """(seconds, CPU seconds) and the encode report of the pipeline."""
    cpu = cpu_seconds()
    seconds, report = ours(manifest, work / "run-ours.zarr", config)
    return (seconds, cpu_seconds() - cpu), report


def print_rates(n: int, base: tuple[float, float], ours_: tuple[float, float], report: dict) -> None:
    """The baseline's and our line: seconds, videos/s, CPU s/video (and our steady rate)."""
    (base_s, base_cpu), (ours_s, ours_cpu) = base, ours_
    base_vps, ours_vps = n / base_s, n / ours_s
    print(f"baseline  {base_s:7.2f} s  {base_vps:6.2f} videos/s  {base_cpu / n:5.2f} CPU s/video  "
          f"(the seed's loop: ffmpeg -frames:v 72 -> JPEG -> PIL, one video at a time)")
    print(f"ours      {ours_s:7.2f} s  {ours_vps:6.2f} videos/s  {ours_cpu / n:5.2f} CPU s/video  "
          f"({report['videos_ok']} ok, {report['videos_failed']} failed); after {report['startup_s']:.1f} s of "
          f"start-up and the first chunk, {report['steady_videos_per_s']:.2f} videos/s "
          f"({report['steady_videos_per_s'] / base_vps:.2f}x the baseline)")


def summary(args: argparse.Namespace, n: int, base: tuple[float, float], ours_: tuple[float, float],
            report: dict, decode: dict) -> dict:
    """The last line's JSON."""
    (base_s, base_cpu), (ours_s, ours_cpu) = base, ours_
    base_vps, ours_vps = n / base_s, n / ours_s
    return {"ours": round(ours_vps, 3), "baseline": round(base_vps, 3), "decode": decode,
            "ratio": round(ours_vps / base_vps, 3),
            "steady": {"ours": round(report["steady_videos_per_s"], 3),
                       "ratio": round(report["steady_videos_per_s"] / base_vps, 3)},
            "videos": n, "device": args.device,
            "preset": args.preset, "cpu_s_per_video": {"ours": round(ours_cpu / n, 3),
                                                        "baseline": round(base_cpu / n, 3)},
            "cores": os.cpu_count()}


def main() -> None:
    args = parse_args()
    import torch

    from model.encoders import EncoderConfig
    from storage.store import StoreConfig
    from tasks.decode import DecodeConfig
    from tasks.listing import ListingConfig, list_videos
    from tasks.precompute import PrecomputeConfig

    work = Path(args.workdir or tempfile.mkdtemp(prefix="fvlm-bench-"))
    manifest = make_videos(work / "videos", args.videos, args.size, args.fps, seed=0)
    listing = list_videos(manifest, ListingConfig())
    videos = list(zip(listing.videos["source"], listing.videos["duration_s"]))
    extra = {k: v for k, v in {"dino": args.dino, "vae": args.vae}.items() if v}
    encoder_config = EncoderConfig(preset=args.preset, **extra)
    config = PrecomputeConfig(encoder=encoder_config, decode=DecodeConfig(workers=args.decode_workers),
                              layout=StoreConfig(chunk_videos=args.chunk_videos), device=args.device)
    print(f"{len(videos)} videos of {args.size} at {args.fps} fps, {args.preset} encoders on {args.device}, "
          f"{torch.get_num_threads()} torch threads, {args.decode_workers} decode workers")

    base = measure_baseline(videos, encoder_config, args.device, work)
    ours_, report = measure_ours(manifest, work, config)
    print_rates(len(videos), base, ours_, report)
    decode = compare_decoding([str(p) for p, _ in videos], Path(args.shared_webm))
    print(json.dumps(summary(args, len(videos), base, ours_, report, decode)))


if __name__ == "__main__":
    main()
