"""List the videos of a manifest and keep those fit for training (duration bounds, caption, unique id).

A manifest is a CSV/TSV, Parquet or JSON-lines file, or a folder of videos. WebVid-10M's column names work as
they are (`videoid`, `contentUrl`, `duration` as ISO-8601, `name`), as do `video_id`, `path`, `duration` in
seconds and `caption`. The file is streamed in chunks and parsed with vectorised Arrow kernels, so WebVid's
10M rows list in well under a minute on two cores; only the kept rows are held in memory.

Every row that is not kept is counted under the first drop reason that applies, in the order of
`DROP_REASONS`. Durations missing from the manifest are probed from the file with ffmpeg (remote files are
downloaded first), only for rows that passed every cheaper check, and only until `limit` videos are kept.
"""

import logging
import os
import re
import subprocess
import tempfile
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import imageio_ffmpeg
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.json as pajson
import pyarrow.parquet as pq
from prefect import get_run_logger, task
from pydantic import BaseModel, Field, model_validator

from tasks.download import PermanentDownloadError, fetch, redact_url

logger = logging.getLogger(__name__)

DROP_REASONS = (
    "no_source",
    "no_id",
    "duplicate_id",
    "no_caption",
    "missing_file",
    "no_duration",
    "too_short",
    "too_long",
    "over_limit",
)
NO_SOURCE, NO_ID, DUPLICATE_ID, NO_CAPTION, MISSING_FILE, NO_DURATION, TOO_SHORT, TOO_LONG, OVER_LIMIT = range(9)
KEPT = -1  # reason code of a row that is (still) kept

# Accepted column names per field, in order of preference (WebVid-10M's first).
COLUMN_NAMES = {
    "video_id": ("videoid", "video_id"),
    "source": ("contentUrl", "path"),
    "caption": ("name", "caption"),
    "duration": ("duration",),
}
MANIFEST_FORMATS = (".csv", ".tsv", ".parquet", ".jsonl", ".json")
VIDEO_EXTENSIONS = frozenset(
    {".mp4", ".mkv", ".webm", ".mov", ".avi", ".m4v", ".mpg", ".mpeg", ".ts", ".flv", ".wmv"}
)
FFMPEG_DURATION = re.compile(r"Duration:\s*(\d+):(\d{2}):(\d{2}(?:\.\d+)?)")
# Exactly WebVid's form, PT00H00M22S: parsed by slicing, ten times faster than the general pattern below.
ISO_WEBVID = r"^PT\d\dH\d\dM\d\dS$"
ISO_GENERAL = (
    r"^[Pp](?:(?P<d>\d+(?:\.\d*)?)[Dd])?"
    r"(?:[Tt](?:(?P<h>\d+(?:\.\d*)?)[Hh])?(?:(?P<m>\d+(?:\.\d*)?)[Mm])?(?:(?P<s>\d+(?:\.\d*)?)[Ss])?)?$"
)
PLAIN_NUMBER = r"^(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?$"


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


@dataclass
class Listing:
    """The kept videos, in manifest order, and what happened to the other rows."""

    videos: pd.DataFrame  # columns video_id, source, caption (str) and duration_s (float)
    summary: dict  # manifest, rows, kept, dropped {reason: count}, min/max_duration_s, probed


class _RereadWithPandas(Exception):
    """Arrow's JSON reader gave up (e.g. a column changes type between rows); pandas reads such files."""


# ----------------------------------------------------------------------------------------------------------
# probing


def probe_duration(source: str, timeout_s: float = 30.0) -> float | None:
    """Container duration in seconds from `ffmpeg -i`; None when there is none (N/A), on error or timeout."""
    command = [imageio_ffmpeg.get_ffmpeg_exe(), "-hide_banner", "-nostdin", "-i", source]
    try:
        # ffmpeg exits non-zero here (no output file given); the header it prints on stderr is all we need.
        done = subprocess.run(command, capture_output=True, timeout=timeout_s, check=False)
    except subprocess.TimeoutExpired:
        logger.warning("probing %s took more than %.0f s; treating its duration as unknown", source, timeout_s)
        return None
    except OSError as exc:
        logger.warning("could not run ffmpeg to probe %s: %s", source, exc)
        return None
    match = FFMPEG_DURATION.search(done.stderr.decode("utf-8", errors="replace"))
    if match is None:
        return None
    hours, minutes, seconds = match.groups()
    return int(hours) * 3600 + int(minutes) * 60 + float(seconds)


# ----------------------------------------------------------------------------------------------------------
# reading manifests: each reader yields Arrow tables whose columns carry the canonical names of COLUMN_NAMES


def _pick_columns(path: Path, names: list[str], config: ListingConfig) -> dict[str, str]:
    """Map the manifest's column names to canonical ones; raise ManifestError for a missing required column."""
    by_lower = {name.lower(): name for name in reversed(names)}  # the first of equal names wins
    picked = {}
    for field, accepted in COLUMN_NAMES.items():
        found = next((by_lower[a.lower()] for a in accepted if a.lower() in by_lower), None)
        if found is not None:
            picked[found] = field
        elif field == "source" or (field == "caption" and config.require_caption):
            expected = ", ".join(repr(a) for a in accepted)
            hint = "; or set require_caption=False" if field == "caption" else ""
            raise ManifestError(
                f"manifest {path} has no {field} column: expected one of {expected} "
                f"(columns found: {', '.join(repr(n) for n in names) or 'none'}){hint}"
            )
    return picked


def _rechunk(batches: Iterator[pa.RecordBatch], rows: int, columns: dict[str, str]) -> Iterator[pa.Table]:
    """Group record batches into tables of at least `rows` rows (the last may be smaller), renamed."""
    pending, count = [], 0
    for batch in batches:
        pending.append(batch)
        count += batch.num_rows
        if count >= rows:
            yield pa.Table.from_batches(pending).rename_columns(columns)
            pending, count = [], 0
    if pending:
        yield pa.Table.from_batches(pending).rename_columns(columns)


def _read_csv(path: Path, config: ListingConfig) -> Iterator[pa.Table]:
    if path.suffix.lower() == ".tsv":
        # TSV has no quoting: a caption that starts with '"' is text, not the start of a quoted field.
        parse = pacsv.ParseOptions(delimiter="\t", quote_char=False)
    else:
        parse = pacsv.ParseOptions(newlines_in_values=True)  # quoted captions may span lines
    with pacsv.open_csv(path, parse_options=parse) as head:
        columns = _pick_columns(path, head.schema.names, config)
    convert = pacsv.ConvertOptions(
        include_columns=list(columns),
        column_types={name: pa.string() for name in columns},  # no type guessing: ids stay text
        strings_can_be_null=True,  # an empty cell is missing
    )
    read = pacsv.ReadOptions(block_size=4 << 20)
    with pacsv.open_csv(path, read_options=read, parse_options=parse, convert_options=convert) as reader:
        yield from _rechunk(reader, config.read_chunk_rows, columns)


def _read_parquet(path: Path, config: ListingConfig) -> Iterator[pa.Table]:
    file = pq.ParquetFile(path)
    columns = _pick_columns(path, file.schema_arrow.names, config)
    for batch in file.iter_batches(batch_size=config.read_chunk_rows, columns=list(columns)):
        yield pa.Table.from_batches([batch]).rename_columns(columns)


def _read_jsonl(path: Path, config: ListingConfig) -> Iterator[pa.Table]:
    """JSON lines with Arrow's reader (fast); types are fixed from the first block, widened where harmless."""
    read = pajson.ReadOptions(block_size=4 << 20)
    try:
        with pajson.open_json(path, read_options=read) as head:
            schema = head.schema
        columns = _pick_columns(path, schema.names, config)
        fields = []
        for name, field in columns.items():
            kind = schema.field(name).type
            if field == "duration" and (pa.types.is_integer(kind) or pa.types.is_null(kind)):
                kind = pa.float64()  # 22 in one block, 22.5 in the next
            elif pa.types.is_null(kind):
                kind = pa.string()  # all null in the first block
            fields.append(pa.field(name, kind))
        parse = pajson.ParseOptions(explicit_schema=pa.schema(fields), unexpected_field_behavior="ignore")
        with pajson.open_json(path, read_options=read, parse_options=parse) as reader:
            yield from _rechunk(reader, config.read_chunk_rows, columns)
    except pa.ArrowInvalid as exc:
        raise _RereadWithPandas(str(exc)) from exc


def _read_jsonl_pandas(path: Path, config: ListingConfig) -> Iterator[pa.Table]:
    """JSON lines with pandas: slower, but takes columns whose type changes from row to row."""
    with pd.read_json(path, lines=True, chunksize=config.read_chunk_rows, dtype=False) as chunks:
        columns = None
        for frame in chunks:
            columns = columns or _pick_columns(path, list(frame.columns), config)
            frame = frame.reindex(columns=list(columns))
            arrays = {field: _arrow_from_series(frame[name]) for name, field in columns.items()}
            yield pa.table(arrays)


def _arrow_from_series(series: pd.Series) -> pa.Array:
    """An Arrow array from a pandas column; a mixed object column (ints and strings) becomes text."""
    if series.dtype != object:
        return pa.array(series, from_pandas=True)
    return pa.array([_scalar_text(v) for v in series], type=pa.string())


def _scalar_text(value) -> str | None:
    """One JSON value as text: None for null, 8 for 8.0 (as Arrow prints whole-number ids)."""
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return None
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def _read_folder(folder: Path, config: ListingConfig) -> Iterator[pa.Table]:
    """Every video under `folder` (recursive, sorted): id from the relative path, caption from a sidecar .txt."""
    videos = sorted(
        (p for p in folder.rglob("*") if p.suffix.lower() in VIDEO_EXTENSIONS and p.is_file()),
        key=lambda p: p.relative_to(folder).as_posix(),
    )
    if not videos:
        logger.warning("folder %s holds no videos (extensions %s)", folder, ", ".join(sorted(VIDEO_EXTENSIONS)))
    for start in range(0, len(videos), config.read_chunk_rows):
        part = videos[start : start + config.read_chunk_rows]
        yield pa.table(
            {
                "video_id": [p.relative_to(folder).with_suffix("").as_posix() for p in part],
                "source": [str(p.absolute()) for p in part],
                "caption": [_folder_caption(p) for p in part],
            }
        )


def _folder_caption(video: Path) -> str:
    """The sidecar `<stem>.txt` when present, else the file stem with '_' and '-' turned into spaces."""
    sidecar = video.with_suffix(".txt")
    if sidecar.is_file():
        return sidecar.read_text(encoding="utf-8", errors="replace")
    return re.sub(r"[_-]+", " ", video.stem)


def _read_manifest(path: Path, config: ListingConfig, json_with_pandas: bool = False) -> Iterator[pa.Table]:
    """Tables of the manifest's rows; read failures become ManifestError naming the file."""
    if path.is_dir():
        yield from _read_folder(path, config)
        return
    suffix = path.suffix.lower()
    if suffix not in MANIFEST_FORMATS:
        raise ManifestError(
            f"manifest {path} has an unknown format {suffix or '(no extension)'!r}: "
            f"expected a folder of videos or a {', '.join(MANIFEST_FORMATS)} file"
        )
    if path.stat().st_size == 0:
        raise ManifestError(f"manifest {path} is empty")
    if suffix in (".csv", ".tsv"):
        reader, what = _read_csv, "CSV"
    elif suffix == ".parquet":
        reader, what = _read_parquet, "Parquet"
    else:
        reader, what = (_read_jsonl_pandas if json_with_pandas else _read_jsonl), "JSON lines (one object per line)"
    try:
        # Only errors raised while reading land here: `yield from` does not pass the consumer's errors in.
        yield from reader(path, config)
    except ManifestError:
        raise
    except (pa.ArrowException, OSError, ValueError) as exc:
        raise ManifestError(f"manifest {path} could not be read as {what}: {exc}") from exc


# ----------------------------------------------------------------------------------------------------------
# vectorised column parsing


def _as_text(column: pa.ChunkedArray) -> pa.ChunkedArray:
    """A column as trimmed strings, with blank values made null; whole-number floats print as integers."""
    kind = column.type
    if pa.types.is_null(kind):
        return pa.chunked_array([pa.nulls(len(column), pa.string())])
    if pa.types.is_floating(kind) and pc.all(pc.equal(pc.floor(column), column)).as_py() in (True, None):
        column = pc.cast(column, pa.int64())  # 1066674.0 (ids stored as float next to nulls) -> '1066674'
    text = pc.utf8_trim_whitespace(pc.cast(column, pa.string()))
    return pc.if_else(pc.equal(text, ""), pa.scalar(None, pa.string()), text)


def _number_or_null(text: pa.ChunkedArray, mask: pa.ChunkedArray) -> pa.ChunkedArray:
    """float64 of `text` where `mask` holds (text known to be numeric there), null elsewhere."""
    return pc.cast(pc.if_else(mask, text, pa.scalar(None, pa.string())), pa.float64())


def parse_durations(column: pa.ChunkedArray) -> np.ndarray:
    """Seconds from numbers, numeric strings or ISO-8601 durations (PT00H00M22S, PT1M5.5S); NaN if unusable."""
    kind = column.type
    if pa.types.is_integer(kind) or pa.types.is_floating(kind) or pa.types.is_decimal(kind):
        seconds = pc.cast(column, pa.float64())
    elif pa.types.is_string(kind) or pa.types.is_large_string(kind):
        seconds = _seconds_from_text(pc.utf8_trim_whitespace(column))
    else:
        seconds = pa.chunked_array([pa.nulls(len(column), pa.float64())])
    values = pc.fill_null(seconds, np.nan).to_numpy().astype(np.float64, copy=True)
    values[~np.isfinite(values) | (values < 0)] = np.nan
    return values


def _seconds_from_text(text: pa.ChunkedArray) -> pa.ChunkedArray:
    """Plain numbers first, then WebVid's fixed ISO form by slicing, then any other ISO form by regex."""
    plain = pc.fill_null(pc.match_substring_regex(text, PLAIN_NUMBER), False)
    seconds = _number_or_null(text, plain)
    webvid = pc.fill_null(pc.match_substring_regex(text, ISO_WEBVID), False)
    if pc.any(webvid).as_py():
        # 'PT' hh 'H' mm 'M' ss 'S': code units 2-4, 5-7, 8-10.
        parts = [_number_or_null(pc.utf8_slice_codeunits(text, a, a + 2), webvid) for a in (2, 5, 8)]
        webvid_s = pc.add(pc.add(pc.multiply(parts[0], 3600.0), pc.multiply(parts[1], 60.0)), parts[2])
        seconds = pc.coalesce(seconds, webvid_s)
    rest = pc.and_(pc.is_null(seconds), pc.fill_null(pc.starts_with(text, "P", ignore_case=True), False))
    if pc.any(rest).as_py():
        seconds = pc.coalesce(seconds, _iso_seconds(pc.if_else(rest, text, pa.scalar(None, pa.string()))))
    return seconds


def _iso_seconds(text: pa.ChunkedArray) -> pa.ChunkedArray:
    """Seconds of general ISO-8601 durations (days, hours, minutes, seconds); null when none is given."""
    groups = pc.extract_regex(text, ISO_GENERAL)
    total, present = pa.scalar(0.0), pa.scalar(False)
    for name, scale in (("d", 86400.0), ("h", 3600.0), ("m", 60.0), ("s", 1.0)):
        part = pc.struct_field(groups, name)  # '' where the optional group did not match
        value = _number_or_null(part, pc.not_equal(part, ""))
        total = pc.add(total, pc.multiply(pc.fill_null(value, 0.0), scale))
        present = pc.or_(present, pc.is_valid(value))
    # 'P' or 'PT' alone name no component: unusable, not zero.
    return pc.if_else(pc.fill_null(present, False), total, pa.scalar(None, pa.float64()))


def _file_stems(sources: pa.ChunkedArray) -> pa.ChunkedArray:
    """The file stem of each source: last path segment, minus query/fragment (URLs) and extension."""
    no_query = pc.if_else(
        pc.fill_null(pc.match_substring_regex(sources, r"^https?://", ignore_case=True), False),
        pc.replace_substring_regex(sources, r"[?#].*$", ""),
        sources,
    )
    stems = pc.struct_field(pc.extract_regex(no_query, r"(?P<stem>[^/\\]+?)(?:\.[^./\\]*)?$"), "stem")
    return pc.if_else(pc.equal(stems, ""), pa.scalar(None, pa.string()), stems)


def _id_keys(ids: pa.ChunkedArray) -> np.ndarray:
    """64-bit keys of ids for duplicate detection: the number itself for canonical integers, else a hash.

    WebVid ids are integers, which skips hashing (the slow part). Two different ids share a key only by a hash
    collision (about 3e-6 odds over 10M ids) or when a text id hashes to some integer id: negligible.
    """
    numeric = pc.fill_null(pc.match_substring_regex(ids, r"^(?:0|[1-9]\d{0,17})$"), False).to_numpy()
    keys = np.empty(len(ids), dtype=np.uint64)
    if numeric.any():
        numbers = pc.cast(pc.filter(ids, pa.array(numeric)), pa.int64()).to_numpy()
        keys[numeric] = numbers.astype(np.uint64)
    if not numeric.all():
        text = pc.filter(ids, pa.array(~numeric)).to_numpy(zero_copy_only=False)
        keys[~numeric] = pd.util.hash_array(text.astype(object, copy=False))
    return keys


def _mask(values: pa.ChunkedArray) -> np.ndarray:
    """A boolean Arrow column as a numpy mask, null counted as False."""
    return pc.fill_null(values, False).to_numpy(zero_copy_only=False).astype(bool)


def _drop(reason: np.ndarray, mask: np.ndarray, code: int) -> None:
    """Record `code` for the rows in `mask` that no earlier reason dropped."""
    reason[(reason == KEPT) & mask] = code


# ----------------------------------------------------------------------------------------------------------
# the listing pass


class _Lister:
    """Running state of one pass over a manifest: counts, the ids seen so far, and the kept rows."""

    def __init__(self, manifest: Path, config: ListingConfig):
        self.manifest = manifest
        self.config = config
        self.base_dir = manifest if manifest.is_dir() else manifest.parent
        self.download_dir = Path(config.download_dir or Path(tempfile.gettempdir()) / "fvlm-downloads")
        self.seen = np.empty(0, dtype=np.uint64)  # sorted keys of every id met so far
        self.dropped = np.zeros(len(DROP_REASONS), dtype=np.int64)
        self.rows = self.kept = self.probed = 0
        self.kept_tables: list[pa.Table] = []

    def add(self, chunk: pa.Table) -> None:
        """Filter one chunk of rows (canonical column names) and keep its survivors."""
        n = chunk.num_rows
        reason = np.full(n, KEPT, dtype=np.int8)
        nulls = pa.chunked_array([pa.nulls(n, pa.string())])
        sources, remote = self._sources(_as_text(chunk["source"]))
        _drop(reason, _mask(pc.is_null(sources)), NO_SOURCE)
        ids = _as_text(chunk["video_id"]) if "video_id" in chunk.column_names else _file_stems(sources)
        _drop(reason, _mask(pc.is_null(ids)), NO_ID)
        _drop(reason, self._duplicates(ids, reason == KEPT), DUPLICATE_ID)
        captions = _as_text(chunk["caption"]) if "caption" in chunk.column_names else nulls
        if self.config.require_caption:
            _drop(reason, _mask(pc.is_null(captions)), NO_CAPTION)
        _drop(reason, self._missing_files(sources, ~remote & (reason == KEPT)), MISSING_FILE)
        durations = parse_durations(chunk["duration"]) if "duration" in chunk.column_names else np.full(n, np.nan)
        self._probe_missing(durations, sources, remote, reason)
        _drop(reason, durations < self.config.min_duration_s, TOO_SHORT)  # NaN compares False
        _drop(reason, durations > self.config.max_duration_s, TOO_LONG)
        self._apply_limit(reason)

        keep = reason == KEPT
        self.rows += n
        self.kept += int(keep.sum())
        self.dropped += np.bincount(reason[~keep], minlength=len(DROP_REASONS))
        mask = pa.array(keep)
        self.kept_tables.append(
            pa.table(
                {
                    "video_id": pc.filter(ids, mask),
                    "source": pc.filter(sources, mask),
                    "caption": pc.filter(pc.fill_null(captions, ""), mask),
                    "duration_s": pa.array(durations[keep], type=pa.float64()),
                }
            )
        )

    def _sources(self, text: pa.ChunkedArray) -> tuple[pa.ChunkedArray, np.ndarray]:
        """Sources with local paths made absolute (relative to the manifest, file:// URIs unwrapped)."""
        remote = _mask(pc.match_substring_regex(text, r"^https?://", ignore_case=True))
        local = np.flatnonzero(_mask(pc.is_valid(text)) & ~remote)
        if len(local) == 0:
            return text, remote
        resolved = [_local_path(t, self.base_dir) for t in pc.take(text, pa.array(local)).to_pylist()]
        is_local = np.zeros(len(text), dtype=bool)
        is_local[local] = True
        text = pc.replace_with_mask(text.combine_chunks(), pa.array(is_local), pa.array(resolved, pa.string()))
        return pa.chunked_array([text]), remote

    def _duplicates(self, ids: pa.ChunkedArray, candidates: np.ndarray) -> np.ndarray:
        """Rows among `candidates` whose id appeared before, in this chunk or an earlier one."""
        rows = np.flatnonzero(candidates)
        keys = _id_keys(pc.take(ids, pa.array(rows)))
        first = np.zeros(len(keys), dtype=bool)
        first[np.unique(keys, return_index=True)[1]] = True  # first occurrence of each key in the chunk
        at = np.minimum(np.searchsorted(self.seen, keys), max(len(self.seen) - 1, 0))
        met = self.seen[at] == keys if len(self.seen) else np.zeros(len(keys), dtype=bool)
        repeated = ~first | met
        new = np.sort(keys[~repeated])
        self.seen = np.insert(self.seen, np.searchsorted(self.seen, new), new)  # stays sorted, O(n) copy
        out = np.zeros(len(candidates), dtype=bool)
        out[rows] = repeated
        return out

    def _missing_files(self, sources: pa.ChunkedArray, candidates: np.ndarray) -> np.ndarray:
        """Rows among `candidates` (local sources) whose file does not exist."""
        rows = np.flatnonzero(candidates)
        out = np.zeros(len(candidates), dtype=bool)
        if len(rows):
            paths = pc.take(sources, pa.array(rows)).to_pylist()
            out[rows] = [not os.path.isfile(p) for p in paths]
        return out

    def _probe_missing(
        self, durations: np.ndarray, sources: pa.ChunkedArray, remote: np.ndarray, reason: np.ndarray
    ) -> None:
        """Fill in missing durations by probing, in order, while fewer than `limit` videos are kept."""
        need = np.flatnonzero((reason == KEPT) & np.isnan(durations))
        if len(need) == 0:
            return
        if not self.config.probe_missing_durations:
            reason[need] = NO_DURATION
            return
        lo, hi, limit = self.config.min_duration_s, self.config.max_duration_s, self.config.limit
        in_bounds = (reason == KEPT) & (durations >= lo) & (durations <= hi)
        kept_before = self.kept + np.cumsum(in_bounds)  # kept rows up to each row, known durations only
        probed_in_bounds = 0
        for row in need:
            if limit is not None and kept_before[row] + probed_in_bounds >= limit:
                break  # this row and every later one is over the limit: no need to probe them
            seconds = self._probe(sources[int(row)].as_py(), bool(remote[row]))
            if seconds is None:
                reason[row] = NO_DURATION
            else:
                durations[row] = seconds
                probed_in_bounds += lo <= seconds <= hi

    def _probe(self, source: str, remote: bool) -> float | None:
        """Duration of one source; a remote one is downloaded first (a transient failure propagates)."""
        self.probed += 1
        if remote:
            try:
                source = str(fetch(source, self.download_dir, self.config.probe_timeout_s, attempts=3))
            except PermanentDownloadError as exc:
                logger.warning("%s; counting the row as no_duration", exc)
                return None
        seconds = probe_duration(source, self.config.probe_timeout_s)
        if seconds is None:
            logger.info("no duration found in %s", redact_url(source) if remote else source)
        return seconds

    def _apply_limit(self, reason: np.ndarray) -> None:
        """Mark rows beyond `limit` kept videos (counting earlier chunks) as over_limit."""
        if self.config.limit is None:
            return
        alive = np.flatnonzero(reason == KEPT)
        room = max(self.config.limit - self.kept, 0)
        reason[alive[room:]] = OVER_LIMIT

    def result(self) -> Listing:
        """The kept rows as a DataFrame, and the summary."""
        if self.kept_tables:
            table = pa.concat_tables(self.kept_tables)
        else:
            table = pa.table(
                {name: pa.array([], pa.string()) for name in ("video_id", "source", "caption")}
                | {"duration_s": pa.array([], pa.float64())}
            )
        summary = {
            "manifest": str(self.manifest),
            "rows": self.rows,
            "kept": self.kept,
            "dropped": {name: int(count) for name, count in zip(DROP_REASONS, self.dropped)},
            "min_duration_s": self.config.min_duration_s,
            "max_duration_s": self.config.max_duration_s,
            "probed": self.probed,
        }
        return Listing(videos=table.to_pandas(), summary=summary)


def _local_path(text: str, base_dir: Path) -> str:
    """Absolute path of a local source: file:// URIs unwrapped, relative paths joined to the manifest folder."""
    if text[:5].lower() == "file:":
        text = urllib.request.url2pathname(urllib.parse.urlsplit(text).path)
    return os.path.normpath(os.path.join(base_dir, text))  # join keeps an absolute path as it is


def list_videos(manifest: str | os.PathLike, config: ListingConfig | None = None) -> Listing:
    """List the usable videos of a manifest file or folder; see the module docstring for the rules.

    Raises ManifestError for a manifest that cannot be used, and TransientDownloadError when a remote file that
    must be probed still fails to download after 3 attempts (the Prefect task retries the listing then; cached
    downloads are kept). A permanent download failure (e.g. HTTP 404) only drops its row as no_duration.
    """
    config = config or ListingConfig()
    path = Path(manifest).expanduser().absolute()
    if not path.exists():
        raise ManifestError(f"manifest {path} does not exist (check the manifest path)")
    try:
        return _list(path, config, json_with_pandas=False)
    except _RereadWithPandas as exc:
        logger.info("Arrow could not read %s (%s); reading it again with pandas, more slowly", path, exc)
        return _list(path, config, json_with_pandas=True)


def _list(path: Path, config: ListingConfig, json_with_pandas: bool) -> Listing:
    lister = _Lister(path, config)
    start = time.perf_counter()
    for chunk in _read_manifest(path, config, json_with_pandas):
        lister.add(chunk)
        logger.info(
            "listing %s: %d rows read, %d kept (%.0f rows/s)",
            path.name,
            lister.rows,
            lister.kept,
            lister.rows / max(time.perf_counter() - start, 1e-9),
        )
    return lister.result()


@task(retries=2, retry_delay_seconds=30)
def list_videos_task(manifest: str, config: ListingConfig | None = None) -> Listing:
    """List a manifest's videos and log the summary (retried: a probe's download can fail transiently)."""
    listing = list_videos(manifest, config)
    summary = listing.summary
    dropped = {reason: count for reason, count in summary["dropped"].items() if count}
    get_run_logger().info(
        "listed %s: %d rows, %d kept, %d probed; dropped %s",
        summary["manifest"],
        summary["rows"],
        summary["kept"],
        summary["probed"],
        dropped or "none",
    )
    return listing
