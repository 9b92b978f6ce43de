"""`fvlm`: the command line. Each command runs the Prefect flow of the same name with the same parameters."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any, Sequence

from tasks.runtime import PROGRESS_ENV

log = logging.getLogger("fvlm")


def _add_precompute(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("precompute", help="list, filter, decode and encode videos into a feature store")
    p.add_argument("--manifest", required=True, help="CSV / Parquet / JSON-lines manifest, or a folder of videos")
    p.add_argument("--store", required=True, help="feature store path (a Zarr group; created if absent)")
    p.add_argument("--preset", choices=["demo", "full"], default="full",
                   help="full: real DINOv2 + SD-VAE weights; demo: tiny random encoders (CPU, no network)")
    p.add_argument("--min-duration", type=float, default=20.0, help="shortest kept video, seconds (inclusive)")
    p.add_argument("--max-duration", type=float, default=60.0, help="longest kept video, seconds (inclusive)")
    p.add_argument("--limit", type=int, default=None, help="keep at most N videos")
    p.add_argument("--dino", default=None, help="DINOv2 hub id or local folder (full preset)")
    p.add_argument("--vae", default=None, help="SD-VAE hub id or local folder (full preset)")
    p.add_argument("--device", default="auto", help="encoder device: auto, cpu, cuda, cuda:1 ...")
    p.add_argument("--decode-workers", type=int, default=None, help="decoder processes (default 2)")
    p.add_argument("--decode-timeout", type=float, default=None, help="seconds before a stuck video is given up")
    p.add_argument("--sampling", choices=["window", "spread"], default=None,
                   help="window (default, the seed's): 24 of the first --window-frames frames, about 0.1 s apart; "
                        "spread: 24 frames over the whole video (another experiment)")
    p.add_argument("--window-frames", type=int, default=None,
                   help="frames decoded from the start of each video with --sampling window (default 72, the seed's)")
    p.add_argument("--chunk-videos", type=int, default=None, help="videos per store chunk (new stores only)")
    p.add_argument("--batch-frames", type=int, default=None, help="frames per encoder call")


def _add_store(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("store", help="inspect or import feature stores")
    store_sub = p.add_subparsers(dest="store_command", required=True)
    info = store_sub.add_parser("info", help="counts, failures, listing summary, sizes, attributes")
    info.add_argument("store")
    info.add_argument("--json", action="store_true", help="print the report as JSON")
    imp = store_sub.add_parser("import-pt", help="convert a seed-format folder of .pt files into a store")
    imp.add_argument("folder")
    imp.add_argument("store")
    imp.add_argument("--chunk-videos", type=int, default=8, help="videos per store chunk")
    imp.add_argument("--dino-id", default="facebook/dinov2-small", help="encoder the .pt files came from")
    imp.add_argument("--vae-id", default="stabilityai/sd-vae-ft-mse", help="VAE the .pt files came from")


def _add_prefect(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("prefect", help="set up the Prefect server for GPU hosts")
    prefect_sub = p.add_subparsers(dest="prefect_command", required=True)
    setup = prefect_sub.add_parser("setup", help="process work pool, one work queue per GPU, zombie-run automation "
                                                 "(idempotent; uses PREFECT_API_URL)")
    setup.add_argument("--gpus", type=int, default=1, help="GPUs per host: work queues gpu-0 .. gpu-(N-1)")
    setup.add_argument("--pool", default="fvlm-gpu", help="work pool name (prefect.yaml deploys to fvlm-gpu)")
    setup.add_argument("--heartbeat-seconds", type=int, default=30, help="flow-run heartbeat period of the pool")
    setup.add_argument("--zombie-after", type=int, default=90,
                       help="seconds without a heartbeat before a running flow run is marked Crashed")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fvlm", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_precompute(sub)
    _add_store(sub)
    _add_prefect(sub)
    from flows.cli_train import add_demo_parser, add_train_parser

    add_train_parser(sub)
    add_demo_parser(sub)
    return parser


def run_precompute(args: argparse.Namespace) -> int:
    from flows.precompute import precompute_flow
    from model.encoders import EncoderConfig
    from storage.store import StoreConfig
    from tasks.decode import DecodeConfig
    from tasks.listing import ListingConfig

    encoder = EncoderConfig(preset=args.preset, **_given(dino=args.dino, vae=args.vae, batch_frames=args.batch_frames))
    listing = ListingConfig(min_duration_s=args.min_duration, max_duration_s=args.max_duration, limit=args.limit)
    decode = DecodeConfig(**_given(workers=args.decode_workers, timeout_s=args.decode_timeout,
                                   sampling=args.sampling, window_frames=args.window_frames))
    layout = StoreConfig(**_given(chunk_videos=args.chunk_videos))
    info = precompute_flow(manifest=args.manifest, store=args.store, encoder=encoder, listing=listing,
                           decode=decode, layout=layout, device=args.device)
    print(format_store_summary(info))
    return 0 if info["pending"] == 0 else 1


def run_store(args: argparse.Namespace) -> int:
    from storage.store import FeatureStore, StoreConfig

    if args.store_command == "info":
        info = FeatureStore.open(args.store).info()
        print(json.dumps(info, indent=2, default=str) if args.json else format_store_info(info))
        return 0
    from storage.import_pt import import_pt_folder

    counts = import_pt_folder(args.folder, args.store, StoreConfig(chunk_videos=args.chunk_videos),
                              dino_id=args.dino_id, vae_id=args.vae_id)
    print(f"imported {args.folder} -> {args.store}: {counts['ok']} ok, {counts['failed']} failed")
    return 0


def run_prefect(args: argparse.Namespace) -> int:
    from pydantic import ValidationError

    from flows.infra import InfraConfig, PrefectSetupError, format_setup, setup_prefect

    try:
        config = InfraConfig(pool=args.pool, gpus=args.gpus, heartbeat_seconds=args.heartbeat_seconds,
                             zombie_after_seconds=args.zombie_after)
        print(format_setup(setup_prefect(config)))
    except (ValidationError, PrefectSetupError) as err:
        log.error("%s", err)
        return 2
    return 0


def format_store_summary(info: dict[str, Any]) -> str:
    listing = info.get("listing", {})
    dropped = {k: v for k, v in listing.get("dropped", {}).items() if v}
    lines = [
        f"store      {info['path']}",
        f"listed     {listing.get('rows')} rows, kept {listing.get('kept')}, dropped {sum(dropped.values())} {dropped}",
        f"videos     {info['ok']} ok, {info['failed']} failed, {info['pending']} pending",
    ]
    lines += [f"  failed   {n} x {reason}" for reason, n in info["failed_by_reason"].items()]
    return "\n".join(lines)


def format_store_info(info: dict[str, Any]) -> str:
    sizes = info["sizes"]
    attrs = info["attributes"]
    lines = [
        format_store_summary(info),
        f"chunks     {info['chunks']} of {info['chunk_videos']} videos",
        f"disk       {_human(sizes['disk_bytes'])} ({_human(sizes['disk_bytes_per_ok_video'])} per ok video)",
        f"encoders   dino {attrs.get('dino', {}).get('id')}, vae {attrs.get('vae', {}).get('id')}",
        f"frames     {attrs.get('frames')} x {attrs.get('frame_size')} px: {format_sampling(info)}",
    ]
    return "\n".join(lines)


def format_sampling(info: dict[str, Any]) -> str:
    """'24 of the first 72 frames, median 0.104 s apart (36 rows)'."""
    from tasks.decode import describe_window

    spacing = info.get("frame_interval") or {}
    median = spacing.get("median_s")
    apart = f"median {median:.3f} s apart ({spacing['rows']} rows)" if median is not None else "spacing unknown"
    return f"{describe_window(info.get('sampling') or {})}, {apart}"


def _human(n: float | None) -> str:
    if n is None:
        return "n/a"
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1024 or unit == "TB":
            return f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def _given(**values: Any) -> dict[str, Any]:
    """The options the user gave (None = keep the config's default)."""
    return {k: v for k, v in values.items() if v is not None}


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    os.environ.setdefault(PROGRESS_ENV, "1")  # progress bars on a terminal; flows run elsewhere stay quiet
    # The temporary server started without PREFECT_API_URL would send usage telemetry; its heartbeat job also
    # races the run's first writes to the server's SQLite file ("database is locked", a traceback on stderr).
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    # httpx logs every request at INFO, full URLs (with any query-string token) included.
    logging.getLogger("httpx").setLevel(logging.WARNING)
    from storage.store import StoreError
    from tasks.listing import ManifestError
    from tasks.samples import DemoCollectionError

    user_errors: tuple[type[BaseException], ...] = (StoreError, ManifestError, FileNotFoundError,
                                                    DemoCollectionError)
    if args.command in ("train", "demo"):  # (imports torch: only for the commands that train)
        from storage.checkpoints import CheckpointError
        from storage.runlock import RunLockedError
        from tasks.training import StoreMismatchError, TrainingDivergedError

        user_errors += (StoreMismatchError, CheckpointError, RunLockedError, TrainingDivergedError)

    handlers = {"precompute": run_precompute, "store": run_store, "prefect": run_prefect}
    from flows.cli_train import run_demo, run_train

    handlers.update(train=run_train, demo=run_demo)
    from tqdm.contrib.logging import logging_redirect_tqdm

    try:
        with logging_redirect_tqdm():  # log lines print above the progress bar instead of through it
            return handlers[args.command](args)
    except user_errors as err:
        log.error("%s", err)  # what is wrong and what to do, without a traceback
        return 2


if __name__ == "__main__":
    sys.exit(main())
