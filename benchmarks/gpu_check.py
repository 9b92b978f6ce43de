"""GPU check: the three things only a CUDA device can tell us, in one run of under 8 minutes on an H100/H200.

  a. compiled vs eager training step: the same initial weights and the same 3 random batches, 3 optimizer steps
     through the project's own training step (`Trainer` and its `step`, as the loop calls it), once eager and once with
     the LLM compiled (mode="reduce-overhead", CUDA graphs), both under bf16 autocast; a SmolLM2-135M-shaped
     random LLM. Targets: per-step losses within 2 % of each other, first-step gradients with cosine >= 0.99.
  b. precompute with full-size DINOv2-S and SD-VAE: the hub weights when cached or reachable, else random weights
     from their real configs saved into a temp folder (so the real loading code runs); N generated 596x336 H.264
     videos of 20-30 s; listing, store, decode workers, float16 encoders. Reports videos/s, peak GPU memory, and
     how many rows failed because the encoder output was NaN or inf (a float16 overflow; counted, not fatal).
  c. the training step at batch 64 with the full-size model shapes, compiled, bf16: samples/s and peak memory.

    python benchmarks/gpu_check.py                      # all three parts on the first GPU (make gpu-check)
    python benchmarks/gpu_check.py --part a             # one part
    python benchmarks/gpu_check.py --device cpu --smoke # every code path, shrunk, on a CPU, in well under a minute

--smoke shrinks everything (tiny LLM, batch 2, 2 small videos, tiny random encoders, 1-2 steps); on a CPU it
skips torch.compile (both runs of part a are eager, so its targets are not judged). Readable lines go to stdout
and the last line is JSON: {"device", "smoke", "a", "b", "c", "targets_met", ...}; a part not asked for is
null, a part that raised is {"error": ...} (the other parts still run) and the exit status is 1.
Without a CUDA device (and without --device cpu --smoke) the script exits 2.
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import math
import os
import platform
import sys
import tempfile
import time
import traceback
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from model.encoder_config import FULL_DINO_ID, FULL_VAE_ID  # noqa: E402  (light: pydantic only)
from storage.attrs import VAE_SCALING_FACTOR  # noqa: E402

# Project modules are imported inside the parts: a refusal (no GPU) answers at once, and `--part a` does not
# pay for Prefect and diffusers.

LOSS_TOLERANCE = 0.02  # part a: max relative difference of a step's loss, compiled vs eager
GRAD_COSINE = 0.99  # part a: min cosine between the first step's flattened gradients
DINO_ID, VAE_ID = FULL_DINO_ID, FULL_VAE_ID
SEED_REFERENCE = "seed: 205 samples/s at batch 64 on one RTX 4090, 14.1 GB"


@dataclass(frozen=True)
class Settings:
    """What this run does; the smoke defaults shrink every size."""

    device: str
    smoke: bool
    parts: tuple[str, ...]
    batch: int  # samples per training step (parts a and c)
    check_steps: int  # part a: optimizer steps per variant
    warmup: int  # part c: untimed steps (compilation, CUDA-graph recording)
    steps: int  # part c: timed steps
    videos: int  # part b
    size: tuple[int, int]  # part b: (W, H) of the generated videos
    fps: int
    encoders: str  # part b: auto, hub or random
    decode_workers: int
    chunk_videos: int
    seed: int

    @property
    def compile(self) -> bool:
        """torch.compile only on CUDA: on a CPU it is slow to build and not what is being checked."""
        return self.device == "cuda"


def positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda",
                        help="cuda (the first GPU); cpu only together with --smoke")
    parser.add_argument("--smoke", action="store_true", help="shrink everything: exercise the code paths quickly")
    parser.add_argument("--part", default="a,b,c", help="parts to run, comma-separated: a, b, c")
    parser.add_argument("--batch", type=positive, default=None, help="samples per training step (default 64; smoke 2)")
    parser.add_argument("--check-steps", type=positive, default=None, help="part a: steps per variant (3; smoke 2)")
    parser.add_argument("--warmup", type=int, default=None, help="part c: untimed steps first (5; smoke 1)")
    parser.add_argument("--steps", type=positive, default=None, help="part c: timed steps (20; smoke 2)")
    parser.add_argument("--videos", type=positive, default=None, help="part b: generated videos (32; smoke 2)")
    parser.add_argument("--encoders", choices=["auto", "hub", "random"], default="auto",
                        help="part b: auto = the hub weights if cached or reachable, else random weights from the "
                             "real configs; smoke always uses tiny random ones")
    parser.add_argument("--decode-workers", type=int, default=0,
                        help="part b: decode processes (0: CPU cores - 2; smoke 1)")
    parser.add_argument("--chunk-videos", type=positive, default=None,
                        help="part b: videos per store chunk (8; smoke 1)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random batches and videos")
    return parser


def settings_from(args: argparse.Namespace, parser_error: Callable[[str], None]) -> Settings:
    parts = tuple(p.strip() for p in args.part.split(",") if p.strip())
    if not parts or set(parts) - {"a", "b", "c"}:
        parser_error(f"--part takes a comma-separated subset of a,b,c, got {args.part!r}")
    small = args.smoke

    def pick(value: int | None, full: int, smoke: int) -> int:
        return value if value is not None else (smoke if small else full)

    workers = args.decode_workers or (1 if small else max(1, min(32, (os.cpu_count() or 3) - 2)))
    return Settings(
        device=args.device, smoke=small, parts=parts, batch=pick(args.batch, 64, 2),
        check_steps=pick(args.check_steps, 3, 2), warmup=pick(args.warmup, 5, 1), steps=pick(args.steps, 20, 2),
        videos=pick(args.videos, 32, 2), size=(128, 96) if small else (596, 336), fps=4 if small else 25,
        encoders="random" if small else args.encoders, decode_workers=workers,
        chunk_videos=pick(args.chunk_videos, 8, 1), seed=args.seed,
    )


def refuse_without_cuda(settings: Settings) -> None:
    """Exit 2 with one line unless a GPU is there, or the CPU smoke run was asked for explicitly."""
    if settings.device == "cpu" and not settings.smoke:
        sys.stderr.write("gpu_check: --device cpu needs --smoke (a CPU can only exercise the code paths)\n")
        sys.exit(2)
    if settings.device == "cuda" and not torch.cuda.is_available():
        sys.stderr.write("gpu_check: no CUDA device is visible; this check needs one GPU "
                         "(use --device cpu --smoke to exercise its code paths on a CPU)\n")
        sys.exit(2)


# ---- device helpers ------------------------------------------------------------------------------------


def synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def reset_peak_memory(device: str) -> None:
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()


def peak_memory_gib(device: str) -> float | None:
    """torch.cuda.max_memory_allocated since the last reset, in GiB (None on a CPU)."""
    return round(torch.cuda.max_memory_allocated() / 2**30, 2) if device == "cuda" else None


def release_memory(device: str) -> None:
    """Between parts: drop compiled graphs (and their CUDA-graph pools) and cached blocks."""
    gc.collect()
    torch.compiler.reset()
    if device == "cuda":
        torch.cuda.empty_cache()


def device_name(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name()
    return f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"


# ---- training steps (parts a and c) ----------------------------------------------------------------------


def model_config(settings: Settings):
    """SmolLM2-135M's shape with random weights and the spec's head; smoke: the demo's tiny LLM and head."""
    from model.config import LLMShape, ModelConfig

    if settings.smoke:
        return ModelConfig.for_preset("demo")
    return ModelConfig(llm=None, llm_shape=LLMShape.smollm2_135m())


def make_trainer(settings: Settings, compile_llm: bool):
    """The project's Trainer (model, AdamW, schedule, autocast), as a training chunk builds it."""
    from storage.loader import LoaderConfig
    from tasks.train_config import TrainConfig, WandbConfig
    from tasks.trainer import Trainer

    config = TrainConfig(
        preset="full", model=model_config(settings), loader=LoaderConfig(batch_size=settings.batch),
        device=settings.device, compile_llm=compile_llm, bf16=True, seed=settings.seed,
        # No warm-up: with the recipe's 500 the first steps move the weights by ~lr/500 and the later losses
        # would not show whether the compiled optimizer steps match the eager ones.
        warmup_steps=0, wandb=WandbConfig(mode="disabled"),
    )
    return Trainer(config)


def random_batches(settings: Settings, count: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """`count` batches of float16 features (B, 16, 325, 384) and latents (B, 16, 4, 32, 32), from the seed."""
    config = model_config(settings)
    g = torch.Generator(device=settings.device).manual_seed(settings.seed)
    shape = (settings.batch, 16)
    batches = []
    for _ in range(count):
        features = torch.randn(*shape, config.num_tokens, config.feature_dim, generator=g, device=settings.device)
        s = config.latent_size
        latents = torch.randn(*shape, config.latent_channels, s, s, generator=g, device=settings.device)
        batches.append((features.half(), latents.half()))
    return batches


def train_step(trainer, features: torch.Tensor, latents: torch.Tensor) -> dict[str, torch.Tensor]:
    """One optimizer step exactly as the training loop takes it (OOM split, CUDA-graph step marks included)."""
    return trainer.step(features, latents)


def flat_gradients(model: torch.nn.Module) -> torch.Tensor:
    """Every trainable parameter's gradient in one float32 vector (a copy: CUDA-graph outputs get overwritten).

    The step clipped them in place; a clip scales the whole vector, so the cosine is unchanged.
    """
    grads = [(p.grad if p.grad is not None else torch.zeros_like(p)).detach().flatten().float()
             for p in model.parameters() if p.requires_grad]
    return torch.cat(grads)


# ---- part a: compiled vs eager ---------------------------------------------------------------------------


@dataclass
class StepRecord:
    """Losses of each step and the gradients of the first and last step of one variant."""

    losses: list[float]
    first_grads: torch.Tensor
    last_grads: torch.Tensor
    seconds: float


def run_variant(trainer, batches) -> StepRecord:
    lam = trainer.config.model.lambda_coarse
    losses, grads = [], []
    synchronize(trainer.device.type)
    started = time.perf_counter()
    for i, (features, latents) in enumerate(batches):
        metrics = train_step(trainer, features, latents)
        losses.append(metrics["loss_fine"].item() + lam * metrics["loss_coarse"].item())
        if i in (0, len(batches) - 1):
            grads.append(flat_gradients(trainer.model))
    synchronize(trainer.device.type)
    return StepRecord(losses, grads[0], grads[-1], time.perf_counter() - started)


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.nn.functional.cosine_similarity(a.double(), b.double(), dim=0))


def part_a(settings: Settings) -> dict[str, Any]:
    batches = random_batches(settings, settings.check_steps)
    eager = make_trainer(settings, compile_llm=False)
    compiled = make_trainer(settings, compile_llm=settings.compile)
    compiled.model.load_state_dict(eager.model.state_dict())  # same seed already; made certain here
    if not compiled.graphed:
        print("a: torch.compile skipped (CPU smoke run): both runs are eager, so this only exercises the code "
              "and the targets are not judged")
    ref = run_variant(eager, batches)
    del eager
    out = run_variant(compiled, batches)
    diffs = [abs(c - e) / abs(e) for e, c in zip(ref.losses, out.losses)]
    result = {
        "compiled": compiled.graphed, "batch": settings.batch, "steps": len(batches),
        "losses_eager": [round(x, 6) for x in ref.losses], "losses_compiled": [round(x, 6) for x in out.losses],
        "max_rel_loss_diff": round(max(diffs), 6),
        "grad_cosine_first_step": round(cosine(ref.first_grads, out.first_grads), 6),
        "grad_cosine_last_step": round(cosine(ref.last_grads, out.last_grads), 6),
        "eager_s": round(ref.seconds, 2), "compiled_s_incl_compile": round(out.seconds, 2),
    }
    print_part_a(result)
    return result


def targets_a(result: dict[str, Any] | None) -> dict[str, bool | None]:
    """met / not met; None when part a did not run, failed, or compared eager with eager (CPU smoke)."""
    judged = bool(result) and "error" not in result and result["compiled"]
    return {
        "a_max_rel_loss_diff_le_2pct": result["max_rel_loss_diff"] <= LOSS_TOLERANCE if judged else None,
        "a_grad_cosine_first_step_ge_0.99": result["grad_cosine_first_step"] >= GRAD_COSINE if judged else None,
    }


def met(value: bool | None) -> str:
    return {True: "met", False: "NOT MET", None: "not judged"}[value]


def print_part_a(r: dict[str, Any]) -> None:
    for i, (e, c) in enumerate(zip(r["losses_eager"], r["losses_compiled"]), 1):
        print(f"a: step {i} | loss eager {e:.6f} | compiled {c:.6f} | diff {100 * abs(c - e) / abs(e):.3f} %")
    t = targets_a(r)
    print(f"a: max relative loss difference {100 * r['max_rel_loss_diff']:.3f} % (target <= "
          f"{100 * LOSS_TOLERANCE:.0f} %: {met(t['a_max_rel_loss_diff_le_2pct'])}) | gradient cosine, first step "
          f"{r['grad_cosine_first_step']:.6f} (target >= {GRAD_COSINE}: {met(t['a_grad_cosine_first_step_ge_0.99'])})"
          f", last step {r['grad_cosine_last_step']:.6f}")
    note = " (includes compilation)" if r["compiled"] else " (eager too: compile skipped)"
    print(f"a: eager {r['eager_s']:.1f} s | compiled {r['compiled_s_incl_compile']:.1f} s{note}")


# ---- part c: throughput at batch 64 ----------------------------------------------------------------------


def part_c(settings: Settings) -> dict[str, Any]:
    trainer = make_trainer(settings, compile_llm=settings.compile)
    features, latents = random_batches(settings, 1)[0]  # one fixed batch: data loading is not measured
    device = settings.device
    started = time.perf_counter()
    for _ in range(settings.warmup):  # compilation, then CUDA-graph warm-up and recording
        train_step(trainer, features, latents)
    synchronize(device)
    warmup_s = time.perf_counter() - started
    reset_peak_memory(device)
    started = time.perf_counter()
    for _ in range(settings.steps):
        metrics = train_step(trainer, features, latents)
    synchronize(device)
    seconds = time.perf_counter() - started
    result = {
        "compiled": trainer.graphed, "bf16": device == "cuda", "batch": settings.batch, "steps": settings.steps,
        "samples_per_s": round(settings.steps * settings.batch / seconds, 2),
        "ms_per_step": round(1000 * seconds / settings.steps, 2), "peak_gib": peak_memory_gib(device),
        "warmup_s": round(warmup_s, 2), "last_loss_finite": bool(math.isfinite(metrics["loss_fine"].item())),
    }
    print(f"c: {result['samples_per_s']:.1f} samples/s | {result['ms_per_step']:.1f} ms/step | batch "
          f"{settings.batch} | compiled {trainer.graphed} | peak {result['peak_gib']} GiB | warm-up "
          f"{warmup_s:.1f} s ({SEED_REFERENCE})")
    return result


# ---- part b: precompute with full-size encoders ----------------------------------------------------------


def make_videos(folder: Path, settings: Settings) -> Path:
    """`settings.videos` moving-object H.264 videos of 20-30 s (20 s in a smoke run) and their manifest."""
    from tasks.samples import make_video, write_manifest

    rng = np.random.default_rng(settings.seed)
    durations = [20 if settings.smoke else int(d) for d in rng.integers(20, 31, size=settings.videos)]

    def one(i: int) -> dict[str, Any]:
        relative = f"videos/check{i:03d}.mp4"
        make_video(folder / relative, durations[i], fps=settings.fps, size=settings.size,
                   pattern="moving_object", seed=settings.seed * 1000 + i)
        return {"video_id": f"check{i:03d}", "path": relative, "duration": durations[i],
                "caption": f"a moving object, video {i}"}

    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:  # each runs its own ffmpeg
        rows = list(pool.map(one, range(settings.videos)))
    return write_manifest(folder / "manifest.csv", rows)


def dino_config(smoke: bool):
    """facebook/dinov2-small's architecture (smoke: 2 layers)."""
    from transformers import Dinov2Config

    return Dinov2Config(
        hidden_size=384, num_hidden_layers=2 if smoke else 12, num_attention_heads=6, mlp_ratio=4, patch_size=14,
        image_size=518, layerscale_value=1.0, layer_norm_eps=1e-6, hidden_act="gelu", qkv_bias=True,
        use_swiglu_ffn=False,
    )


def vae_config(smoke: bool) -> dict[str, Any]:
    """stabilityai/sd-vae-ft-mse's architecture (smoke: the same blocks, a few channels)."""
    return dict(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 8, 16, 16) if smoke else (128, 256, 512, 512),
        layers_per_block=1 if smoke else 2, act_fn="silu", latent_channels=4,
        norm_num_groups=4 if smoke else 32, sample_size=512, scaling_factor=VAE_SCALING_FACTOR,
    )


def save_random_encoders(folder: Path, settings: Settings) -> tuple[str, str]:
    """Random-weight DINOv2-S and SD-VAE saved with save_pretrained, for the `full` preset to load."""
    from diffusers import AutoencoderKL
    from transformers import Dinov2Model

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(settings.seed)
        dino, vae = Dinov2Model(dino_config(settings.smoke)), AutoencoderKL(**vae_config(settings.smoke))
    dino.save_pretrained(folder / "dinov2-small")
    vae.save_pretrained(folder / "sd-vae-ft-mse")
    return str(folder / "dinov2-small"), str(folder / "sd-vae-ft-mse")


def hub_has(repo_id: str) -> bool:
    """Whether the hub weights are in the local cache, or can be downloaded into it now."""
    from huggingface_hub import snapshot_download

    patterns = ["*.json", "*.safetensors"]
    try:
        snapshot_download(repo_id, allow_patterns=patterns, local_files_only=True)
        return True
    except Exception:  # noqa: BLE001 - any failure means the same here: not cached
        pass
    try:
        snapshot_download(repo_id, allow_patterns=patterns, etag_timeout=10)
        return True
    except Exception as err:  # noqa: BLE001 - offline, DNS, proxy, timeout, gated: all mean "use random weights"
        print(f"b: {repo_id} is neither cached nor reachable ({type(err).__name__}); using random weights")
        return False


def encoder_sources(folder: Path, settings: Settings) -> tuple[str, str, str]:
    """(dino, vae, what they are): hub ids when allowed and available, else saved random models."""
    if settings.encoders != "random" and hub_has(DINO_ID) and hub_has(VAE_ID):
        return DINO_ID, VAE_ID, "hub weights"
    if settings.encoders == "hub":
        raise RuntimeError(f"--encoders hub: {DINO_ID} or {VAE_ID} is neither cached nor reachable")
    dino, vae = save_random_encoders(folder, settings)
    kind = "tiny random (smoke)" if settings.smoke else "random weights, real configs"
    return dino, vae, kind


def precompute_config(settings: Settings, dino: str, vae: str):
    from model.encoders import EncoderConfig
    from storage.store import StoreConfig
    from tasks.decode import DecodeConfig
    from tasks.precompute import PrecomputeConfig

    return PrecomputeConfig(
        encoder=EncoderConfig(preset="full", dino=dino, vae=vae, half_precision=True),
        decode=DecodeConfig(workers=settings.decode_workers),
        layout=StoreConfig(chunk_videos=settings.chunk_videos), device=settings.device,
    )


def run_precompute(manifest: Path, store: Path, config) -> tuple[dict[str, Any], list[tuple[float, int]]]:
    """Listing, store and encode_chunks as the precompute flow runs them; returns the report and chunk commits
    as (seconds since the start, videos done)."""
    from tasks.listing import ListingConfig, list_videos
    from tasks.precompute import encode_chunks, prepare_store

    listing = list_videos(manifest, ListingConfig())
    prepared = prepare_store(str(store), listing, config)
    commits: list[tuple[float, int]] = []
    reset_peak_memory(config.device)
    started = time.perf_counter()

    def on_chunk(chunk: int, report) -> None:
        commits.append((time.perf_counter() - started, report.videos_ok + report.videos_failed))

    report = encode_chunks(str(store), prepared.pending_chunks(), config, on_chunk=on_chunk)
    synchronize(config.device)
    return {**report.as_dict(), "kept": listing.summary["kept"]}, commits


def throughput(report: dict[str, Any], commits: list[tuple[float, int]]) -> dict[str, Any]:
    """videos/s after the first chunk commit, which carries the model load, the CUDA warm-up and the first
    decode; with one chunk only, the whole call's rate (model load included) is all there is."""
    done = report["videos_ok"] + report["videos_failed"]
    overall = done / report["seconds"] if report["seconds"] > 0 else 0.0
    if len(commits) >= 2 and commits[-1][0] > commits[0][0]:
        rate, basis = (commits[-1][1] - commits[0][1]) / (commits[-1][0] - commits[0][0]), "after the first chunk"
    else:
        rate, basis = overall, "whole call, model load included (one chunk)"
    return {"videos_per_s": round(rate, 3), "videos_per_s_basis": basis,
            "videos_per_s_incl_load": round(overall, 3), "first_chunk_s": round(commits[0][0], 2) if commits else None}


def part_b(settings: Settings) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="fvlm-gpu-check-") as tmp:
        work = Path(tmp)
        started = time.perf_counter()
        manifest = make_videos(work, settings)
        generate_s = time.perf_counter() - started
        dino, vae, kind = encoder_sources(work / "encoders", settings)
        print(f"b: {settings.videos} videos of {settings.size[0]}x{settings.size[1]} at {settings.fps} fps made in "
              f"{generate_s:.1f} s | encoders: {kind} | decode workers: {settings.decode_workers}")
        report, commits = run_precompute(manifest, work / "store.zarr", precompute_config(settings, dino, vae))
    nonfinite = sum(n for reason, n in report["failed_by_reason"].items() if "NaN or inf" in reason)
    result = {
        "videos": settings.videos, "kept": report["kept"], "ok": report["videos_ok"],
        "failed": report["videos_failed"], "failed_nonfinite": nonfinite, "encoders": kind,
        **throughput(report, commits), "seconds": report["seconds"], "peak_gib": peak_memory_gib(settings.device),
        "generate_s": round(generate_s, 1), "decode_workers": settings.decode_workers,
        "chunk_videos": settings.chunk_videos, "failed_by_reason": report["failed_by_reason"],
    }
    print(f"b: {result['videos_per_s']:.2f} videos/s ({result['videos_per_s_basis']}; "
          f"{result['videos_per_s_incl_load']:.2f} with the model load) | {result['ok']} ok, {result['failed']} "
          f"failed, {nonfinite} of them NaN/inf encoder output | peak {result['peak_gib']} GiB")
    return result


# ---- the run -------------------------------------------------------------------------------------------

PARTS: dict[str, Callable[[Settings], dict[str, Any]]] = {"a": part_a, "b": part_b, "c": part_c}


def run_part(name: str, settings: Settings) -> dict[str, Any]:
    """One part; an exception is reported as the part's result so that the other parts still run (a lent GPU's
    minutes should not be lost to one failure), and the exit status says it."""
    started = time.perf_counter()
    try:
        result = PARTS[name](settings)
    except Exception as err:  # noqa: BLE001 - the check must report every part; the traceback goes to stderr
        traceback.print_exc()
        print(f"{name}: FAILED: {type(err).__name__}: {err}")
        result = {"error": f"{type(err).__name__}: {err}"}
    finally:
        release_memory(settings.device)
    result["part_s"] = round(time.perf_counter() - started, 1)
    return result


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    settings = settings_from(args, parser.error)
    refuse_without_cuda(settings)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    started = time.perf_counter()
    print(f"gpu check on {device_name(settings.device)} | torch {torch.__version__} | parts "
          f"{','.join(settings.parts)}{' | smoke' if settings.smoke else ''}")
    results = {name: run_part(name, settings) if name in settings.parts else None for name in PARTS}
    targets = targets_a(results["a"])
    summary = {"device": device_name(settings.device), "smoke": settings.smoke, **results,
               "targets_met": targets, "seconds": round(time.perf_counter() - started, 1),
               "torch": torch.__version__}
    print(f"done in {summary['seconds']:.0f} s")
    print(json.dumps(summary))
    return 1 if any(r and "error" in r for r in results.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
