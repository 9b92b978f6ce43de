"""The listing's settings (ListingConfig) and its one error (ManifestError)."""

from pydantic import BaseModel, Field, model_validator


class ListingConfig(BaseModel):
    """Which videos of a manifest to keep, and how to read and probe it."""

    min_duration_s: float = Field(20.0, ge=0, description="Shortest kept video in seconds (inclusive).")
    max_duration_s: float = Field(60.0, ge=0, description="Longest kept video in seconds (inclusive).")
    require_caption: bool = Field(True, description="Drop rows whose caption is missing or blank.")
    limit: int | None = Field(None, ge=0, description="Keep at most this many videos, in manifest order.")
    probe_missing_durations: bool = Field(
        True, description="Probe the file (ffmpeg) when a row has no usable duration; otherwise drop it."
    )
    probe_timeout_s: float = Field(
        30.0, gt=0, description="Time limit of one ffmpeg probe, and of each network step of a probe download."
    )
    download_dir: str | None = Field(
        None, description="Where remote files are fetched for probing; None: a folder in the system temp dir."
    )
    download_attempts: int = Field(
        3, ge=1, description="Tries to download a remote file to probe; transient errors are retried with backoff."
    )
    max_caption_chars: int | None = Field(
        10_000, ge=1, description="Drop rows whose caption is longer (caption_too_long); None: no limit."
    )
    read_chunk_rows: int = Field(1_000_000, ge=1, description="Manifest rows read and filtered per chunk.")

    @model_validator(mode="after")
    def _check_bounds(self) -> "ListingConfig":
        if self.min_duration_s > self.max_duration_s:
            raise ValueError(
                f"min_duration_s ({self.min_duration_s}) must not exceed max_duration_s ({self.max_duration_s})"
            )
        return self


class ManifestError(ValueError):
    """A manifest that cannot be used: missing, unreadable, of unknown format, or lacking a required column."""

