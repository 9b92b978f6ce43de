"""Training-step throughput of EfficientFoveatedModel against a seed-style implementation of the same math.

One full step = forward + backward + gradient clipping + AdamW step, on one fixed random batch generated on the
device as float16 (what the store holds), so data loading is not measured. Both variants use the same config,
weights, batch and optimizer; they differ only where the seed did:
  - the seed attends frame by frame in a Python loop (16 frames x 3 passes x 2 matmuls);
  - the seed asks the LLM for all hidden states (output_hidden_states=True) and keeps the last one;
  - the seed runs the whole prediction head in every pass, though its conv encoder sees only the latents
    (the same in every pass), and in every fine pass, though only the last fine loss counts;
  - the seed casts the stored features to float32 and lets autocast recast them at every matmul.

    python benchmarks/train_step.py --preset demo --batch 8 --steps 20 --device cpu
    python benchmarks/train_step.py --preset full-random --batch 64 --bf16 --device cuda

On CUDA (by default, see --compile) our variant's LLM runs through torch.compile with CUDA graphs
(mode="reduce-overhead"): the eager step is bound by Python/launch overhead of thousands of small kernels, not by
the GPU. The seed-style baseline stays eager, as the seed ran. --compile none measures our eager model.

The last line printed is JSON: {"ours": samples/s, "baseline": samples/s, "ratio": ours/baseline, ...}.
"""

import argparse
import contextlib
import json
import math
import platform
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import transformers
from torch import Tensor

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from model.config import ModelConfig  # noqa: E402
from model.foveated import EfficientFoveatedModel  # noqa: E402
from model.llm import build_llm  # noqa: E402


class SeedStyleModel(EfficientFoveatedModel):
    """The reference implementation's way of computing the same losses (same parameters, same state dict)."""

    def forward(self, dino_features: Tensor, latents: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        features = dino_features.float()  # (B, T, N, D); autocast recasts it at every matmul
        latents = latents.float()
        B, T = features.shape[:2]
        z = torch.stack([self.attend_frame(self.q_static.expand(B, -1), features[:, t]) for t in range(T)], dim=1)
        h = self.llm_last_hidden(self.coarse_token, z)
        loss_coarse = self.seed_prediction_loss(h[:, 1:T], latents)
        queries = self.llm_to_query(h[:, 1:])
        for _ in range(self.config.fine_iterations):
            frames = []
            for t in range(T):
                q = self.q_init.expand(B, -1) if t == 0 else queries[:, t - 1]
                frames.append(self.attend_frame(q, features[:, t]))
            h = self.llm_last_hidden(self.fine_token, torch.stack(frames, dim=1))
            loss_fine = self.seed_prediction_loss(h[:, 1:T], latents)  # every pass; the last one is reported
            queries = self.llm_to_query(h[:, 1:])
        loss = loss_fine + self.config.lambda_coarse * loss_coarse
        return loss, {"loss_fine": loss_fine.detach(), "loss_coarse": loss_coarse.detach()}

    def seed_prediction_loss(self, hidden: Tensor, latents: Tensor) -> Tensor:
        # The whole head in every pass, its conv encoder included, though that sees only the latents.
        pred = self.pred_head(hidden.flatten(0, 1), latents[:, :-1].flatten(0, 1))  # (B*(T-1), C, S, S)
        return torch.nn.functional.mse_loss(pred.float(), latents[:, 1:].flatten(0, 1).float())

    def attend_frame(self, q: Tensor, frame: Tensor) -> Tensor:
        # q (B, Dq), frame (B, N, D) -> (B, D)
        scores = torch.bmm(frame, self.query_proj(q).unsqueeze(-1)).squeeze(-1) / math.sqrt(frame.shape[-1])
        weights = scores.softmax(dim=-1)  # (B, N)
        return torch.bmm(weights.unsqueeze(1), frame).squeeze(1)

    def llm_last_hidden(self, token: Tensor, z: Tensor) -> Tensor:
        B = z.shape[0]
        x = torch.cat([token.expand(B, 1, -1), self.dino_to_llm(z)], dim=1)  # (B, 1+T, H)
        return self.llm(inputs_embeds=x, output_hidden_states=True).hidden_states[-1]


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", choices=["demo", "full-random"], default="demo",
                        help="demo: tiny random LLM and small head; "
                             "full-random: the spec with SmolLM2-135M's shape and random weights")
    parser.add_argument("--batch", type=int, default=8, help="samples per step")
    parser.add_argument("--frames", type=int, default=16, help="frames per sample (T)")
    parser.add_argument("--steps", type=int, default=20, help="timed steps per variant")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps per variant first")
    parser.add_argument("--rounds", type=int, default=2, help="timed blocks per variant, alternating the variants")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast (the training recipe on GPU)")
    parser.add_argument("--compile", choices=["auto", "none", "llm"], default="auto",
                        help="llm: torch.compile our variant's LLM with CUDA graphs (reduce-overhead); "
                             "auto: llm on cuda, none on cpu")
    parser.add_argument("--threads", type=int, default=0, help="CPU threads for torch (0: torch's default)")
    return parser.parse_args()


def model_config(preset: str) -> ModelConfig:
    if preset == "demo":
        return ModelConfig.for_preset("demo")
    # The full spec, with SmolLM2-135M's architecture built from random weights (no hub needed).
    return ModelConfig.for_preset("full").model_copy(update={"llm": None})


def make_batch(config: ModelConfig, batch: int, frames: int, device: torch.device) -> tuple[Tensor, Tensor]:
    """Random inputs made on the device, float16 like the store; the models cast them on the device."""
    g = torch.Generator(device=device).manual_seed(0)
    features = torch.randn(batch, frames, config.num_tokens, config.feature_dim, device=device, generator=g)
    s = config.latent_size
    latents = torch.randn(batch, frames, config.latent_channels, s, s, device=device, generator=g)
    return features.half(), latents.half()


def make_optimizer(model: torch.nn.Module, device: torch.device) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.optim.AdamW(params, lr=1e-4, weight_decay=0.01, fused=device.type == "cuda")


def autocast(device: torch.device, bf16: bool):
    if not bf16:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


@dataclass
class Variant:
    """One implementation under test, with its optimizer and what was measured."""

    name: str
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    graphed: bool = False  # LLM compiled with CUDA graphs: each step must mark a new graph iteration
    seconds: float = 0.0
    steps: int = 0
    peak_bytes: int = 0


def train_step(variant: Variant, batch, device, bf16) -> None:
    if variant.graphed:
        # A new iteration for CUDA-graph trees: the previous step's graph outputs may be overwritten now.
        torch.compiler.cudagraph_mark_step_begin()
    with autocast(device, bf16):
        loss, _ = variant.model(*batch)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(variant.model.parameters(), 1.0)
    variant.optimizer.step()
    variant.optimizer.zero_grad(set_to_none=True)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def build_variants(config: ModelConfig, device: torch.device, compile_llm: bool) -> tuple[Variant, Variant]:
    """Our model and the seed-style one, with the same weights, each with its own AdamW."""
    torch.manual_seed(0)
    ours = EfficientFoveatedModel(config, build_llm(config))
    baseline = SeedStyleModel(config, build_llm(config))
    baseline.load_state_dict(ours.state_dict())
    ours, baseline = ours.to(device), baseline.to(device)
    return (
        Variant("ours", ours, make_optimizer(ours, device), graphed=compile_llm),
        Variant("baseline", baseline, make_optimizer(baseline, device)),
    )


def check_same_losses(ours: Variant, baseline: Variant, batch, device, bf16) -> None:
    """Both variants must compute the same losses on the same weights, else the comparison means nothing."""
    with torch.no_grad(), autocast(device, bf16):
        _, m_ours = ours.model(*batch)
        _, m_base = baseline.model(*batch)
    tolerance = 2e-2 if bf16 else 1e-4
    for name in m_ours:
        a, b = m_ours[name].item(), m_base[name].item()
        print(f"initial {name}: ours {a:.6f} | baseline {b:.6f}")
        if abs(a - b) > tolerance * abs(b):
            raise SystemExit(f"{name} differs between the variants ({a} vs {b}): the benchmark compares different math")


def warm_up(variant: Variant, batch, device, bf16, steps: int) -> None:
    if variant.graphed:
        variant.model.llm.compile(mode="reduce-overhead")
        steps = max(steps, 4)  # CUDA-graph trees record on the third call: warm up past it
    synchronize(device)
    start = time.perf_counter()
    for _ in range(steps):
        train_step(variant, batch, device, bf16)
    synchronize(device)
    note = " (includes torch.compile)" if variant.graphed else ""
    print(f"{variant.name:8s} warm-up {time.perf_counter() - start:.1f} s{note}")


def time_block(variant: Variant, batch, device, bf16, steps: int) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    synchronize(device)
    start = time.perf_counter()
    for _ in range(steps):
        train_step(variant, batch, device, bf16)
    synchronize(device)
    variant.seconds += time.perf_counter() - start
    variant.steps += steps
    if device.type == "cuda":
        variant.peak_bytes = max(variant.peak_bytes, torch.cuda.max_memory_allocated(device))


def report(args: argparse.Namespace, ours: Variant, baseline: Variant, compile_mode: str) -> dict:
    cuda = args.device == "cuda"
    throughput = {}
    for v in (ours, baseline):
        throughput[v.name] = v.steps * args.batch / v.seconds
        line = f"{v.name:8s} {throughput[v.name]:8.1f} samples/s | {1000 * v.seconds / v.steps:7.1f} ms/step"
        if cuda:
            line += f" | max_memory_allocated {v.peak_bytes / 2**30:.2f} GiB (both models resident)"
        print(line)
    result = {
        "ours": round(throughput["ours"], 2),
        "baseline": round(throughput["baseline"], 2),
        "ratio": round(throughput["ours"] / throughput["baseline"], 3),
        "device": torch.cuda.get_device_name() if cuda else f"cpu ({platform.processor() or platform.machine()})",
        "batch": args.batch,
        "frames": args.frames,
        "preset": args.preset,
        "bf16": args.bf16,
        "compile": compile_mode,
        "steps": ours.steps,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
    }
    if cuda:
        result["ours_max_memory_gib"] = round(ours.peak_bytes / 2**30, 2)
        result["baseline_max_memory_gib"] = round(baseline.peak_bytes / 2**30, 2)
    return result


def main() -> None:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda given but no CUDA device is visible")
    compile_mode = args.compile if args.compile != "auto" else ("llm" if device.type == "cuda" else "none")

    config = model_config(args.preset)
    ours, baseline = build_variants(config, device, compile_llm=compile_mode == "llm")
    batch = make_batch(config, args.batch, args.frames, device)
    n_params = sum(p.numel() for p in ours.model.parameters())
    print(f"preset {args.preset} | {n_params / 1e6:.1f}M parameters | batch {args.batch} x {args.frames} frames | "
          f"device {args.device} | bf16 {args.bf16} | compile {compile_mode} | torch threads {torch.get_num_threads()}")

    check_same_losses(ours, baseline, batch, device, args.bf16)  # eager, before any compilation
    for variant in (ours, baseline):
        warm_up(variant, batch, device, args.bf16, args.warmup)
    steps_per_round = max(1, args.steps // args.rounds)
    for r in range(args.rounds):
        for variant in (ours, baseline) if r % 2 == 0 else (baseline, ours):  # alternate who goes first
            time_block(variant, batch, device, args.bf16, steps_per_round)
    print(json.dumps(report(args, ours, baseline, compile_mode)))


if __name__ == "__main__":
    main()
