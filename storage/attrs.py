"""The group attributes of a feature store, typed: written once (`FeatureStore.create`), read once (`open`).

Precompute, the encoders and import-pt hand their parts in (`StoreAttrs` with the encoders, the sampling, the
listing summary); the store adds its layout (frames, shapes, K, codec, schema version). What a run needs of a
store is a `StoreExpectation`; `compare` lists every difference as a `Mismatch`, which each caller words its own
way ("this run uses ...", "config wants ...").

Unknown keys are kept (`extra="allow"`), so a store written by a newer or older version round-trips intact.
"""

from __future__ import annotations

from typing import Any, Literal, NamedTuple

from pydantic import BaseModel, ConfigDict, Field

from storage.feature_codec import STORED_DTYPE

SCHEMA_VERSION = 2
SEED_WINDOW_FRAMES = 72  # the seed decodes the first `num_frames * 3` frames of a video (its ffmpeg -frames:v)
VAE_SCALING_FACTOR = 0.18215  # SD-VAE's latents are its posterior mean times this (the seed's .pt files too)


class EncoderRecord(BaseModel):
    """What a store records about one encoder: its id (hub id, local folder or demo stand-in) and more."""

    model_config = ConfigDict(extra="allow")

    id: str | None = None
    revision: str | None = None
    seed: int | None = None


class SamplingRecord(BaseModel):
    """Which frames of a video a row keeps: the seed's window of the first `window_frames`, or spread."""

    model_config = ConfigDict(extra="allow")

    mode: Literal["window", "spread", "unknown"] = "unknown"
    window_frames: int | None = None
    frames: int | None = None
    rule: str = ""

    def same_choice(self, other: "SamplingRecord") -> bool:
        return (self.mode, self.window_frames, self.frames) == (other.mode, other.window_frames, other.frames)

    def describe(self) -> str:
        """'24 of the first 72 frames' / '24 frames spread over the whole video'."""
        if self.mode == "window":
            return f"{self.frames} of the first {self.window_frames} frames"
        if self.mode == "spread":
            return f"{self.frames} frames spread over the whole video"
        return "frames chosen by an unknown rule"


class StoreAttrs(BaseModel):
    """Every group attribute of a store."""

    model_config = ConfigDict(extra="allow")

    schema_version: int | None = None  # set by create; a group without it is one whose creation was interrupted
    frames: int | None = None
    tokens: int | None = None
    feature_dim: int | None = None
    latent_shape: list[int] | None = None
    chunk_videos: int | None = None
    compression: str | None = None
    feature_codec: str = "float16"  # stores made before the codec existed are float16
    frame_size: int | None = None
    resize: str | None = None
    sampling: SamplingRecord = Field(default_factory=SamplingRecord)
    encoder_preset: str | None = None
    dino: EncoderRecord = Field(default_factory=EncoderRecord)
    vae: EncoderRecord = Field(default_factory=EncoderRecord)
    listing: dict[str, Any] = Field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return self.model_dump(mode="json")


class StoreExpectation(BaseModel):
    """What a run needs of a store; None: anything goes."""

    dino_id: str | None = None
    vae_id: str | None = None
    tokens: int | None = None
    feature_dim: int | None = None
    latent_shape: list[int] | None = None
    min_frames: int | None = None
    sampling: SamplingRecord | None = None
    frame_size: int | None = None


class Mismatch(NamedTuple):
    """One difference between a store and what a run needs."""

    field: str  # 'dino', 'tokens', 'sampling', 'frames', 'dino_features dtype', ...
    have: Any
    want: Any
    kind: Literal["value", "at_least", "dtype"] = "value"

    def describe(self, wanted_by: str = "expected") -> str:
        """'tokens: store has 5, config wants 325' (wanted_by='config wants')."""
        if self.kind == "dtype":
            return f"{self.field}: store has {self.have}, this code reads {self.want}"
        if self.kind == "at_least":
            return f"{self.field}: store has {self.have}, {wanted_by} at least {self.want}"
        return f"{self.field}: store has {self.have!r}, {wanted_by} {self.want!r}"


def compare(attrs: StoreAttrs, expected: StoreExpectation, dtypes: dict[str, str]) -> list[Mismatch]:
    """Every way a store (its attributes, the dtypes of its feature arrays) differs from what a run needs."""
    found: list[Mismatch] = []
    wanted = {"dino": expected.dino_id, "vae": expected.vae_id}
    found += [Mismatch(name, getattr(attrs, name).id, want) for name, want in wanted.items()
              if want is not None and getattr(attrs, name).id != want]
    for name in ("tokens", "feature_dim", "latent_shape"):
        want, have = getattr(expected, name), getattr(attrs, name)
        if want is not None and (list(have) if isinstance(have, (list, tuple)) else have) != want:
            found.append(Mismatch(name, have, want))
    if expected.min_frames is not None and (attrs.frames or 0) < expected.min_frames:
        found.append(Mismatch("frames", attrs.frames, expected.min_frames, "at_least"))
    if expected.frame_size is not None and attrs.frame_size is not None and attrs.frame_size != expected.frame_size:
        found.append(Mismatch("frame_size", attrs.frame_size, expected.frame_size))
    if expected.sampling is not None and not attrs.sampling.same_choice(expected.sampling):
        found.append(Mismatch("sampling", attrs.sampling, expected.sampling))
    # the loader reads the raw values of the chunks: float16, or the int8 codes the codec records
    readable = {"dino_features": STORED_DTYPE.get(attrs.feature_codec, "float16"), "latents": "float16"}
    found += [Mismatch(f"{name} dtype", dtype, readable.get(name, "float16"), "dtype")
              for name, dtype in dtypes.items() if dtype != readable.get(name, "float16")]
    return found
