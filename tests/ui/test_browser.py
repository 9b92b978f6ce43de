"""What a user sees in the Prefect UI, checked in a real browser (headless Chromium over the DevTools protocol).

A Prefect server with its UI on loopback, the deployments of prefect.yaml, then two runs the way users start them
(`fvlm precompute` on demo videos plus one served by a source that answers 503 once, `fvlm train` for two short
chunks on that store). Each page is opened and checked for what it must show: pictures count only once the
browser has decoded them (`complete` and a natural width), not when the page merely loaded.

Screenshots go to the test's tmp folder; with FVLM_UI_SHOTS=<folder> (`make ui-check` uses docs/ui) the ones the
README shows are written there too. Skipped when no Chromium is found (FVLM_CHROMIUM, or chromium on PATH).
"""

from __future__ import annotations

import csv
import os
import re
import shutil
import sys
import time
import uuid
from pathlib import Path

import pytest

from tests.flows.test_deployments import POOL, REPO_ROOT, FlakySource, PrefectServer, Service
from tests.ui.browser import Browser, Page, find_chromium, missing_reason

CHROMIUM = find_chromium()

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(CHROMIUM is None, reason=missing_reason() if CHROMIUM is None else ""),
]

DOC_SHOT_BYTES = 400_000  # a screenshot kept for the README is made a palette PNG above this size


class UiServer(PrefectServer):
    """`prefect server start` with its UI on, the UI told where its API is (else it calls port 4200)."""

    def start(self, timeout_s: float = 180) -> None:
        env = dict(self.client_env, PREFECT_HOME=str(self.root / "server-home"), PREFECT_UI_API_URL=self.api_url,
                   PREFECT_SERVER_UI_ENABLED="true", PREFECT_SERVER_ANALYTICS_ENABLED="false",
                   PREFECT_SERVER_UI_SHOW_PROMOTIONAL_CONTENT="false", PREFECT_SERVER_LOGGING_LEVEL="WARNING",
                   PREFECT_SERVER_SERVICES_SCHEDULER_ENABLED="false")
        server = self.spawn("server", [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1",
                                       "--port", str(self.port)], env)
        self.wait_until_healthy(server, timeout_s)

    @property
    def ui(self) -> str:
        return self.api_url.removesuffix("/api") + "/v2"  # Prefect 3.9 serves its current UI under /v2


def demo_manifest(folder: Path, source: FlakySource, served_folder: Path) -> Path:
    """The demo's cue-scene videos (24 rows, some dropped by the filter) and one more that `source` serves from
    `served_folder`."""
    from tasks.samples import ensure_demo_collection

    manifest = ensure_demo_collection(folder, 24, seed=0, control="cue")
    with manifest.open(newline="") as f:
        rows = list(csv.DictReader(f))
    first = rows[0]
    served = served_folder / "served" / "remote.mp4"
    served.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(folder / first["contentUrl"], served)
    rows.append({**first, "videoid": "remote", "contentUrl": f"{source.url}/served/remote.mp4?run={uuid.uuid4().hex}",
                 "name": "the first video again, downloaded from a source that answers 503 once"})
    with manifest.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(first))
        writer.writeheader()
        writer.writerows(rows)
    return manifest


# `fvlm prefect setup` and `prefect deploy --all` in one process, as the README has users run them.
DEPLOY = """
import subprocess, sys
pool = sys.argv[1]
subprocess.run([sys.executable, "-m", "flows.cli", "prefect", "setup", "--gpus", "1", "--pool", pool], check=True)
subprocess.run([sys.executable, "-m", "prefect", "--no-prompt", "deploy", "--all"], check=True)
"""


@pytest.fixture(scope="module")
def ui_runs(tmp_path_factory):
    """Server, deployments, a precompute with a retried download and a two-chunk training run; the ids to open."""
    from prefect.client.schemas.filters import FlowFilter, FlowFilterName, TaskRunFilter, TaskRunFilterName

    root = tmp_path_factory.mktemp("ui")
    server = UiServer(root)
    served = root / "http"
    served.mkdir()
    source = FlakySource(served)
    timings: dict[str, float] = {}
    try:
        started = time.monotonic()
        server.start()
        timings["server"] = time.monotonic() - started
        # deploying (14 s) runs while the videos are made and encoded
        deploy = Service("deploy", [sys.executable, "-c", DEPLOY, POOL], server.client_env, root, cwd=REPO_ROOT)
        server.services.append(deploy)
        manifest = demo_manifest(root / "videos", source, served)
        store, run_dir = root / "features.zarr", root / "run"
        fvlm = [sys.executable, "-m", "flows.cli"]
        server.run([*fvlm, "precompute", "--manifest", str(manifest), "--store", str(store), "--preset", "demo",
                    "--chunk-videos", "4"])
        timings["precompute"] = time.monotonic() - started - sum(timings.values())
        server.run([*fvlm, "train", "--store", str(store), "--run-dir", str(run_dir), "--preset", "demo",
                    "--max-minutes", "0.1", "--max-chunks", "2", "--wandb", "offline"])
        timings["train"] = time.monotonic() - started - sum(timings.values())
        assert deploy.proc.wait(timeout=120) == 0, deploy.tail()
        with server.client() as client:
            def only_run(flow: str):
                (run,) = client.read_flow_runs(flow_filter=FlowFilter(name=FlowFilterName(any_=[flow])))
                return run

            precompute, train = only_run("precompute"), only_run("train")
            (fetch,) = client.read_task_runs(task_run_filter=TaskRunFilter(
                name=TaskRunFilterName(like_="fetch-sources")))
            artifacts = {a.key: a for a in client.read_artifacts() if a.key}
            deployments = {name: client.read_deployment_by_name(f"{name}/{name}").id
                           for name in ("precompute", "train")}
        assert list(source.requests.values()) == [[503, 200]], source.requests
        yield {"server": server, "precompute": precompute, "train": train, "fetch": fetch, "artifacts": artifacts,
               "deployments": deployments, "timings": timings, "root": root}
    finally:
        source.close()
        server.stop()


@pytest.fixture(scope="module")
def browser(ui_runs, shots):
    with Browser(CHROMIUM, ui_runs["root"], failure_dir=shots) as b:
        yield b


@pytest.fixture(scope="module")
def shots(tmp_path_factory):
    folder = tmp_path_factory.mktemp("shots")
    yield folder
    print(f"screenshots in {folder}")


def snap(browser: Browser, shots: Path, name: str, for_docs: bool = False) -> Path:
    """A screenshot in the test's folder; those the README shows also in FVLM_UI_SHOTS when it is set."""
    path = browser.screenshot(shots / f"{name}.png")
    docs = os.environ.get("FVLM_UI_SHOTS")
    if for_docs and docs:
        keep_for_docs(path, Path(docs) / path.name)
    return path


def keep_for_docs(path: Path, dest: Path) -> None:
    from PIL import Image

    dest.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(path, dest)
    if dest.stat().st_size > DOC_SHOT_BYTES:
        Image.open(path).convert("RGB").quantize(256).save(dest, optimize=True)


def test_the_deployments_page_lists_the_projects_deployments(ui_runs, browser, shots):
    page = browser.open(f"{ui_runs['server'].ui}/deployments", ("precompute-chunks", "train", "demo"))
    snap(browser, shots, "deployments")
    assert "fvlm" in page.text  # their tag


def test_the_precompute_run_form_offers_its_parameters(ui_runs, browser, shots):
    url = f"{ui_runs['server'].ui}/deployments/deployment/{ui_runs['deployments']['precompute']}/run"
    page = browser.open(url, ("manifest", "store", "scale_out"))
    snap(browser, shots, "precompute-run-form")
    assert "CSV / Parquet" in page.text  # the parameter's description from the flow's docstring


def test_the_train_run_form_offers_the_plain_knobs(ui_runs, browser, shots):
    url = f"{ui_runs['server'].ui}/deployments/deployment/{ui_runs['deployments']['train']}/run"
    page = browser.open(url, ("batch_size", "lr", "max_minutes", "max_chunks", "preset"))
    snap(browser, shots, "train-run-form", for_docs=True)
    assert "samples per optimizer step" in page.text


def test_a_training_run_shows_its_report_card_with_a_thumbnail(ui_runs, browser, shots):
    url = f"{ui_runs['server'].ui}/runs/flow-run/{ui_runs['train'].id}?tab=Artifacts"
    page = browser.open(url, ("train-ratio-history", "stopped"), pictures=2, min_width=200, settle_s=3)
    snap(browser, shots, "train-run-artifacts", for_docs=True)
    # one card per key and run: the report and the progress artifact, both with the plot's thumbnail
    assert page.text.count("train-ratio-history") == 1 and "budget: 2 chunks" in page.text


def test_the_ratio_history_shows_the_plot_and_attention_pictures(ui_runs, browser, shots):
    report = ui_runs["artifacts"]["train-ratio-history"]
    page = browser.open(f"{ui_runs['server'].ui}/artifacts/artifact/{report.id}",
                        ("Held-out ratio across chunks", "Attention pictures of chunk 2"), pictures=2, min_width=500)
    snap(browser, shots, "ratio-history-top")
    big = page.pictures(500)
    # the 760 x 600 plot, and at least one attention picture (a grid of frames, taller than wide)
    assert any(i["naturalWidth"] == 760 and i["naturalHeight"] == 600 for i in big), big
    assert any(i["naturalHeight"] > i["naturalWidth"] for i in big), big
    assert all(i["shownWidth"] >= 500 for i in big), big  # scaled to the column, not to a thumbnail
    browser.set_viewport(1440, 2000)
    try:
        browser.scroll_to_text("Held-out ratio across chunks")
        snap(browser, shots, "ratio-history", for_docs=True)  # plot, decision, table, the first attention picture
        browser.scroll_to_text("Attention pictures of chunk 2")
        snap(browser, shots, "ratio-history-attention")
    finally:
        browser.set_viewport(*browser.size)


def test_the_precompute_overview_shows_throughput_and_sample_frames(ui_runs, browser, shots):
    overview = ui_runs["artifacts"]["precompute-overview"]
    page = browser.open(f"{ui_runs['server'].ui}/artifacts/artifact/{overview.id}",
                        ("What the store holds", "videos/s this run"), pictures=2, min_width=500)
    browser.set_viewport(1440, 1300)
    try:
        snap(browser, shots, "precompute-overview", for_docs=True)  # the chart and the first sample frames
    finally:
        browser.set_viewport(*browser.size)
    sizes = {(i["naturalWidth"], i["naturalHeight"]) for i in page.pictures(500)}
    assert (760, 340) in sizes, sizes  # the throughput chart
    assert any(w > 760 and h > 150 for w, h in sizes), sizes  # the grid of sample frames with captions
    assert "19 ok, 0 failed, 0 pending" in page.text  # 18 demo videos and the downloaded one


def test_the_precompute_report_counts_the_retried_download(ui_runs, browser, shots):
    report = ui_runs["artifacts"]["precompute-report"]
    # The table shows 10 rows a page: the counts, the rate and the retries come first, the reasons last.
    page = browser.open(f"{ui_runs['server'].ui}/artifacts/artifact/{report.id}",
                        ("Page 1 of 2", "download retries (this run)"))
    snap(browser, shots, "precompute-report")
    assert re.search(r"download retries \(this run\)\s+1\b", page.text), page.text[:2000]
    browser.click('button[aria-label="Go to next page"]')
    browser.wait_for(("Page 2 of 2", "too_short"))
    snap(browser, shots, "precompute-report-page-2")


def test_the_precompute_run_lists_the_download_as_its_own_task_run(ui_runs, browser, shots):
    url = f"{ui_runs['server'].ui}/runs/flow-run/{ui_runs['precompute'].id}?tab=TaskRuns"
    browser.open(url, ("fetch-sources", "encode-chunks", "report-store"), settle_s=3)
    snap(browser, shots, "precompute-task-runs")


def test_the_retried_task_run_shows_its_retries(ui_runs, browser, shots):
    fetch = ui_runs["fetch"]
    assert fetch.run_count == 2 and fetch.state.is_completed()
    page: Page = browser.open(f"{ui_runs['server'].ui}/runs/task-run/{fetch.id}?tab=Logs",
                              ("fetch-sources", "Retry 1/3", "503", "Run Count"))
    snap(browser, shots, "fetch-sources-retries", for_docs=True)
    assert re.search(r"Run Count\s+2\b", page.text), page.text[:3000]
    print(f"timings: {ui_runs['timings']}")
