"""The training chain as a Prefect flow (the session's test harness server): chunks until a decision."""

import base64
import io
import re

import pytest
from PIL import Image

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


def all_flow_artifacts(flow_run_id):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    runs = ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id]))
    with get_client(sync_client=True) as client:
        return sorted(client.read_artifacts(artifact_filter=runs), key=lambda a: a.created)


def embedded_pngs(markdown):
    """The pictures a markdown holds as data: URIs, decoded (a broken one fails here)."""
    uris = re.findall(r"\(data:image/png;base64,([A-Za-z0-9+/=]+)\)", markdown)
    return [Image.open(io.BytesIO(base64.b64decode(uri))) for uri in uris]


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

    # One current view per flow run: a single train-ratio-history (not one per chunk), and a progress artifact
    # updated in place after each chunk.
    found = all_flow_artifacts(state.state_details.flow_run_id)
    assert [a.key for a in found if a.key] == ["train-ratio-history"], [(a.key, a.type) for a in found]
    progress = [a for a in found if a.type == "progress"]
    assert len(progress) == 1 and progress[0].data == 100.0 and "data:image/png;base64," in progress[0].description
    report = found[[a.key for a in found].index("train-ratio-history")]
    markdown = report.data
    assert "Held-out ratio across chunks" in markdown and "wandb disabled" in markdown
    assert "**stopped** after 3 chunks: budget: 3 chunks" in markdown and "budget: 3 chunks" in report.description
    table = [line.split("|")[1].strip() for line in markdown.splitlines() if line.startswith("| ")]
    assert table == ["chunk", "1", "2", "3"]
    images = embedded_pngs(markdown)
    assert len(images) == 1 + 1  # the ratio plot and the latest chunk's attention picture (attention_videos=1)
    assert all(image.format == "PNG" and image.width >= 560 for image in images)
    assert len(embedded_pngs(report.description)) == 1 and images[0].size == (760, 600)
    assert len(markdown) < 400_000 and len(report.description) < 20_000

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
