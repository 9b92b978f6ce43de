"""Prefect tasks of the training chain: one chunk, the convergence decision, the reports, the pictures."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NONE

from storage.run_folder import RunFolder
from tasks.convergence import ConvergenceConfig, Decision, decide, write_state
from tasks.metrics import resolve_wandb_mode
from tasks.training import TrainConfig, draw_chunk_pictures, read_history, train_chunk


@task(name="train-chunk", cache_policy=NONE)
def train_chunk_task(store: str, run_dir: str, config: TrainConfig, resume: str | None = None) -> dict[str, Any]:
    """Train one timed chunk from the latest checkpoint (or `resume`), checkpoint and evaluate it."""
    result = train_chunk(store, run_dir, config, resume=resume)
    get_run_logger().info("chunk %d: steps %d -> %d in %.0f s, held-out ratio %.4f (%s)", result.chunk,
                          result.start_step, result.step, result.seconds, result.eval["ratio"], result.stopped_by)
    return result.as_dict()


@task(name="attention-pictures", cache_policy=NONE)
def attention_pictures_task(store: str, run_dir: str, config: TrainConfig) -> list[str]:
    """Draw where the coarse and the fine query look, for the first held-out videos, under the latest checkpoint."""
    paths = draw_chunk_pictures(store, run_dir, config)
    get_run_logger().info("%d attention pictures in %s", len(paths), RunFolder(run_dir).attention_dir)
    return [str(p) for p in paths]


@task(name="decide-convergence", cache_policy=NONE)
def decide_task(run_dir: str, config: ConvergenceConfig) -> dict[str, Any]:
    """Decide from history.jsonl whether the chain stops, and record it in state.json."""
    decision = decide(read_history(run_dir), config)
    write_state(run_dir, decision)
    get_run_logger().info("decision after %d chunks: %s (%s)", decision.chunks_done,
                          "stop" if decision.done else "continue", decision.reason)
    return decision.as_dict()


def chunk_table(history: list[dict[str, Any]], decision: Decision) -> list[dict[str, Any]]:
    rows = []
    for i, h in enumerate(history):
        last = i == len(history) - 1
        rows.append({
            "chunk": h["chunk"], "steps": h["step"], "samples/s": round(h.get("samples_per_s", 0.0), 1),
            "loss_fine": round(h["loss_fine"], 6), "loss_coarse": round(h["loss_coarse"], 6),
            "ratio": round(h["ratio"], 4), "improvement_pct": round(h["improvement_pct"], 2),
            "decision": (("stop: " if decision.done else "continue: ") + decision.reason) if last else "continue",
        })
    return rows


def ratio_markdown(history: list[dict[str, Any]], decision: Decision, wandb_link: str,
                   pictures: list[str]) -> str:
    """The ratio across chunks as a small text chart, the decision, the wandb run and the attention pictures."""
    lines = ["# Held-out ratio across chunks", "",
             "`ratio = loss_coarse / loss_fine`; above 1 the foveated (fine) pass predicts the next frame better.", "",
             "| chunk | step | ratio | improvement % | |", "|---:|---:|---:|---:|:--|"]
    ratios = [h["ratio"] for h in history]
    low, high = min(ratios + [1.0]), max(ratios + [1.0])
    for h in history:
        width = 0 if high == low else int(round(30 * (h["ratio"] - low) / (high - low)))
        lines.append(f"| {h['chunk']} | {h['step']} | {h['ratio']:.4f} | {h['improvement_pct']:+.2f} | "
                     f"`{'#' * width}` |")
    status = "converged" if decision.converged else ("stopped" if decision.done else "continuing")
    lines += ["", f"**Decision:** {status}: {decision.reason}", "", f"**wandb:** {wandb_link}"]
    if pictures:
        lines += ["", "**Attention pictures** (top row: static query, bottom row: foveated query):", ""]
        lines += [f"- `{p}`" for p in pictures]
    return "\n".join(lines)


def wandb_link(run_dir: str, run_id: str, config: TrainConfig) -> str:
    mode = resolve_wandb_mode(config.wandb.mode)
    if mode == "online":
        entity = f"{config.wandb.entity}/" if config.wandb.entity else ""
        return f"https://wandb.ai/{entity}{config.wandb.project}/runs/{run_id}"
    if mode == "offline":
        return f"offline run `{run_id}` in `{Path(run_dir) / 'wandb'}` (upload with `wandb sync {Path(run_dir) / 'wandb'}`)"
    return "wandb disabled"


@task(name="report-chunks", cache_policy=NONE)
def report_chunks_task(run_dir: str, decision: dict[str, Any], config: TrainConfig) -> None:
    """Artifacts: the table of chunks and the markdown history of the ratio, with the latest pictures."""
    history = read_history(run_dir)
    if not history:
        return
    d = Decision(**decision)
    wandb_run_id = history[-1].get("wandb_run_id", "")
    pictures = [str(p) for p in RunFolder(run_dir).pictures(history[-1]["chunk"])]
    create_table_artifact(key="train-chunks", table=chunk_table(history, d),
                          description=f"Training chunks of {run_dir}")
    create_markdown_artifact(key="train-ratio-history",
                             markdown=ratio_markdown(history, d, wandb_link(run_dir, wandb_run_id, config), pictures),
                             description=f"Held-out ratio of {run_dir}")
