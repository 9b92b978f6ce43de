"""The demo: sample videos -> WebVid-style manifest -> precompute -> training chain, on a CPU, in minutes.

The videos are a positive control of the foveation gain (tasks/cue_scene.py): the next frame's colour is that of
one small patch which only a query made after seeing the previous frame can single out, so the held-out ratio
must end well above 1. `control="none"` runs the negative control, the same videos without the cue, whose ratio
must end at 1.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from prefect import flow, task
from prefect.cache_policies import NONE

from flows.precompute import precompute_flow
from flows.train import train_flow
from model.encoders import EncoderConfig
from storage.store import StoreConfig
from tasks.samples import DEMO_VIDEOS, ensure_demo_collection


def demo_workdir(control: Literal["cue", "none"]) -> str:
    """Where a demo goes by default: the negative control beside the demo, never over it."""
    return "fvlm-demo" if control == "cue" else "fvlm-demo-control"


@task(name="make-demo-videos", cache_policy=NONE)
def make_demo_videos_task(folder: str, videos: int, seed: int, control: Literal["cue", "none"]) -> str:
    """Generate the sample videos and their manifest (kept when the folder already holds the same collection)."""
    return str(ensure_demo_collection(folder, videos, seed, control))


@flow(name="demo", log_prints=False)
def demo_flow(workdir: str | None = None, videos: int = DEMO_VIDEOS, max_minutes: float = 0.75, max_chunks: int = 6,
              seed: int = 0, control: Literal["cue", "none"] = "cue",
              feature_codec: Literal["float16", "int8"] = "float16") -> dict[str, Any]:
    """The whole pipeline on embedded defaults: no weights, no network, a CPU.

    Args:
        workdir: folder of the sample videos, the store and the run folder (relative: to the project folder);
            default fvlm-demo, or fvlm-demo-control for the negative control
        videos: sample videos to generate
        max_minutes: wall-clock budget of each training chunk
        max_chunks: most training chunks
        seed: seed of the sample videos and of the demo encoders
        control: cue: videos whose next frame a foveated query can predict better (the ratio should end well
            above 1); none: the negative control, the same videos without the cue (the ratio should end at 1)
        feature_codec: how the store keeps the DINO features: float16, or int8 (half the bytes; see
            storage/feature_codec.py)
    """
    root = Path(workdir or demo_workdir(control))
    manifest = make_demo_videos_task(str(root / "videos"), videos, seed, control)
    store = str(root / "features.zarr")
    info = precompute_flow(manifest=manifest, store=store, encoder=EncoderConfig.for_preset("demo", seed=seed),
                           layout=StoreConfig(feature_codec=feature_codec), device="cpu")
    decision = train_flow(store=store, run_dir=str(root / "run"), preset="demo", max_minutes=max_minutes,
                          max_chunks=max_chunks)
    return {"workdir": str(root), "manifest": manifest, "control": control, "store": info, "training": decision}
