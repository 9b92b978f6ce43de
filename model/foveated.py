"""EfficientFoveatedModel: a foveated video model trained on precomputed DINOv2 features (../shared/MODEL_SPEC.md).

Reads top to bottom: the FiLM prediction head, the query attention, then the model, whose forward is a coarse
pass followed by `fine_iterations` fine passes, each one call of `run_pass`. Same math as the spec, less work:
one batched attention for all frames, only the LLM's last hidden state, the head's latent encoder once per step
(it does not depend on the pass), and no prediction head in fine passes whose loss is not used.

Shapes: B batch, T frames, N DINO tokens per frame, D DINO width, Dq query width, H LLM width,
C latent channels, S latent size.
"""

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from model.config import ModelConfig


class PredictionHead(nn.Module):
    """Predicts the next latent from an LLM hidden state and the previous latent, by FiLM on conv features."""

    def __init__(self, hidden_size: int, latent_channels: int, mlp_hidden: int, channels: tuple[int, int, int]):
        super().__init__()
        c1, c2, c3 = channels
        self.film = nn.Sequential(nn.Linear(hidden_size, mlp_hidden), nn.GELU(), nn.Linear(mlp_hidden, 2 * c3))
        self.encode = nn.Sequential(
            nn.Conv2d(latent_channels, c1, 3, padding=1), nn.GELU(),
            nn.Conv2d(c1, c2, 3, padding=1), nn.GELU(),
            nn.Conv2d(c2, c3, 3, padding=1),
        )
        self.decode = nn.Sequential(
            nn.Conv2d(c3, c2, 3, padding=1), nn.GELU(),
            nn.Conv2d(c2, c1, 3, padding=1), nn.GELU(),
            nn.Conv2d(c1, latent_channels, 3, padding=1),
        )

    def forward(self, h: Tensor, prev_latent: Tensor) -> Tensor:
        # h (M, H), prev_latent (M, C, S, S) -> (M, C, S, S); M is batch and time folded together
        return self.predict(h, self.latent_features(prev_latent))

    def latent_features(self, prev_latent: Tensor) -> Tensor:
        """The conv features of the previous latent (M, c3, S, S): they do not depend on h, so a caller that
        predicts from several hidden states of the same frames computes them once."""
        # Channels-last (NHWC) all through the head: cuDNN's bf16 convolutions otherwise transpose every input and
        # output (~30% of the head's time on an H100), and oneDNN on CPUs measured ~20% faster this way too.
        return self.encode(prev_latent.contiguous(memory_format=torch.channels_last))

    def predict(self, h: Tensor, features: Tensor) -> Tensor:
        """FiLM of the latent features by h, then decoded to the next latent (M, C, S, S)."""
        gamma, beta = self.film(h).chunk(2, dim=-1)  # (M, c3) each
        return self.decode(gamma[:, :, None, None] * features + beta[:, :, None, None])


def query_attention(queries: Tensor, features: Tensor) -> tuple[Tensor, Tensor]:
    """One query vector attends over the N tokens of its frame, for all B*T frames in one batched matmul.

    queries (B, T, D) already projected to the feature width; features (B, T, N, D).
    Returns z (B, T, D) and the attention weights (B, T, N), softmax over all N tokens (CLS included).
    """
    # Scaling the D-wide query instead of the N scores: same result, fewer multiplications.
    scaled = queries * (1.0 / math.sqrt(features.shape[-1]))
    scores = (features @ scaled.unsqueeze(-1)).squeeze(-1)  # (B, T, N)
    weights = scores.softmax(dim=-1)  # (B, T, N)
    z = (weights.unsqueeze(-2).to(features.dtype) @ features).squeeze(-2)  # (B, T, D)
    return z, weights


class NextFrameTargets(NamedTuple):
    """What every pass's prediction loss needs from the latents; the same for all passes of a step."""

    prev_features: Tensor  # (B*(T-1), c3, S, S) the head's conv features of latents 0..T-2
    next_latents: Tensor  # (B*(T-1), C, S, S) latents 1..T-1, the MSE target


class PassOutput(NamedTuple):
    """What one coarse or fine pass produces."""

    hidden: Tensor  # (B, 1+T, H) the LLM's last hidden state (pass token first)
    loss: Tensor | None  # 0-dim next-latent MSE (float32; float64 for a float64 model), None if not asked for
    queries: Tensor  # (B, T, Dq) query produced after seeing each frame; frame t's feeds frame t+1 next pass
    attention: Tensor  # (B, T, N) attention weights of this pass


class EfficientFoveatedModel(nn.Module):
    """Coarse pass with a static query, then fine passes whose per-frame queries come from the previous pass."""

    def __init__(self, config: ModelConfig, llm: nn.Module):
        super().__init__()
        self.config = config
        hidden = llm.config.hidden_size
        d, dq = config.feature_dim, config.query_dim
        # Standard normal on purpose (std 1, not 0.02): the spec wants queries that differ from the start.
        self.q_static = nn.Parameter(torch.randn(dq))
        self.q_init = nn.Parameter(torch.randn(dq))
        self.query_proj = nn.Linear(dq, d, bias=False)
        self.llm = llm
        # The LLM only ever sees inputs_embeds: its token table gets no gradient, so it is frozen here
        # (optimizers then skip it and DDP does not wait for a gradient that never comes).
        self.llm.get_input_embeddings().requires_grad_(False)
        self.dino_to_llm = nn.Linear(d, hidden)
        self.llm_to_query = nn.Linear(hidden, dq)
        self.coarse_token = nn.Parameter(torch.randn(hidden) * 0.02)
        self.fine_token = nn.Parameter(torch.randn(hidden) * 0.02)
        self.pred_head = PredictionHead(hidden, config.latent_channels, config.head_hidden, config.head_channels)

    def forward(self, dino_features: Tensor, latents: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        """Total loss and detached 0-dim metrics `loss_fine`, `loss_coarse` (no .item(): no GPU sync here).

        dino_features (B, T, N, D), latents (B, T, C, S, S), float16 as stored; cast here.
        """
        self._check_shapes(dino_features, latents)
        features = self._cast(dino_features)  # (B, T, N, D)
        # Latents stay in the parameters' dtype (float32): they are the MSE target; the convs' autocast casts
        # their input copy.
        latents = latents.to(self.q_static.dtype)  # (B, T, C, S, S)
        targets = self.next_frame_targets(latents)
        B, T = features.shape[:2]

        coarse = self.run_pass(features, self.q_static.expand(B, T, -1), self.coarse_token, targets)
        queries = coarse.queries
        for i in range(self.config.fine_iterations):
            # Only the last fine pass's loss is used; earlier ones only make queries, so they skip the head.
            is_last = i == self.config.fine_iterations - 1
            fine = self.run_pass(features, self.shift(queries), self.fine_token, targets if is_last else None)
            queries = fine.queries

        loss = fine.loss + self.config.lambda_coarse * coarse.loss
        metrics = {"loss_fine": fine.loss.detach(), "loss_coarse": coarse.loss.detach()}
        return loss, metrics

    def run_pass(
        self, features: Tensor, queries: Tensor, token: Tensor, targets: NextFrameTargets | None
    ) -> PassOutput:
        """One pass: attend each frame with its query, run the LLM, predict next latents, make the next queries.

        features (B, T, N, D); queries (B, T, Dq), one per frame; token (H,) marks the pass (coarse or fine);
        targets from `next_frame_targets`, or None to skip the prediction head.
        """
        B = features.shape[0]
        z, attention = query_attention(self.query_proj(queries), features)  # (B, T, D), (B, T, N)
        # The LLM input stays in the parameters' dtype (float32) under bf16 autocast, as in the reference, where
        # torch.cat promotes to the float32 token. Llama adds each bf16 sublayer output to this residual stream: a
        # bf16 input would round the whole stream to bf16, two to four times the error of h (see the tests).
        visual_inputs = self.dino_to_llm(z).to(token.dtype)  # (B, T, H)
        inputs = torch.cat([token.expand(B, 1, -1), visual_inputs], dim=1)  # (B, 1+T, H)
        # Last hidden state only: no output_hidden_states, no KV cache.
        hidden = self.llm(inputs_embeds=inputs, use_cache=False).last_hidden_state  # (B, 1+T, H)
        visual = hidden[:, 1:]  # (B, T, H): position t has seen frames 0..t
        loss = None if targets is None else self.prediction_loss(visual[:, :-1], targets)
        return PassOutput(hidden, loss, self.llm_to_query(visual), attention)

    def shift(self, queries: Tensor) -> Tensor:
        """Frame 0 gets q_init, frame t >= 1 the query made after frame t-1: the causal, foveated step."""
        B = queries.shape[0]
        return torch.cat([self.q_init.expand(B, 1, -1).to(queries.dtype), queries[:, :-1]], dim=1)  # (B, T, Dq)

    def next_frame_targets(self, latents: Tensor) -> NextFrameTargets:
        """Latents (B, T, C, S, S) -> the head's features of frames 0..T-2 and the targets, frames 1..T-1.

        The head's conv encoder sees only the previous latent, which is the same in every pass: computing it once
        per step is the spec's math with a quarter less head compute than calling the whole head in each pass.
        """
        prev_features = self.pred_head.latent_features(latents[:, :-1].flatten(0, 1))  # (B*(T-1), c3, S, S)
        return NextFrameTargets(prev_features, latents[:, 1:].flatten(0, 1))

    def prediction_loss(self, hidden: Tensor, targets: NextFrameTargets) -> Tensor:
        """MSE (at least float32) of predicting latent t+1 from hidden state t (B, T-1, H) and latent t."""
        pred = self.pred_head.predict(hidden.flatten(0, 1), targets.prev_features)  # (B*(T-1), C, S, S)
        dtype = torch.promote_types(pred.dtype, torch.float32)  # float32 under bf16 autocast, float64 stays
        return F.mse_loss(pred.to(dtype), targets.next_latents.to(dtype))

    @torch.no_grad()
    def attention_maps(self, dino_features: Tensor) -> dict[str, Tensor]:
        """Attention weights (B, T, N) of the coarse pass and of the last fine pass, for pictures."""
        features = self._cast(dino_features)  # (B, T, N, D)
        B, T = features.shape[:2]
        coarse = self.run_pass(features, self.q_static.expand(B, T, -1), self.coarse_token, None)
        fine = coarse
        for _ in range(self.config.fine_iterations):
            fine = self.run_pass(features, self.shift(fine.queries), self.fine_token, None)
        return {"coarse": coarse.attention.float(), "fine": fine.attention.float()}

    def _cast(self, x: Tensor) -> Tensor:
        """Stored float16 features -> the dtype the matmuls run in: autocast's (cast once here rather than at each
        matmul of each pass) or else the parameters'."""
        if torch.is_autocast_enabled(x.device.type):
            return x.to(torch.get_autocast_dtype(x.device.type))
        return x.to(self.q_static.dtype)

    def _check_shapes(self, features: Tensor, latents: Tensor) -> None:
        c = self.config
        expected_features = (c.num_tokens, c.feature_dim)
        expected_latents = (c.latent_channels, c.latent_size, c.latent_size)
        if features.dim() != 4 or tuple(features.shape[2:]) != expected_features:
            raise ValueError(
                f"dino_features must be (B, T, {c.num_tokens}, {c.feature_dim}), got {tuple(features.shape)}"
            )
        same_frames = latents.shape[:2] == features.shape[:2]
        if latents.dim() != 5 or tuple(latents.shape[2:]) != expected_latents or not same_frames:
            raise ValueError(
                f"latents must be (B, T, {c.latent_channels}, {c.latent_size}, {c.latent_size}) with the B, T of "
                f"dino_features {tuple(features.shape[:2])}, got {tuple(latents.shape)}"
            )
        if features.shape[1] < 2:
            raise ValueError(f"need at least 2 frames to predict a next frame, got T={features.shape[1]}")
