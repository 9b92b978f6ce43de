"""The int8 feature codec against float16 on features of real videos: its error, the bytes per video and read rate
of each store layout, and (with --training) its effect on the demo's held-out ratio.

The features: the shared sample videos (../shared/data/videos beside the project, or $FVLM_SHARED_VIDEOS; only 3
of them give 24 frames, the others are failed rows) plus a few generated ones (tasks/samples.py), precomputed into
a float16 store with the demo encoders (stand-ins with DINOv2-small's 325 x 384 tokens and SD-VAE's 4 x 32 x 32
latents: no weights can be downloaded here, so their values are not DINOv2's) or, with --dino DIR --vae DIR, the
real encoders. Videos and store are kept in --workdir and reused while the recipe is the same
(benchmarks/loader.py reads the same store for its compressed sizes).

1. Error: the ok rows' features quantised with storage.feature_codec.quantise_int8 and read back as the training
   device gets them (codes * scale + offset, then float16), against the float16 features:
   storage.feature_codec.codec_error (relative L2 per video, max and mean; cosine of every token's feature
   vector, min and 0.1 % quantile) against the targets rel L2 <= 1 %, cosine >= 0.999; per video, and the
   channels that carry most of the error.
2. Layouts: the ok rows rewritten into a store of each layout (float16 none/zstd/blosc, int8 none/zstd, chunks of
   K videos): bytes per video on disk (whole store, and the feature arrays alone), and storage.loader.BatchReader
   samples/s (16 of 24 frames, page cache warm, best of 3). For the read rate the ok rows are written --copies
   times over, so that a batch of 64 distinct rows spans 8 chunks as a training batch does (with 8 ok rows, each
   chunk holds the same 8 videos, so the bytes per video are those of one copy). The same sizes again for the
   shared real videos alone: the generated videos have static backgrounds, and the demo's DINOv2 stand-in (no
   attention) gives a patch that does not change the same token in every frame, which zstd finds.
3. --training (slow): `fvlm demo` (the positive control) twice with the same seed, --feature-codec float16 and
   int8, each in its own workdir (the int8 one gets a copy of the generated videos); both held-out ratios.

Prints a markdown table at the end, then one JSON line.

    python benchmarks/feature_codec.py                      # demo encoders, CPU: 1-2 minutes
    python benchmarks/feature_codec.py --training           # + two demo runs (about 2 x 6 min on 2 cores)
    python benchmarks/feature_codec.py --preset full --dino DIR --vae DIR --device cuda   # real DINOv2 features
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))  # run from a checkout without installing

# torch, Prefect and the encoders are imported inside the functions: the precompute's decode workers are spawned
# processes that re-run this script's top-level imports.
from model.encoder_config import EncoderConfig  # noqa: E402  (pydantic only)
from storage.feature_codec import codec_error, dequantise_int8, quantise_int8  # noqa: E402
from storage.store import OK, ChunkRows, FeatureStore, StoreConfig  # noqa: E402
from storage.zarr_files import is_url  # noqa: E402

log = logging.getLogger(__name__)

LAYOUTS = (("float16", "none"), ("float16", "zstd"), ("float16", "blosc"), ("int8", "none"), ("int8", "zstd"))
TARGET_RELATIVE_L2, TARGET_COSINE = 0.01, 0.999
# Generated videos: (pattern, size), taken in turn; 12 s at 10 fps, enough for the seed's 72-frame window.
GENERATED = (("moving_object", (320, 240)), ("cue", (128, 128)), ("gradient", (320, 240)))


def shared_videos_folder() -> Path:
    """The real sample videos: $FVLM_SHARED_VIDEOS, else shared/data/videos beside the project folder."""
    return Path(os.environ.get("FVLM_SHARED_VIDEOS", REPO_ROOT.parent / "shared" / "data" / "videos"))


def default_workdir() -> Path:
    """Where both this benchmark and benchmarks/loader.py keep the videos and the float16 store."""
    return Path(tempfile.gettempdir()) / "fvlm-codec-bench"


# ---- the features: real videos, precomputed into a float16 store --------------------------------------


def gather_videos(folder: Path, shared: Path, generated: int, seed: int) -> list[str]:
    """Links to the shared sample videos and `generated` made videos, all in `folder`; returns the file names."""
    from tasks.listing.readers import VIDEO_EXTENSIONS
    from tasks.samples import make_video

    folder.mkdir(parents=True, exist_ok=True)
    names = []
    if shared.is_dir():
        for video in sorted(p for p in shared.iterdir() if p.suffix.lower() in VIDEO_EXTENSIONS):
            link = folder / f"shared-{video.name}"
            if not link.is_symlink():
                link.symlink_to(video.resolve())
            names.append(link.name)
    else:
        log.warning("no shared sample videos at %s (set FVLM_SHARED_VIDEOS): generated videos only", shared)
    for i in range(generated):
        pattern, size = GENERATED[i % len(GENERATED)]
        path = folder / f"generated-{i:02d}-{pattern}.mp4"
        if not path.exists():
            make_video(path, 12.0, fps=10, size=size, pattern=pattern, seed=seed + i)
        names.append(path.name)
    for stale in folder.iterdir():  # the folder is the manifest: nothing of an earlier recipe may stay in it
        if stale.name not in names:
            stale.unlink()
    return names


def encoder_config(preset: str, dino: str | None, vae: str | None, seed: int) -> EncoderConfig:
    """The encoders: the demo's stand-ins (seeded), or the real ones from --dino / --vae (full preset)."""
    overrides = {k: v for k, v in {"dino": dino, "vae": vae}.items() if v}
    return EncoderConfig.for_preset(preset, seed=seed, **overrides)


def precompute(videos: Path, store: Path, encoder: EncoderConfig, device: str, chunk_videos: int) -> FeatureStore:
    """Every video of the folder (any duration) into a float16 store, as `fvlm precompute` does."""
    from tasks.decode import DecodeConfig
    from tasks.listing import ListingConfig, list_videos
    from tasks.precompute import PrecomputeConfig, encode_chunks, prepare_store

    listing = list_videos(videos, ListingConfig(min_duration_s=0, max_duration_s=100_000))
    config = PrecomputeConfig(encoder=encoder, decode=DecodeConfig(workers=2), device=device,
                              layout=StoreConfig(chunk_videos=chunk_videos, feature_codec="float16"))
    prepared = prepare_store(str(store), listing, config)
    encode_chunks(str(store), prepared.pending_chunks(), config)
    return FeatureStore.open(store)


def feature_store(work: Path, args: argparse.Namespace) -> FeatureStore:
    """The float16 store of the shared and generated videos in `work`: reused when made by the same recipe."""
    names = gather_videos(work / "videos", shared_videos_folder(), args.generated, args.seed)
    encoder = encoder_config(args.preset, args.dino, args.vae, args.seed)
    recipe = {"videos": names, "dino": encoder.dino_id, "vae": encoder.vae_id, "seed": args.seed,
              "chunk_videos": args.chunk_videos}
    path, marker = work / "features.zarr", work / "features.json"
    if path.exists() and marker.exists() and json.loads(marker.read_text()) == recipe:
        print(f"reusing the feature store {path} ({len(names)} videos, dino {encoder.dino_id})")
        return FeatureStore.open(path)
    shutil.rmtree(path, ignore_errors=True)
    marker.unlink(missing_ok=True)
    started = time.perf_counter()
    store = precompute(work / "videos", path, encoder, args.device, args.chunk_videos)
    marker.write_text(json.dumps(recipe))
    print(f"precomputed {len(names)} videos into {path} in {time.perf_counter() - started:.1f} s "
          f"(dino {encoder.dino_id}, vae {encoder.vae_id})")
    return store


def ok_rows(store: FeatureStore) -> np.ndarray:
    rows = np.flatnonzero(store.read_status() == OK)
    if rows.size == 0:
        raise SystemExit(f"store {store.path} has no ok rows: see `fvlm store info {store.path}`")
    return rows


# ---- 1. the int8 codec's error ---------------------------------------------------------------------------


def int8_round_trip(features: np.ndarray) -> np.ndarray:
    """What the training device gets from an int8 store: (codes * scale + offset) as float16 (features_on_device)."""
    codes, scale, offset = quantise_int8(features)
    return dequantise_int8(codes, scale, offset).astype(np.float16)


def worst_channels(features: np.ndarray, restored: np.ndarray, top: int = 3) -> list[dict[str, float]]:
    """The channels that carry most of the squared error: their share of it, their own relative L2, and their
    range over their standard deviation (worst video): a few far values stretch a channel's int8 step for all."""
    x = features.astype(np.float32)  # (n, F, N, D)
    squared = ((restored.astype(np.float32) - x) ** 2).sum(axis=(0, 1, 2), dtype=np.float64)  # (D,)
    own = np.sqrt(squared / np.maximum((x ** 2).sum(axis=(0, 1, 2), dtype=np.float64), 1e-24))
    spread = np.ptp(x, axis=(1, 2)) / np.maximum(x.std(axis=(1, 2)), 1e-12)  # (n, D)
    order = np.argsort(squared)[::-1][:top]
    return [{"channel": int(d), "error_share": float(squared[d] / squared.sum()), "relative_l2": float(own[d]),
             "range_over_std": float(spread[:, d].max())} for d in order]


def codec_report(features: np.ndarray, video_ids: list[str]) -> dict[str, Any]:
    """The int8 codec's error on (n, F, N, D) float16 features: overall (codec_error), per video, worst channels."""
    restored = int8_round_trip(features)
    overall = codec_error(features, restored)
    videos = []
    for i, video_id in enumerate(video_ids):
        one = codec_error(features[i:i + 1], restored[i:i + 1])
        videos.append({"video_id": str(video_id), "relative_l2": one["relative_l2_max"],
                       "cosine_min": one["cosine_min"], "cosine_q001": one["cosine_q001"]})
    met = {"relative_l2_max": overall["relative_l2_max"] <= TARGET_RELATIVE_L2,
           "cosine_min": overall["cosine_min"] >= TARGET_COSINE,
           "cosine_q001": overall["cosine_q001"] >= TARGET_COSINE}
    return {**overall, "met": met, "videos": videos, "channels": worst_channels(features, restored)}


def print_errors(report: dict[str, Any]) -> None:
    """One line per video, the worst channels, and the overall figures against the targets."""
    print("int8 codec error (what the training device reads back, against the float16 features):")
    for video in report["videos"]:
        print(f"  {video['video_id'][:48]:48s} rel L2 {100 * video['relative_l2']:6.3f} %  cosine min "
              f"{video['cosine_min']:.6f}  0.1 % quantile {video['cosine_q001']:.6f}")
    for channel in report["channels"]:
        print(f"  channel {channel['channel']:3d}: {100 * channel['error_share']:5.1f} % of the squared error, "
              f"its own rel L2 {100 * channel['relative_l2']:.3f} %, range / std {channel['range_over_std']:.1f}")
    met = report["met"]
    print(f"  all videos: rel L2 max {100 * report['relative_l2_max']:.3f} % (mean "
          f"{100 * report['relative_l2_mean']:.3f} %; target <= {100 * TARGET_RELATIVE_L2:g} %: "
          f"{'met' if met['relative_l2_max'] else 'NOT met'}), cosine min {report['cosine_min']:.6f} "
          f"({'met' if met['cosine_min'] else 'NOT met'}), 0.1 % quantile {report['cosine_q001']:.6f} "
          f"({'met' if met['cosine_q001'] else 'NOT met'}; target >= {TARGET_COSINE})")


# ---- 2. store layouts: bytes per video and read rate -------------------------------------------------------


def rewrite(source: FeatureStore, rows: np.ndarray, path: Path | str, codec: str, compression: str,
            chunk_videos: int) -> FeatureStore:
    """Rows `rows` of a float16 store (repeats allowed) in a new store of another layout, chunk by chunk; `path`
    may be an object-store URL (s3://bucket/x.zarr: one PUT per chunk, as precompute writes it)."""
    if source.feature_codec != "float16":
        raise ValueError(f"rewrite reads float16 stores; {source.path} is {source.feature_codec}")
    if not is_url(str(path)):
        shutil.rmtree(path, ignore_errors=True)
    columns = [source.read_column(name)[rows].tolist() for name in ("video_id", "caption", "source", "duration_s")]
    config = StoreConfig(chunk_videos=chunk_videos, compression=compression, feature_codec=codec)
    store = FeatureStore.create(path, *columns, attrs=source.attrs, config=config, shapes=source.shapes)
    intervals = source.read_column("frame_interval_s")[rows]
    for chunk in range(store.num_chunks):
        span = store.chunk_rows(chunk)
        picked = rows[span.start:span.stop]
        features = np.asarray(source.group["dino_features"].oindex[picked])  # each source chunk read once
        latents = np.asarray(source.group["latents"].oindex[picked])
        n = len(picked)
        store.write_chunk(chunk, ChunkRows(features, latents, np.full(n, OK, np.uint8), [""] * n,
                                           frame_interval_s=intervals[span.start:span.stop]))
    return store


def folder_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())


def stored_bytes(store: FeatureStore) -> dict[str, float]:
    """Bytes per video of a local store: all of it, and the feature arrays alone (with int8's scales)."""
    root = Path(store.path)
    features = sum(folder_bytes(root / name) for name in ("dino_features", "dino_scale", "dino_offset")
                   if (root / name).exists())
    return {"bytes_per_video": folder_bytes(root) / store.num_videos,
            "feature_bytes_per_video": features / store.num_videos}


def read_rate(path: Path, batch: int, frames: int, reads: int, repeats: int = 3) -> tuple[float, str]:
    """BatchReader samples/s over batches of the store's first `batch` rows (best of `repeats`), its read mode."""
    from storage.loader import BatchReader

    reader = BatchReader(path, frames)
    rows = np.arange(min(batch, FeatureStore.open(path).num_videos))
    features = np.empty((rows.size, *reader.feature_shape), reader.feature_dtype)  # (B, T, N, D)
    latents = np.empty((rows.size, *reader.latent_shape), np.float16)  # (B, T, C, S, S)
    reader.read(rows, features, latents)  # page cache and zarr's metadata, once
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        for _ in range(reads):
            reader.read(rows, features, latents)
        best = min(best, time.perf_counter() - started)
    return reads * rows.size / best, reader.mode


def measure_layouts(source: FeatureStore, rows: np.ndarray, folder: Path, copies: int = 1, batch: int = 0,
                    frames: int = 16, reads: int = 3) -> list[dict[str, Any]]:
    """Each layout of LAYOUTS: the rows (`copies` times over, so that a batch of `batch` distinct rows spans
    several chunks as in training) rewritten into it; bytes per video and, when batch > 0, BatchReader samples/s.
    Chunks hold min(K, rows) videos, so a raw layout carries no padding when the rows fill whole chunks."""
    rows = np.tile(rows, copies)
    chunk_videos = min(source.chunk_videos, rows.size)
    results = []
    for codec, compression in LAYOUTS:
        store = rewrite(source, rows, folder / f"{codec}-{compression}.zarr", codec, compression, chunk_videos)
        result: dict[str, Any] = {"layout": f"{codec}/{compression}", "codec": codec, "compression": compression,
                                  **stored_bytes(store)}
        if batch > 0:
            result["samples_per_s"], result["mode"] = read_rate(Path(store.path), batch, frames, reads)
        results.append(result)
    raw = results[0]["feature_bytes_per_video"]  # float16/none
    for result in results:
        result["feature_ratio"] = result["feature_bytes_per_video"] / raw
    return results


def print_layouts(results: list[dict[str, Any]], what: str) -> None:
    print(f"store layouts, {what}:")
    for r in results:
        rate = f"  {r['samples_per_s']:8.1f} samples/s ({r['mode']} reads)" if "samples_per_s" in r else ""
        print(f"  {r['layout']:14s} {r['bytes_per_video'] / 2**20:7.3f} MiB/video, features "
              f"{r['feature_bytes_per_video'] / 2**20:7.3f} MiB/video ({r['feature_ratio']:.3f} of float16/none)"
              + rate)


# ---- 3. the training effect: the demo twice ---------------------------------------------------------------


def run_demo(workdir: Path, codec: str, seed: int, videos_from: Path | None,
             chunk_minutes: float | None) -> dict[str, Any]:
    """`fvlm demo --feature-codec CODEC` from scratch in `workdir` (its generated videos are kept, or copied from
    `videos_from`); the held-out ratio from RUN/state.json, and the minutes it took."""
    for name in ("features.zarr", "run"):
        shutil.rmtree(workdir / name, ignore_errors=True)
    if videos_from is not None and not (workdir / "videos").exists() and videos_from.exists():
        shutil.copytree(videos_from, workdir / "videos")  # the same seed makes the same videos: skip making them
    workdir.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    env.setdefault("PREFECT_HOME", str(workdir.parent / "prefect-home"))  # not the user's Prefect database
    command = [sys.executable, "-m", "flows.cli", "demo", "--workdir", str(workdir), "--feature-codec", codec,
               "--demo.seed", str(seed)] + (["--max-minutes", str(chunk_minutes)] if chunk_minutes else [])
    started = time.perf_counter()
    with open(workdir / "demo.log", "w") as out:
        done = subprocess.run(command, cwd=REPO_ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
    minutes = (time.perf_counter() - started) / 60
    if done.returncode != 0:
        raise SystemExit(f"`{' '.join(command)}` failed ({done.returncode}): see {workdir / 'demo.log'}")
    state = json.loads((workdir / "run" / "state.json").read_text())
    shutil.rmtree(workdir / "features.zarr")  # 1.5-3 GB; the run folder, the log and the videos stay
    print(f"demo, {codec} features: held-out ratio {state['ratio']:.4f} after {state['step']} steps "
          f"({state['reason']}), {minutes:.1f} min")
    return {"ratio": state["ratio"], "steps": state["step"], "reason": state["reason"], "minutes": minutes}


def run_training(work: Path, seed: int, chunk_minutes: float | None) -> dict[str, dict[str, Any]]:
    """The demo with float16, then with int8 features. Its training chunks are timed, so on a busy machine the two
    may train different numbers of steps: then the ratios are not comparable, and this says so."""
    first = work / "demo-float16"
    runs = {"float16": run_demo(first, "float16", seed, None, chunk_minutes),
            "int8": run_demo(work / "demo-int8", "int8", seed, first / "videos", chunk_minutes)}
    if runs["float16"]["steps"] != runs["int8"]["steps"]:
        print(f"the two demos trained {runs['float16']['steps']} and {runs['int8']['steps']} steps (timed chunks "
              f"on a busy machine): their ratios are not comparable; rerun with a larger --demo-minutes so that both "
              f"train the demo's whole schedule")
    return runs


# ---- the summary -------------------------------------------------------------------------------------------


def _size_cell(result: dict[str, Any] | None) -> str:
    if result is None:
        return "-"
    return (f"{result['bytes_per_video'] / 2**20:.3f} (features {result['feature_bytes_per_video'] / 2**20:.3f}: "
            f"{result['feature_ratio']:.3f} of float16/none)")


def _rate_cell(result: dict[str, Any] | None) -> str:
    return "-" if result is None or "samples_per_s" not in result else f"{result['samples_per_s']:.1f}"


def _ratio_cell(result: dict[str, Any] | None) -> str:
    return "-" if result is None else f"{result['feature_ratio']:.3f}"


def markdown_table(errors: dict[str, Any], layouts: dict[str, list[dict[str, Any]]], batch: int,
                   training: dict | None) -> str:
    """float16 against int8, one measure a row."""
    groups = {name: {r["layout"]: r for r in results} for name, results in layouts.items()}
    met = errors["met"]
    rows = [
        ("rel L2 per video, max / mean (target <= 1 %)", "0 (reference)",
         f"{100 * errors['relative_l2_max']:.3f} % / {100 * errors['relative_l2_mean']:.3f} % "
         f"({'met' if met['relative_l2_max'] else 'NOT met'})"),
        ("token cosine, min / 0.1 % quantile (target >= 0.999)", "1 (reference)",
         f"{errors['cosine_min']:.5f} / {errors['cosine_q001']:.5f} "
         f"({'met' if met['cosine_min'] and met['cosine_q001'] else 'NOT met'})"),
    ]
    for compression in ("none", "zstd", "blosc"):
        rows.append((f"MiB per video, {compression}, all ok videos",
                     *(_size_cell(groups["all"].get(f"{codec}/{compression}")) for codec in ("float16", "int8"))))
    for compression in ("zstd", "blosc"):
        rows.append((f"features / float16-none, {compression}, shared real videos only",
                     *(_ratio_cell(groups.get("shared", {}).get(f"{codec}/{compression}"))
                       for codec in ("float16", "int8"))))
    for compression in ("none", "zstd", "blosc"):
        rows.append((f"BatchReader samples/s, {compression}, batch {batch}",
                     *(_rate_cell(groups["all"].get(f"{codec}/{compression}")) for codec in ("float16", "int8"))))
    if training:
        rows.append(("demo held-out ratio, same seed (--training)",
                     *(f"{training[codec]['ratio']:.4f} after {training[codec]['steps']} steps"
                       for codec in ("float16", "int8"))))
    lines = ["| measure | float16 | int8 |", "|---|---|---|"]
    return "\n".join(lines + [f"| {a} | {b} | {c} |" for a, b, c in rows])


def summary(store: FeatureStore, ok: int, errors: dict[str, Any], layouts: dict[str, list[dict[str, Any]]],
            training: dict | None) -> dict[str, Any]:
    """The last line's JSON."""
    def rounded(result: dict[str, Any]) -> dict[str, Any]:
        return {k: round(v, 1) if isinstance(v, float) and k != "feature_ratio" else v for k, v in result.items()}

    return {"store": store.path, "ok_videos": ok, "dino": store.attrs.get("dino", {}).get("id"),
            "error": {k: v for k, v in errors.items() if k not in ("videos", "channels")},
            "worst_channels": errors["channels"],
            "layouts": {name: [rounded(r) for r in results] for name, results in layouts.items()},
            "training": training, "cpus": os.cpu_count(), "load_avg": round(os.getloadavg()[0], 2)}


def measure_groups(store: FeatureStore, rows: np.ndarray, ids: list[str], work: Path,
                   args: argparse.Namespace) -> dict[str, list[dict[str, Any]]]:
    """The layouts of all ok videos (with read rates), and of the shared real videos alone (bytes only): the
    generated videos' static backgrounds give tokens that repeat exactly from frame to frame, which zstd finds."""
    layouts = {"all": measure_layouts(store, rows, work / "layouts", args.copies, args.batch, args.frames,
                                      args.reads)}
    print_layouts(layouts["all"], f"all {rows.size} ok videos' features (dino {store.attrs.get('dino', {}).get('id')})"
                                  f", {args.copies} copies of each, batches of {args.batch}")
    shared = rows[[i for i, video_id in enumerate(ids) if video_id.startswith("shared-")]]
    if shared.size:
        layouts["shared"] = measure_layouts(store, shared, work / "layouts-shared")
        print_layouts(layouts["shared"], f"the {shared.size} shared real videos alone")
    for folder in ("layouts", "layouts-shared"):  # about 1.3 GB, measured: not kept
        shutil.rmtree(work / folder, ignore_errors=True)
    return layouts


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, default=None,
                        help=f"videos, store and layouts (default: {default_workdir()}; reused when it matches)")
    parser.add_argument("--generated", type=int, default=5, help="generated videos beside the shared ones")
    parser.add_argument("--preset", choices=["demo", "full"], default="demo",
                        help="demo: tiny random encoders; full: real weights (--dino, --vae)")
    parser.add_argument("--dino", default=None, help="DINOv2 folder or hub id; implies --preset full")
    parser.add_argument("--vae", default=None, help="SD-VAE folder or hub id (full preset; default its hub id, "
                                                    "which needs the network or the Hugging Face cache)")
    parser.add_argument("--device", default="cpu", help="encoder device: cpu, cuda, auto")
    parser.add_argument("--chunk-videos", type=int, default=8, help="K: videos per store chunk")
    parser.add_argument("--frames", type=int, default=16, help="frames per sample the reader takes")
    parser.add_argument("--copies", type=int, default=8,
                        help="the ok videos are written this many times over, so that a batch spans several chunks")
    parser.add_argument("--batch", type=int, default=64, help="rows per BatchReader read (as the loader's batch)")
    parser.add_argument("--reads", type=int, default=3, help="batches read per round of the read-rate measure")
    parser.add_argument("--training", action="store_true",
                        help="also run `fvlm demo` with float16 and with int8 features (slow: ~2 x 6 min)")
    parser.add_argument("--demo-minutes", type=float, default=None,
                        help="wall-clock budget of each demo training chunk (default: the demo's); large enough, "
                             "both demos train the whole 600-step schedule and their ratios compare step for step")
    parser.add_argument("--seed", type=int, default=0, help="seed of the generated videos, encoders and demos")
    args = parser.parse_args(argv)
    if args.dino:
        args.preset = "full"
    return args


def main() -> None:
    args = parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    work = args.workdir or default_workdir()
    started = time.perf_counter()
    store = feature_store(work, args)
    rows = ok_rows(store)
    ids = [str(v) for v in store.read_column("video_id")[rows]]
    features = np.asarray(store.group["dino_features"].oindex[rows])  # (n, F, N, D) float16
    print(f"{rows.size} ok videos of {store.num_videos} ({', '.join(ids)}); load average {os.getloadavg()[0]:.2f}")
    errors = codec_report(features, ids)
    print_errors(errors)
    layouts = measure_groups(store, rows, ids, work, args)
    training = run_training(work, args.seed, args.demo_minutes) if args.training else None
    print(f"\n{markdown_table(errors, layouts, args.batch, training)}\n")
    print(f"({time.perf_counter() - started:.0f} s, load average {os.getloadavg()[0]:.2f}, {os.cpu_count()} CPUs)")
    print(json.dumps(summary(store, int(rows.size), errors, layouts, training)))


if __name__ == "__main__":
    main()
