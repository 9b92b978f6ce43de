"""`fvlm train` and `fvlm demo`."""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any


def add_train_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="timed training chunks from the latest checkpoint until the ratio converges")
    p.add_argument("--store", required=True, help="feature store made by `fvlm precompute` or `store import-pt`")
    p.add_argument("--run-dir", required=True, help="run folder: checkpoints, history.jsonl, state.json, wandb")
    p.add_argument("--preset", choices=["demo", "full"], default="full", help="model size and recipe")
    p.add_argument("--max-minutes", type=float, default=None, help="wall-clock budget of each chunk")
    p.add_argument("--max-chunks", type=int, default=None,
                   help="stop once the run folder has this many chunks (counts earlier invocations too)")
    p.add_argument("--resume", default=None, help="start the first chunk from this checkpoint file")
    p.add_argument("--device", default=None, help="auto, cpu, cuda, cuda:1 ...")
    p.add_argument("--batch-size", type=int, default=None, help="samples per step (seed: 64)")
    p.add_argument("--total-steps", type=int, default=None, help="length of the whole run's lr schedule")
    p.add_argument("--wandb", choices=["auto", "online", "offline", "disabled"], default=None,
                   help="auto: online when an API key is configured, else offline files in the run folder")


def add_demo_parser(sub: argparse._SubParsersAction) -> None:
    from tasks.samples import DEMO_VIDEOS

    p = sub.add_parser("demo", help="the whole pipeline on generated videos, on a CPU, in a few minutes")
    p.add_argument("--workdir", default=None,
                   help="where the videos, store and run folder go (default fvlm-demo; fvlm-demo-control with "
                        "--control none)")
    p.add_argument("--videos", type=int, default=DEMO_VIDEOS, help="sample videos to generate")
    p.add_argument("--max-minutes", type=float, default=0.75, help="wall-clock budget of each training chunk")
    p.add_argument("--max-chunks", type=int, default=6, help="most training chunks")
    p.add_argument("--control", choices=["cue", "none"], default="cue",
                   help="cue: videos where the foveated query can see what the next frame depends on (the ratio "
                        "should end well above 1); none: the negative control, the same videos without the cue "
                        "(the ratio should end at 1)")


def run_train(args: argparse.Namespace) -> int:
    from flows.train import train_flow
    from tasks.training import TrainConfig

    config = TrainConfig.preset_config(args.preset)
    updates: dict[str, Any] = {}
    if args.device:
        updates["device"] = args.device
    if args.total_steps:
        updates["total_steps"] = args.total_steps
    if args.batch_size:
        updates["loader"] = config.loader.model_copy(update={"batch_size": args.batch_size})
    if args.wandb:
        updates["wandb"] = config.wandb.model_copy(update={"mode": args.wandb})
    config = config.model_copy(update=updates)
    result = train_flow(store=args.store, run_dir=args.run_dir, preset=args.preset, max_minutes=args.max_minutes,
                        max_chunks=args.max_chunks, resume=args.resume, train=config)
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
    out = demo_flow(workdir=args.workdir, videos=args.videos, max_minutes=args.max_minutes,
                    max_chunks=args.max_chunks, control=args.control)
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
