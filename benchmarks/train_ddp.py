"""Training throughput of one chunk with nproc = 1 and nproc = 2 (DDP), measured in the same run on the same store.

Each measurement is a real chunk (tasks.training.train_chunk): the loader over a feature store of random values,
the steps, checkpoints, evaluation. samples/s is the chunk's own (global batch x steps / the training loop's
seconds, start-up and evaluation left out); `wall_s` adds the process start-up and evaluation. On a CPU the
ranks share the cores (each rank takes cores/nproc threads), so two processes gain only what one process leaves
unused; on a GPU host each rank has its own GPU.

    python benchmarks/train_ddp.py --preset demo --steps 12 --device cpu
    python benchmarks/train_ddp.py --preset demo --steps 50 --device cuda --nprocs 1 2

The last line printed is JSON: {"nproc": {"1": samples/s, "2": samples/s}, "speedup": ..., ...}.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from model.config import LLMShape, ModelConfig  # noqa: E402
from storage.loader import LoaderConfig  # noqa: E402
from storage.store import OK, ChunkRows, FeatureShapes, FeatureStore, StoreConfig  # noqa: E402
from tasks.decode import DecodeConfig  # noqa: E402
from tasks.train_config import TrainConfig, WandbConfig  # noqa: E402
from tasks.training import train_chunk  # noqa: E402


def model_for(preset: str) -> ModelConfig:
    """demo: the demo preset's model; tiny: the tests' model (milliseconds a step: measures the overheads)."""
    if preset == "demo":
        return ModelConfig.for_preset("demo")
    return ModelConfig(llm=None, llm_shape=LLMShape.tiny(), feature_dim=8, num_tokens=5, query_dim=8,
                       latent_size=4, head_hidden=16, head_channels=(4, 8, 8))


def make_store(path: Path, model: ModelConfig, videos: int, frames: int) -> str:
    """A store of random features with the model's shapes and the demo preset's encoder ids."""
    encoders = TrainConfig.for_preset("demo").expected_encoders()
    shapes = FeatureShapes(frames=frames, tokens=model.num_tokens, feature_dim=model.feature_dim,
                           latent_shape=(model.latent_channels, model.latent_size, model.latent_size))
    ids = [f"vid{i:04d}" for i in range(videos)]
    store = FeatureStore.create(
        str(path), ids, ids, [f"missing/{i}.mp4" for i in ids], [30.0] * videos,
        {"dino": {"id": encoders["dino"]}, "vae": {"id": encoders["vae"]}, "frame_size": 256, "listing": {},
         "sampling": DecodeConfig().sampling_record()},
        StoreConfig(chunk_videos=8), shapes,
    )
    rng = np.random.default_rng(0)
    for chunk in range(store.num_chunks):
        n = len(store.chunk_rows(chunk))
        store.write_chunk(chunk, ChunkRows(
            features=rng.standard_normal((n, frames, model.num_tokens, model.feature_dim)).astype(np.float16),
            latents=rng.standard_normal((n, frames, *shapes.latent_shape)).astype(np.float16),
            status=np.full(n, OK, np.uint8), error=[""] * n, frame_interval_s=np.full(n, 0.125, np.float32)))
    return str(path)


def measure(store: str, root: Path, config: TrainConfig, nproc: int) -> dict[str, float]:
    started = time.monotonic()
    result = train_chunk(store, root / f"run-{nproc}", config.model_copy(update={"nproc": nproc}))
    return {"samples_per_s": round(result.samples_per_s, 2), "loop_s": result.seconds, "steps": result.step,
            "wall_s": round(time.monotonic() - started, 2)}


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", choices=["demo", "tiny"], default="demo")
    p.add_argument("--batch", type=int, default=8, help="global batch (divisible by every nproc)")
    p.add_argument("--steps", type=int, default=12, help="optimizer steps per measurement")
    p.add_argument("--videos", type=int, default=64)
    p.add_argument("--device", default="cpu")
    p.add_argument("--nprocs", type=int, nargs="+", default=[1, 2])
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads of the nproc=1 run (default: torch's, all cores); the ranks of a job take "
                        "cores/nproc each")
    p.add_argument("--workdir", default=None, help="where the store and run folders go (default: a temp folder)")
    return p.parse_args()


def main() -> None:
    args = parse_args()
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    os.environ.setdefault("FVLM_PROGRESS", "0")
    root = Path(args.workdir or tempfile.mkdtemp(prefix="train-ddp-"))
    model = model_for(args.preset)
    frames = 16
    store = make_store(root / "store.zarr", model, args.videos, frames)
    config = TrainConfig(
        preset="demo", model=model, device=args.device, max_steps_per_chunk=args.steps, total_steps=10_000,
        loader=LoaderConfig(batch_size=args.batch, frames=frames, buffer_chunks=4, num_workers=0,
                            eval_fraction=0.1),
        warmup_steps=5, log_every=max(1, args.steps // 2), checkpoint_every=10_000, eval_batches=1,
        attention_videos=0, wandb=WandbConfig(mode="disabled"))
    results = {str(n): measure(store, root, config, n) for n in args.nprocs}
    for n, r in results.items():
        print(f"nproc {n}: {r['samples_per_s']:.1f} samples/s ({r['steps']} steps of {args.batch} in "
              f"{r['loop_s']:.1f} s; {r['wall_s']:.1f} s with start-up and evaluation)")
    rates = {n: r["samples_per_s"] for n, r in results.items()}
    first = rates[str(args.nprocs[0])]
    print(json.dumps({"nproc": rates, "speedup": {n: round(v / first, 3) for n, v in rates.items()},
                      "details": results, "preset": args.preset, "batch": args.batch, "device": args.device,
                      "cpus": os.cpu_count(), "threads_nproc1": args.threads, "load": os.getloadavg()[0],
                      "host": platform.node()}))


if __name__ == "__main__":
    main()
