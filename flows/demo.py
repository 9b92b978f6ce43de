"""The demo: sample videos -> WebVid-style manifest -> precompute -> training chain, on a CPU, in minutes."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import flow, task
from prefect.cache_policies import NONE

from flows.precompute import precompute_flow
from flows.train import train_flow
from model.encoders import EncoderConfig
from tasks.decode import DecodeConfig
from tasks.samples import make_demo_collection


@task(name="make-demo-videos", cache_policy=NONE)
def make_demo_videos_task(folder: str, videos: int, seed: int) -> str:
    """Generate the sample videos and their manifest (kept when they already exist)."""
    manifest = Path(folder) / "manifest.csv"
    if manifest.exists():
        return str(manifest)
    return str(make_demo_collection(folder, n_videos=videos, seed=seed))


@flow(name="demo", log_prints=False)
def demo_flow(workdir: str = "fvlm-demo", videos: int = 48, max_minutes: float = 0.75, max_chunks: int = 8,
              seed: int = 0) -> dict[str, Any]:
    """The whole pipeline on embedded defaults: no weights, no network, a CPU.

    Args:
        workdir: folder of the sample videos, the store and the run folder (relative: to the project folder)
        videos: sample videos to generate
        max_minutes: wall-clock budget of each training chunk
        max_chunks: most training chunks
        seed: seed of the sample videos and of the demo encoders
    """
    root = Path(workdir)
    manifest = make_demo_videos_task(str(root / "videos"), videos, seed)
    store = str(root / "features.zarr")
    info = precompute_flow(manifest=manifest, store=store, encoder=EncoderConfig(preset="demo", seed=seed),
                           decode=DecodeConfig(workers=2), device="cpu")
    decision = train_flow(store=store, run_dir=str(root / "run"), preset="demo", max_minutes=max_minutes,
                          max_chunks=max_chunks)
    return {"workdir": str(root), "manifest": manifest, "store": info, "training": decision}
