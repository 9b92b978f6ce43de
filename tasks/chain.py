"""Prefect tasks of the training chain: one chunk, the convergence decision, the reports, the pictures."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from uuid import UUID

from prefect import get_run_logger, runtime, task
from prefect.artifacts import create_markdown_artifact, create_progress_artifact, update_progress_artifact
from prefect.cache_policies import NONE
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId, ArtifactFilterType

from storage.run_folder import RunFolder
from tasks.chain_report import chain_markdown, ratio_plot, report_description
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


def wandb_link(run_dir: str, run_id: str, config: TrainConfig) -> str:
    mode = resolve_wandb_mode(config.wandb.mode)
    if mode == "online":
        entity = f"{config.wandb.entity}/" if config.wandb.entity else ""
        return f"https://wandb.ai/{entity}{config.wandb.project}/runs/{run_id}"
    if mode == "offline":
        return f"offline run `{run_id}` in `{Path(run_dir) / 'wandb'}` (upload with `wandb sync {Path(run_dir) / 'wandb'}`)"
    return "wandb disabled"


@task(name="report-chunks", cache_policy=NONE)
def report_chunks_task(run_dir: str, decision: dict[str, Any], config: TrainConfig,
                       rule: ConvergenceConfig | None = None, final: bool = True) -> None:
    """The run's view of the chain: after a chunk that is not this flow run's last, a progress artifact updated in
    place; after its last, the `train-ratio-history` markdown (plot, decision, table, attention pictures)."""
    history = read_history(run_dir)
    if not history:
        return
    d, rule = Decision(**decision), rule or ConvergenceConfig()
    if not final or _progress_id() is not None:
        publish_progress(run_dir, history, d, rule)
    if not final:
        return
    pictures = RunFolder(run_dir).pictures(history[-1]["chunk"])
    link = wandb_link(run_dir, history[-1].get("wandb_run_id", ""), config)
    markdown, description = chain_markdown(run_dir, history, d, rule.window, rule.tolerance_pct, link, pictures)
    create_markdown_artifact(key="train-ratio-history", markdown=markdown, description=description)
    get_run_logger().info("train-ratio-history: %d chunks, %d kB", len(history), len(markdown) // 1024)


def publish_progress(run_dir: str, history: list[dict[str, Any]], decision: Decision,
                     rule: ConvergenceConfig) -> None:
    """This flow run's progress artifact (chunks done of the chunk budget), created once and updated in place,
    its description a thumbnail of the ratio plot and the decision."""
    budget = rule.max_chunks or max(decision.chunks_done, 1)
    progress = min(100.0, 100.0 * decision.chunks_done / budget)
    description = report_description(run_dir, decision, ratio_plot(history, rule.window, rule.tolerance_pct))
    existing = _progress_id()
    if existing is None:
        create_progress_artifact(progress=progress, description=description)
    else:
        update_progress_artifact(existing, progress=progress, description=description)


def _progress_id() -> UUID | None:
    """The progress artifact this flow run's chain already has, if any."""
    flow_run_id = runtime.flow_run.id
    if flow_run_id is None:
        return None
    with get_client(sync_client=True) as client:
        found = client.read_artifacts(artifact_filter=ArtifactFilter(
            flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id]), type=ArtifactFilterType(any_=["progress"])))
    return found[0].id if found else None
