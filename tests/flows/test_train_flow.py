"""The training chain as a Prefect flow (the session's test harness server): chunks until a decision."""

import json

import pytest

from flows.train import chunk_key, train_flow
from tasks.convergence import ConvergenceConfig, read_state
from tasks.training import read_history
from tests.tasks.test_training import make_tiny_store, tiny_config

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return make_tiny_store(tmp_path_factory.mktemp("store") / "s.zarr")


def flow_artifacts(flow_run_id):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    with get_client(sync_client=True) as client:
        found = client.read_artifacts(artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id])))
    return {a.key: a for a in sorted(found, key=lambda a: a.created) if a.key}  # the latest of each key


def test_chain_runs_chunks_until_the_budget_and_records_why(store, tmp_path, prefect_harness):
    rule = ConvergenceConfig(min_steps=0, window=4, tolerance_pct=0.01, max_chunks=3)
    state = train_flow(store=store, run_dir=str(tmp_path), preset="demo",
                       train=tiny_config(max_steps_per_chunk=3), convergence=rule, return_state=True)
    assert state.is_completed()
    result = state.result()
    assert result["done"] and not result["converged"] and result["reason"] == "budget: 3 chunks"
    history = read_history(tmp_path)
    assert [h["chunk"] for h in history] == [1, 2, 3] and [h["step"] for h in history] == [3, 6, 9]
    saved = read_state(tmp_path)
    assert saved["chunks_done"] == 3 and saved["reason"] == "budget: 3 chunks" and saved["converged"] is False
    assert saved["ratio"] == pytest.approx(history[-1]["ratio"])

    artifacts = flow_artifacts(state.state_details.flow_run_id)
    table = artifacts["train-chunks"].data
    rows = json.loads(table) if isinstance(table, str) else table
    assert [r["chunk"] for r in rows] == [1, 2, 3] and rows[-1]["decision"] == "stop: budget: 3 chunks"
    assert {"steps", "samples/s", "loss_fine", "loss_coarse", "ratio", "improvement_pct"} <= set(rows[0])
    markdown = artifacts["train-ratio-history"].data
    assert "Held-out ratio across chunks" in markdown and "wandb disabled" in markdown
    assert "attention" in markdown and ".png" in markdown

    # A second invocation with a larger budget continues the same run: steps keep increasing, no chunk repeats.
    more = ConvergenceConfig(min_steps=0, window=4, tolerance_pct=0.01, max_chunks=5)
    result = train_flow(store=store, run_dir=str(tmp_path), preset="demo", train=tiny_config(max_steps_per_chunk=3),
                        convergence=more)
    history = read_history(tmp_path)
    assert [h["chunk"] for h in history] == [1, 2, 3, 4, 5]
    assert [h["step"] for h in history] == [3, 6, 9, 12, 15]
    assert result["reason"] == "budget: 5 chunks"


def test_chain_stops_when_the_ratio_converges(store, tmp_path, prefect_harness):
    # A loose tolerance: the held-out ratio of a barely trained tiny model moves little between chunks.
    rule = ConvergenceConfig(min_steps=0, window=2, tolerance_pct=50.0, max_chunks=6)
    result = train_flow(store=store, run_dir=str(tmp_path), preset="demo", train=tiny_config(max_steps_per_chunk=2),
                        convergence=rule)
    assert result["converged"] and result["chunks_done"] == 2
    assert result["reason"].startswith("ratio changed") and "< 50.0 %" in result["reason"]


def test_a_converged_run_does_nothing(store, tmp_path, prefect_harness):
    rule = ConvergenceConfig(min_steps=0, window=2, tolerance_pct=50.0, max_chunks=6)
    train_flow(store=store, run_dir=str(tmp_path), preset="demo", train=tiny_config(max_steps_per_chunk=2),
               convergence=rule)
    checkpoints = sorted(p.name for p in tmp_path.glob("checkpoint-*.pt"))
    history = (tmp_path / "history.jsonl").read_text()
    again = train_flow(store=store, run_dir=str(tmp_path), preset="demo", train=tiny_config(max_steps_per_chunk=2),
                       convergence=rule)
    assert again["already_done"] and again["converged"]
    assert (tmp_path / "history.jsonl").read_text() == history
    assert sorted(p.name for p in tmp_path.glob("checkpoint-*.pt")) == checkpoints
    assert read_state(tmp_path)["reason"] == again["reason"]


def test_chunk_keys_name_the_folder_and_the_chunk(tmp_path):
    a, b = chunk_key(str(tmp_path / "run"), 3), chunk_key(str(tmp_path / "other" / "run"), 3)
    assert a.startswith("run-") and a.endswith("-chunk-3") and a != b
    assert chunk_key(str(tmp_path / "run"), 3) == a and chunk_key(str(tmp_path / "run"), 4) != a


def test_pictures_that_cannot_be_drawn_fail_their_own_task_and_the_chain_goes_on(store, tmp_path, prefect_harness):
    """The pictures are the chain's own task: a file where the attention folder should be makes it fail (a real
    OSError), the flow logs a warning and trains its next chunk. The control: the task itself did fail."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    (tmp_path / "attention").write_text("not a folder")
    rule = ConvergenceConfig(min_steps=0, window=4, tolerance_pct=0.01, max_chunks=2)
    state = train_flow(store=store, run_dir=str(tmp_path), preset="demo", train=tiny_config(max_steps_per_chunk=2),
                       convergence=rule, return_state=True)
    assert state.is_completed() and state.result()["reason"] == "budget: 2 chunks"
    assert [h["chunk"] for h in read_history(tmp_path)] == [1, 2]
    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[state.state_details.flow_run_id])))
    pictures = [r for r in runs if r.name.startswith("attention-pictures")]
    assert len(pictures) == 2 and all(r.state.is_failed() for r in pictures)
    assert all(r.state.is_completed() for r in runs if r.name.startswith("train-chunk"))
