"""List the videos of a manifest and keep those fit for training (duration bounds, caption, unique id).

A manifest is a CSV/TSV, Parquet or JSON-lines file, or a folder of videos. WebVid-10M's column names work as
they are (`videoid`, `contentUrl`, `duration` as ISO-8601, `name`), as do `video_id`, `path`, `duration` in
seconds and `caption`. The file is streamed in chunks and parsed with vectorised Arrow kernels, so WebVid's
10M rows list in well under a minute on two cores; only the kept rows are held in memory.

Every row that is not kept is counted under the first drop reason that applies, in the order of
`DROP_REASONS`. Durations missing from the manifest are probed from the file with ffmpeg (remote files are
downloaded first), only for rows that passed every cheaper check, and only until `limit` videos are kept.

A bad row never stops the listing; only a manifest that cannot be used at all (missing, unreadable, a required
column absent) raises ManifestError. What bad rows become:
- a CSV line with the wrong number of fields, a JSON line that is not an object: `malformed_row` (an
  unterminated quote swallows the lines up to the next quote into one such row);
- bytes that are not UTF-8: replaced by U+FFFD (the manifest is read a second time, more slowly, to do it);
- a CSV cell that is exactly a null marker (NA, NULL, NaN, n/a, ...; pandas' list) is missing, as in pandas;
- a value that is no text (a JSON list or object), a NaN or infinite number: missing, so `no_id`, `no_caption`...;
- a caption of only whitespace or control characters: `no_caption`; longer than `max_caption_chars` (a sign of
  a broken quote that glued rows together): `caption_too_long`;
- a source is remote when its scheme is http(s):// or a protocol of fsspec whose package is installed (s3:// with
  s3fs, gs:// with gcsfs, memory://, ...; `tasks.download.is_remote`), local for a path or file://; any other
  scheme (nosuch://, gs:// without gcsfs) is `unsupported_source`, and the log says why, naming the package to
  install; a local path that is absent or not a regular file (a folder): `missing_file`;
- a negative, NaN, infinite or unparseable duration: probed from the file like a missing one (`no_duration`
  when probing is off or finds none); a remote file to probe that does not download: `download_failed`.

Layers, each importing only the ones below it:
- `task`: list_videos_task, the Prefect task (retried, except for a ManifestError);
- `filters`: list_videos and the listing pass (drop reasons, counts, probing missing durations);
- `readers`: the manifest readers (CSV/TSV, Parquet, JSON lines, a folder of videos), chunk by chunk;
- `durations`: seconds parsed from a manifest column, or probed from the file with ffmpeg;
- `columns`, `config`: vectorised text clean-up; ListingConfig and ManifestError.
"""

from tasks.listing.config import ListingConfig, ManifestError
from tasks.listing.durations import parse_durations, probe_duration
from tasks.listing.filters import DROP_REASONS, Listing, list_videos

__all__ = [
    "DROP_REASONS",
    "Listing",
    "ListingConfig",
    "ManifestError",
    "list_videos",
    "list_videos_task",
    "parse_durations",
    "probe_duration",
]


def __getattr__(name: str):
    """The Prefect task on first use: `fvlm precompute --help` and the plain functions do not import Prefect."""
    if name == "list_videos_task":
        from tasks.listing.task import list_videos_task

        return list_videos_task
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
