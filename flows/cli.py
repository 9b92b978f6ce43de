"""`fvlm`: the command line. Each command runs the Prefect flow of the same name with the same parameters."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from typing import Any, Callable, Iterable, Sequence

from flows.cli_options import Section, add_config_options, build_config, config_flag
from tasks.runtime import PROGRESS_ENV

log = logging.getLogger("fvlm")
SERVER_CONSOLE_CLASS = "flows.server_logging.ServerConsoleHandler"  # (a string: importing it imports prefect)


def encoder_section() -> Section:
    from model.encoder_config import EncoderConfig

    return Section("encoder", EncoderConfig)


def layout_section() -> Section:
    from storage.store import StoreConfig

    return Section("layout", StoreConfig)


def precompute_sections() -> tuple[Section, Section, Section, Section]:
    """The configs `fvlm precompute` builds: encoder, listing, decode, layout."""
    from tasks.decode import DecodeConfig
    from tasks.listing import ListingConfig

    return encoder_section(), Section("listing", ListingConfig), Section("decode", DecodeConfig), layout_section()


def add_precompute_options(p: argparse.ArgumentParser) -> None:
    encoder, listing, decode, layout = precompute_sections()
    p.add_argument("--manifest", required=True, help="CSV / Parquet / JSON-lines manifest, or a folder of videos")
    p.add_argument("--store", required=True, help="feature store: a folder, or an object-store URL such as "
                                                     "s3://bucket/features.zarr (a Zarr group; created if absent)")
    config_flag(p, "--preset", encoder, "preset", dest="preset",
                help="full: real DINOv2 + SD-VAE weights; demo: tiny random encoders (CPU, no network)")
    config_flag(p, "--min-duration", listing, "min_duration_s")
    config_flag(p, "--max-duration", listing, "max_duration_s")
    config_flag(p, "--limit", listing, "limit")
    config_flag(p, "--dino", encoder, "dino")
    config_flag(p, "--vae", encoder, "vae")
    p.add_argument("--device", default=None, help="encoder device: auto (cuda when present; the default), cpu, "
                                                  "cuda, cuda:1 ...")
    config_flag(p, "--decode-workers", decode, "workers")
    config_flag(p, "--decode-timeout", decode, "timeout_s")
    config_flag(p, "--sampling", decode, "sampling")
    config_flag(p, "--window-frames", decode, "window_frames")
    config_flag(p, "--chunk-videos", layout, "chunk_videos", help="videos per store chunk (new stores only)")
    config_flag(p, "--feature-codec", layout, "feature_codec")
    config_flag(p, "--compression", layout, "compression")
    config_flag(p, "--batch-frames", encoder, "batch_frames")
    for section in (encoder, listing, decode, layout):
        add_config_options(p, section)


def add_store_options(p: argparse.ArgumentParser) -> None:
    encoder, layout = encoder_section(), layout_section()
    store_sub = p.add_subparsers(dest="store_command", required=True)
    info = store_sub.add_parser("info", help="counts, failures, listing summary, sizes, attributes")
    info.add_argument("store", help="folder or URL (s3://...) of the store")
    info.add_argument("--json", action="store_true", help="print the report as JSON")
    imp = store_sub.add_parser("import-pt", help="convert a seed-format folder of .pt files into a store")
    imp.add_argument("folder")
    imp.add_argument("store")
    config_flag(imp, "--chunk-videos", layout, "chunk_videos", help="videos per store chunk")
    config_flag(imp, "--feature-codec", layout, "feature_codec")
    config_flag(imp, "--dino-id", encoder, "dino", dest="dino_id", help="encoder the .pt files came from")
    config_flag(imp, "--vae-id", encoder, "vae", dest="vae_id", help="VAE the .pt files came from")
    add_config_options(imp, layout)


def infra_section() -> Section:
    from flows.infra import InfraConfig

    return Section("infra", InfraConfig)


def add_prefect_options(p: argparse.ArgumentParser) -> None:
    infra = infra_section()
    prefect_sub = p.add_subparsers(dest="prefect_command", required=True)
    setup = prefect_sub.add_parser("setup", help="process work pool, one work queue per GPU, zombie-run automation "
                                                 "(idempotent; uses PREFECT_API_URL)")
    config_flag(setup, "--gpus", infra, "gpus")
    config_flag(setup, "--pool", infra, "pool", help="work pool name (prefect.yaml deploys to fvlm-gpu)")
    config_flag(setup, "--heartbeat-seconds", infra, "heartbeat_seconds")
    config_flag(setup, "--zombie-after", infra, "zombie_after_seconds",
                help="seconds without a heartbeat before a running flow run is marked Crashed")
    add_config_options(setup, infra)


def add_train_options(p: argparse.ArgumentParser) -> None:
    from flows.cli_train import add_train_options as add

    add(p)


def add_demo_options(p: argparse.ArgumentParser) -> None:
    from flows.cli_train import add_demo_options as add

    add(p)


# name: (help, what adds its options). A command's options are built only when it runs or shows its help, so
# `fvlm --help` imports no config (some of which sit beside torch or prefect).
COMMANDS: dict[str, tuple[str, Callable[[argparse.ArgumentParser], None]]] = {
    "precompute": ("list, filter, decode and encode videos into a feature store", add_precompute_options),
    "store": ("inspect or import feature stores", add_store_options),
    "prefect": ("set up the Prefect server for GPU hosts", add_prefect_options),
    "train": ("timed training chunks from the latest checkpoint until the ratio converges", add_train_options),
    "demo": ("the whole pipeline on generated videos, on a CPU, in a few minutes", add_demo_options),
}


def build_parser(commands: Iterable[str] | None = None) -> argparse.ArgumentParser:
    """The command line; the options of `commands` only (None: of every command)."""
    parser = argparse.ArgumentParser(prog="fvlm", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)
    wanted = set(COMMANDS if commands is None else commands)
    for name, (help_text, add_options) in COMMANDS.items():
        command = sub.add_parser(name, help=help_text)
        if name in wanted:
            add_options(command)
    return parser


def command_of(argv: Sequence[str]) -> str | None:
    """The command an argument list runs (the first word that names one), or None (e.g. `fvlm --help`)."""
    return next((word for word in argv if word in COMMANDS), None)


def run_precompute(args: argparse.Namespace) -> int:
    from flows.precompute import precompute_flow

    encoder, listing, decode, layout = precompute_sections()
    configs = dict(encoder=build_config(args, encoder, preset=args.preset), listing=build_config(args, listing),
                   decode=build_config(args, decode), layout=build_config(args, layout))
    device = {"device": args.device} if args.device else {}  # else the flow's default
    info = precompute_flow(manifest=args.manifest, store=args.store, **configs, **device)
    print(format_store_summary(info))
    return 0 if info["pending"] == 0 else 1


def run_store(args: argparse.Namespace) -> int:
    from storage.store import FeatureStore

    if args.store_command == "info":
        info = FeatureStore.open(args.store).info()
        print(json.dumps(info, indent=2, default=str) if args.json else format_store_info(info))
        return 0
    from storage.import_pt import import_pt_folder

    layout = build_config(args, layout_section())
    counts = import_pt_folder(args.folder, args.store, layout, dino_id=args.dino_id, vae_id=args.vae_id)
    print(f"imported {args.folder} -> {args.store}: {counts['ok']} ok, {counts['failed']} failed")
    return 0


def run_prefect(args: argparse.Namespace) -> int:
    from pydantic import ValidationError

    from flows.infra import PrefectSetupError, format_setup, setup_prefect

    try:
        print(format_setup(setup_prefect(build_config(args, infra_section()))))
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
        f"chunks     {info['chunks']} of {info['chunk_videos']} videos, {info['feature_codec']} features, "
        f"compression {attrs.get('compression')}",
        f"disk       {_human(sizes['disk_bytes'])} ({_human(sizes['disk_bytes_per_ok_video'])} per ok video)",
        f"encoders   dino {attrs.get('dino', {}).get('id')}, vae {attrs.get('vae', {}).get('id')}",
        f"frames     {attrs.get('frames')} x {attrs.get('frame_size')} px: {format_sampling(info)}",
    ]
    return "\n".join(lines)


def format_sampling(info: dict[str, Any]) -> str:
    """'24 of the first 72 frames, median 0.104 s apart (36 rows)'."""
    from storage.attrs import SamplingRecord

    spacing = info.get("frame_interval") or {}
    median = spacing.get("median_s")
    apart = f"median {median:.3f} s apart ({spacing['rows']} rows)" if median is not None else "spacing unknown"
    return f"{SamplingRecord.model_validate(info.get('sampling') or {}).describe()}, {apart}"


def _human(n: float | None) -> str:
    if n is None:
        return "n/a"
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1024 or unit == "TB":
            return f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def configure_temporary_server() -> None:
    """Settings of the temporary Prefect server that a command without PREFECT_API_URL starts (a user's own
    environment wins)."""
    # It would send usage telemetry; its heartbeat job also races the run's first writes to the server's SQLite
    # file ("database is locked", a traceback on stderr).
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    # Prefect waits 20 s for it; a fresh database on two busy cores takes longer, and the command failed unrun.
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "90")
    # When it stops, a service cancelled mid-write prints a CancelledError traceback: its console drops those.
    os.environ.setdefault("PREFECT_LOGGING_HANDLERS_CONSOLE_CLASS", SERVER_CONSOLE_CLASS)


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    configure_temporary_server()  # before the parser's configs import prefect, which reads its settings once
    command = command_of(argv)
    args = build_parser([command] if command else []).parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    os.environ.setdefault(PROGRESS_ENV, "1")  # progress bars on a terminal; flows run elsewhere stay quiet
    # httpx logs every request at INFO, full URLs (with any query-string token) included.
    logging.getLogger("httpx").setLevel(logging.WARNING)
    # botocore, aiobotocore and s3fs log request headers (the access key id among them) at DEBUG, under -v too.
    for name in ("botocore", "aiobotocore", "s3fs", "urllib3"):
        logging.getLogger(name).setLevel(logging.INFO)
    from pydantic import ValidationError

    from storage.store import StoreError
    from tasks.listing import ManifestError
    from tasks.samples import DemoCollectionError

    user_errors: tuple[type[BaseException], ...] = (StoreError, ManifestError, FileNotFoundError,
                                                    DemoCollectionError, ValidationError)
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
    except RuntimeError as err:
        if not is_server_start_timeout(err):
            raise
        log.error("%s", SERVER_START_HINT)
        return 2


SERVER_START_HINT = (
    "the temporary Prefect server did not start in time (a busy machine or a fresh database): start one with "
    "`prefect server start` and set PREFECT_API_URL=http://127.0.0.1:4200/api (faster for every command), or "
    "raise PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"
)


def is_server_start_timeout(err: RuntimeError) -> bool:
    """Prefect's error when the temporary server it starts for a command without PREFECT_API_URL does not answer."""
    return "ephemeral Prefect API server" in str(err)


if __name__ == "__main__":
    sys.exit(main())
