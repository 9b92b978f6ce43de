"""`fvlm train` and `fvlm demo`."""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

from flows.cli_options import Section, add_config_options, build_config, config_flag, flow_parameters


def train_sections() -> tuple[Section, Section]:
    """The configs `fvlm train` builds: the training recipe and the convergence rule, both from the preset."""
    from tasks.convergence import ConvergenceConfig
    from tasks.train_config import TrainConfig

    return Section("train", TrainConfig), Section("convergence", ConvergenceConfig)


def add_train_options(p: argparse.ArgumentParser) -> None:
    train, convergence = train_sections()
    p.add_argument("--store", required=True, help="feature store made by `fvlm precompute` or `store import-pt`: a "
                                                   "folder or a URL (s3://bucket/features.zarr)")
    p.add_argument("--run-dir", required=True, help="run folder: checkpoints, history.jsonl, state.json, wandb")
    config_flag(p, "--preset", train, "preset", dest="preset", help="model size and recipe")
    config_flag(p, "--max-minutes", train, "max_minutes", help="wall-clock budget of each chunk")
    config_flag(p, "--max-chunks", convergence, "max_chunks",
                help="stop once the run folder has this many chunks (counts earlier invocations too)")
    p.add_argument("--resume", default=None, help="start the first chunk from this checkpoint file")
    config_flag(p, "--device", train, "device")
    config_flag(p, "--batch-size", train, "loader.batch_size")
    config_flag(p, "--nproc", train, "nproc", help="processes that train each chunk together on this host: one per "
                                                   "visible GPU (DDP), or gloo on a CPU; --batch-size must be a "
                                                   "multiple of it")
    config_flag(p, "--total-steps", train, "total_steps")
    config_flag(p, "--wandb", train, "wandb.mode")
    add_config_options(p, train)
    add_config_options(p, convergence)


def demo_section() -> Section:
    from flows.demo import demo_flow

    return Section("demo", flow_parameters(demo_flow))


def add_demo_options(p: argparse.ArgumentParser) -> None:
    demo = demo_section()
    for flag in ("--workdir", "--videos", "--max-minutes", "--max-chunks", "--control", "--feature-codec"):
        config_flag(p, flag, demo, flag[2:].replace("-", "_"))
    add_config_options(p, demo)


def run_train(args: argparse.Namespace) -> int:
    from flows.train import train_flow

    train, convergence = train_sections()
    config, rule = build_config(args, train, args.preset), build_config(args, convergence, args.preset)
    result = train_flow(store=args.store, run_dir=args.run_dir, preset=args.preset, resume=args.resume,
                        train=config, convergence=rule)
    print(format_training(result, args.run_dir))
    return 0


def format_training(result: dict[str, Any], run_dir: str) -> str:
    status = "converged" if result.get("converged") else ("stopped" if result.get("done") else "continuing")
    ratio = result.get("ratio")
    ratio_text = f"{ratio:.4f} ({result.get('improvement_pct'):+.2f} %)" if ratio is not None else "n/a"
    return "\n".join([
        f"training   {result.get('chunks_done')} chunks, {result.get('step')} steps, {status}: {result.get('reason')}",
        f"ratio      {ratio_text}  (loss_coarse / loss_fine on held-out videos; > 1: the foveated pass wins)",
        f"run folder {run_dir} (checkpoints, history.jsonl, state.json, attention/, wandb/)",
    ])


def run_demo(args: argparse.Namespace) -> int:
    from flows.cli import format_store_summary
    from flows.demo import demo_flow

    started = time.monotonic()
    out = demo_flow(**build_config(args, demo_section()).model_dump(exclude_unset=True))
    root = Path(out["workdir"]).resolve()
    run_dir = root / "run"
    pictures = sorted((run_dir / "attention").glob("*.png"))
    print("\n".join([
        "", "fvlm demo finished in %.1f min" % ((time.monotonic() - started) / 60), "",
        format_store_summary(out["store"]),
        format_training(out["training"], str(run_dir)),
        f"videos     {root / 'videos'} (manifest {out['manifest']})",
        f"wandb      {run_dir / 'wandb'} (offline; `wandb sync` uploads it)",
        f"pictures   {len(pictures)} attention pictures in {run_dir / 'attention'}"
        + (f", latest {pictures[-1].name}" if pictures else ""),
    ]))
    return 0
