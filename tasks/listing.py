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
- a source with a scheme other than http(s):// or file:// (s3://, ftp://): `unsupported_source`; a local
  path that is absent or not a regular file (a folder): `missing_file`;
- a negative, NaN, infinite or unparseable duration: probed from the file like a missing one (`no_duration`
  when probing is off or finds none); a remote file to probe that does not download: `download_failed`.
"""

import codecs
import difflib
import json
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

from tasks.download import DownloadError, fetch, redact_url

logger = logging.getLogger(__name__)

DROP_REASONS = (
    "malformed_row",
    "no_source",
    "unsupported_source",
    "no_id",
    "duplicate_id",
    "no_caption",
    "caption_too_long",
    "missing_file",
    "download_failed",
    "no_duration",
    "too_short",
    "too_long",
    "over_limit",
)
(
    MALFORMED_ROW, NO_SOURCE, UNSUPPORTED_SOURCE, NO_ID, DUPLICATE_ID, NO_CAPTION, CAPTION_TOO_LONG, MISSING_FILE,
    DOWNLOAD_FAILED, NO_DURATION, TOO_SHORT, TOO_LONG, OVER_LIMIT,
) = range(len(DROP_REASONS))  # fmt: skip
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
CLOCK = r"^(?:(?P<h>\d+):)?(?P<m>\d{1,2}):(?P<s>\d{1,2}(?:\.\d*)?)$"  # 0:22, 00:00:22, 1:02:03.5
# Nothing but whitespace, separators, control and format characters (zero-width space, BOM): no caption.
BLANK = r"^[\s\p{Z}\p{Cc}\p{Cf}]*$"
SCHEME = r"^[A-Za-z][A-Za-z0-9+.-]*://"
# A codec that decodes UTF-8 with invalid bytes replaced by U+FFFD, for Arrow's CSV reader (which takes codec names).
UTF8_REPLACE = "fvlm-utf-8-replace"


def _find_codec(name: str) -> codecs.CodecInfo | None:
    if name != UTF8_REPLACE.replace("-", "_") and name != UTF8_REPLACE:
        return None
    utf8 = codecs.lookup("utf-8")
    return codecs.CodecInfo(
        name=UTF8_REPLACE, encode=utf8.encode, decode=lambda data, errors="replace": utf8.decode(data, errors),
        incrementalencoder=utf8.incrementalencoder,
        incrementaldecoder=lambda errors="replace": utf8.incrementaldecoder(errors),
    )


codecs.register(_find_codec)


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


@dataclass
class Listing:
    """The kept videos, in manifest order, and what happened to the other rows."""

    videos: pd.DataFrame  # columns video_id, source, caption (str) and duration_s (float)
    summary: dict  # manifest, rows, kept, dropped {reason: count}, min/max_duration_s, probed


class _ReadCarefully(Exception):
    """Arrow's fast reader gave up (invalid UTF-8, a JSON column whose type changes between rows, a JSON line
    that is not an object); the slower careful readers take such files."""


class _ReadStats:
    """Rows a reader had to skip as malformed; they count as rows read, dropped as `malformed_row`."""

    LOGGED = 5  # warnings for the first few; the count says the rest

    def __init__(self, path: Path):
        self.path = path
        self.malformed = 0

    def skip(self, where: str, what: str) -> None:
        self.malformed += 1
        if self.malformed <= self.LOGGED:
            logger.warning("manifest %s: skipping malformed row at %s: %s", self.path, where, what[:200])

    def csv_row(self, row: pacsv.InvalidRow) -> str:
        """invalid_row_handler of Arrow's CSV reader: count the row and skip it."""
        where = f"line {row.number}" if row.number is not None and row.number >= 0 else "a row"
        self.skip(where, f"{row.actual_columns} fields where the header has {row.expected_columns}: {row.text!r}")
        return "skip"


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
            continue
        near = _near_miss(accepted, by_lower)
        if field == "source" or (field == "caption" and config.require_caption):
            expected = ", ".join(repr(a) for a in accepted)
            hint = f"; is {near!r} meant to be {accepted[-1]!r}? rename it" if near else ""
            hint += "; or set require_caption=False" if field == "caption" else ""
            raise ManifestError(
                f"manifest {path} has no {field} column: expected one of {expected} "
                f"(columns found: {', '.join(repr(n) for n in names) or 'none'}){hint}"
            )
        if near:
            fallback = "probed from the files" if field == "duration" else "taken from the file names"
            logger.warning(
                "manifest %s has no %s column, but a column %r: %ss are %s; rename it to %r if it holds them",
                path, field, near, field, fallback, accepted[-1],
            )  # fmt: skip
    return picked


def _near_miss(accepted: tuple[str, ...], by_lower: dict[str, str]) -> str | None:
    """A column whose name looks like a misspelling of an accepted one ('captoin', 'duraton'), if any."""
    for name in accepted:
        close = difflib.get_close_matches(name.lower(), list(by_lower), n=1, cutoff=0.75)
        if close:
            return by_lower[close[0]]
    return None


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


def _read_csv(path: Path, config: ListingConfig, stats: _ReadStats, careful: bool) -> Iterator[pa.Table]:
    """CSV/TSV with Arrow's reader. The fast pass fails on invalid UTF-8 or a row with the wrong number of
    fields; the careful pass decodes with U+FFFD replacements and skips (and counts) such rows."""
    if path.suffix.lower() == ".tsv":
        # TSV has no quoting: a caption that starts with '"' is text, not the start of a quoted field.
        parse = pacsv.ParseOptions(delimiter="\t", quote_char=False)
    else:
        parse = pacsv.ParseOptions(newlines_in_values=True)  # quoted captions may span lines
    # Only the careful pass skips rows: Arrow decodes a bad row's text for the handler, which fails on bad UTF-8.
    read = pacsv.ReadOptions(block_size=4 << 20, encoding=UTF8_REPLACE if careful else "utf8")
    try:
        if careful:
            parse.invalid_row_handler = lambda row: "skip"  # the header's pass: bad rows are counted below
        with pacsv.open_csv(path, read_options=read, parse_options=parse) as head:
            columns = _pick_columns(path, head.schema.names, config)
        if careful:
            parse.invalid_row_handler = stats.csv_row
        convert = pacsv.ConvertOptions(
            include_columns=list(columns),
            column_types={name: pa.string() for name in columns},  # no type guessing: ids stay text
            strings_can_be_null=True,  # an empty cell is missing
        )
        with pacsv.open_csv(path, read_options=read, parse_options=parse, convert_options=convert) as reader:
            yield from _rechunk(reader, config.read_chunk_rows, columns)
    except pa.ArrowInvalid as exc:
        if careful:
            raise
        raise _ReadCarefully(str(exc)) from exc


def _read_parquet(path: Path, config: ListingConfig) -> Iterator[pa.Table]:
    file = pq.ParquetFile(path)
    columns = _pick_columns(path, file.schema_arrow.names, config)
    for batch in file.iter_batches(batch_size=config.read_chunk_rows, columns=list(columns)):
        yield pa.Table.from_batches([batch]).rename_columns(columns)


def _read_jsonl(path: Path, config: ListingConfig, stats: _ReadStats) -> Iterator[pa.Table]:
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
        raise _ReadCarefully(str(exc)) from exc


def _read_jsonl_lines(path: Path, config: ListingConfig, stats: _ReadStats) -> Iterator[pa.Table]:
    """JSON lines parsed one by one in Python: slower, but takes columns whose type changes from row to row,
    invalid UTF-8 (replaced by U+FFFD) and lines that are not JSON objects (skipped as malformed rows)."""
    columns: dict[str, str] | None = None
    records: list[dict] = []
    with path.open(encoding="utf-8", errors="replace") as lines:
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except ValueError:
                record = None
            if not isinstance(record, dict):
                stats.skip(f"line {number}", f"not a JSON object: {line.strip()!r}")
                continue
            records.append(record)
            if len(records) == config.read_chunk_rows:
                columns = columns or _pick_columns(path, list(dict.fromkeys(k for r in records for k in r)), config)
                yield _records_table(records, columns)
                records = []
    if records:
        columns = columns or _pick_columns(path, list(dict.fromkeys(k for r in records for k in r)), config)
        yield _records_table(records, columns)
    elif columns is None and stats.malformed:
        raise ManifestError(
            f"manifest {path} could not be read as JSON lines: none of its lines is a JSON object "
            f"(a JSON array must be written one object per line)"
        )


def _records_table(records: list[dict], columns: dict[str, str]) -> pa.Table:
    """The picked columns of parsed JSON objects, canonically named."""
    return pa.table({field: _json_column([r.get(name) for r in records]) for name, field in columns.items()})


def _json_column(values: list) -> pa.Array:
    """Numbers stay numbers (durations); any other mix of types becomes text."""
    kinds = {type(v) for v in values if v is not None}
    if kinds and kinds <= {int}:
        try:
            return pa.array(values, pa.int64())
        except OverflowError:  # beyond 64 bits: text keeps every digit
            pass
    elif kinds and kinds <= {int, float}:
        return pa.array(values, pa.float64(), from_pandas=True)  # NaN: missing
    return pa.array([_scalar_text(v) for v in values], type=pa.string())


def _scalar_text(value) -> str | None:
    """One JSON value as text, as Arrow's reader would print it: None for null, NaN, lists and objects (no
    text); 8 for 8.0; true/false for booleans."""
    if value is None or isinstance(value, (list, dict)) or (isinstance(value, float) and not np.isfinite(value)):
        return None
    if isinstance(value, bool):
        return "true" if value else "false"
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


def _read_manifest(path: Path, config: ListingConfig, stats: _ReadStats, careful: bool) -> Iterator[pa.Table]:
    """Tables of the manifest's rows; read failures become ManifestError naming the file.

    The fast readers raise _ReadCarefully for files only the careful (slower) readers can take."""
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
        rows, what = _read_csv(path, config, stats, careful), "CSV"
    elif suffix == ".parquet":
        rows, what = _read_parquet(path, config), "Parquet"
    else:
        reader = _read_jsonl_lines if careful else _read_jsonl
        rows, what = reader(path, config, stats), "JSON lines (one object per line)"
    try:
        # Only errors raised while reading land here: `yield from` does not pass the consumer's errors in.
        yield from rows
    except ManifestError:
        raise
    except (pa.ArrowException, OSError, ValueError) as exc:
        raise ManifestError(f"manifest {path} could not be read as {what}: {exc}") from exc


# ----------------------------------------------------------------------------------------------------------
# vectorised column parsing


def _as_text(column: pa.ChunkedArray) -> pa.ChunkedArray:
    """A column as trimmed strings, with blank values made null; whole-number floats print as integers.

    Blank means only whitespace, control or format characters. Values that are no text (lists, structs) and
    floats that are no numbers (NaN, inf) are null too; bytes that are not UTF-8 are replaced by U+FFFD.
    """
    kind = column.type
    nulls = pa.chunked_array([pa.nulls(len(column), pa.string())])
    if pa.types.is_null(kind) or pa.types.is_nested(kind):
        return nulls
    if pa.types.is_dictionary(kind):
        column = pc.cast(column, kind.value_type)
        kind = kind.value_type
    if pa.types.is_binary(kind) or pa.types.is_large_binary(kind) or pa.types.is_fixed_size_binary(kind):
        column = _decode_utf8(column)
    elif pa.types.is_floating(kind):
        column = _finite_numbers(column)
        whole = pc.and_(pc.equal(pc.floor(column), column), pc.less(pc.abs(column), 9.2e18))  # fits in int64
        if pc.all(whole).as_py() in (True, None):
            column = pc.cast(column, pa.int64())  # 1066674.0 (ids stored as float next to nulls) -> '1066674'
    try:
        text = pc.utf8_trim_whitespace(pc.cast(column, pa.string()))
    except (pa.ArrowNotImplementedError, pa.ArrowInvalid) as exc:
        logger.warning("a column of type %s cannot be read as text (%s); its values count as missing", kind, exc)
        return nulls
    return pc.if_else(_mask(pc.match_substring_regex(text, BLANK)), pa.scalar(None, pa.string()), text)


def _valid_utf8(table: pa.Table) -> pa.Table:
    """The table with invalid UTF-8 in its string columns replaced by U+FFFD (Arrow's JSON reader lets it in)."""
    try:
        table.validate(full=True)  # checks UTF-8 among other things; one pass over the text, cheap
        return table
    except pa.ArrowInvalid:
        pass
    for i, column in enumerate(table.columns):
        if pa.types.is_string(column.type) or pa.types.is_large_string(column.type):
            try:
                column.validate(full=True)
            except pa.ArrowInvalid:
                table = table.set_column(i, table.field(i).name, _decode_utf8(pc.cast(column, pa.binary())))
    return table


def _decode_utf8(column: pa.ChunkedArray) -> pa.ChunkedArray:
    """Bytes as UTF-8 text; a value that is not valid UTF-8 gets U+FFFD for its bad bytes."""
    try:
        return pc.cast(column, pa.string())
    except pa.ArrowInvalid:
        text, repaired = [], 0
        for value in column.to_pylist():
            try:
                text.append(None if value is None else bytes(value).decode("utf-8"))
            except UnicodeDecodeError:
                text.append(bytes(value).decode("utf-8", errors="replace"))
                repaired += 1
        logger.warning("%d values are not valid UTF-8; their bad bytes are replaced by U+FFFD", repaired)
        return pa.chunked_array([pa.array(text, pa.string())])


def _finite_numbers(column: pa.ChunkedArray) -> pa.ChunkedArray:
    """float64 of a floating column with NaN and infinities made null."""
    column = pc.cast(column, pa.float64())
    return pc.if_else(pc.fill_null(pc.is_finite(column), False), column, pa.scalar(None, pa.float64()))


def _number_or_null(text: pa.ChunkedArray, mask: pa.ChunkedArray) -> pa.ChunkedArray:
    """float64 of `text` where `mask` holds (text known to be numeric there), null elsewhere."""
    return pc.cast(pc.if_else(mask, text, pa.scalar(None, pa.string())), pa.float64())


def parse_durations(column: pa.ChunkedArray) -> np.ndarray:
    """Seconds from numbers, numeric strings, ISO-8601 durations (PT00H00M22S, PT1M5.5S) or clock times
    (00:00:22, 1:05.5); NaN if unusable."""
    kind = column.type
    if pa.types.is_dictionary(kind):
        column, kind = pc.cast(column, kind.value_type), kind.value_type
    if pa.types.is_binary(kind) or pa.types.is_large_binary(kind):
        column, kind = _decode_utf8(column), pa.string()
    if pa.types.is_integer(kind) or pa.types.is_floating(kind) or pa.types.is_decimal(kind):
        seconds = pc.cast(column, pa.float64())
    elif pa.types.is_duration(kind):  # e.g. pandas Timedelta written to Parquet
        per_second = {"s": 1.0, "ms": 1e3, "us": 1e6, "ns": 1e9}[kind.unit]
        seconds = pc.divide(pc.cast(pc.cast(column, pa.int64()), pa.float64()), per_second)
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
    clock = pc.and_(pc.is_null(seconds), pc.fill_null(pc.match_substring_regex(text, CLOCK), False))
    if pc.any(clock).as_py():
        seconds = pc.coalesce(seconds, _clock_seconds(pc.if_else(clock, text, pa.scalar(None, pa.string()))))
    return seconds


def _clock_seconds(text: pa.ChunkedArray) -> pa.ChunkedArray:
    """Seconds of clock-style durations, [h:]mm:ss[.f] (what ffprobe and many exports print); null otherwise."""
    groups = pc.extract_regex(text, CLOCK)
    total = pa.scalar(0.0)
    for name, scale in (("h", 3600.0), ("m", 60.0), ("s", 1.0)):
        part = pc.struct_field(groups, name)
        total = pc.add(total, pc.multiply(pc.fill_null(_number_or_null(part, pc.not_equal(part, "")), 0.0), scale))
    return pc.if_else(pc.is_valid(groups), total, pa.scalar(None, pa.float64()))


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
        self.read_stats = _ReadStats(manifest)

    def add(self, chunk: pa.Table) -> None:
        """Filter one chunk of rows (canonical column names) and keep its survivors."""
        chunk = _valid_utf8(chunk)
        n = chunk.num_rows
        reason = np.full(n, KEPT, dtype=np.int8)
        nulls = pa.chunked_array([pa.nulls(n, pa.string())])
        sources, remote, unsupported = self._sources(_as_text(chunk["source"]))
        _drop(reason, _mask(pc.is_null(sources)), NO_SOURCE)
        _drop(reason, unsupported, UNSUPPORTED_SOURCE)
        ids = _as_text(chunk["video_id"]) if "video_id" in chunk.column_names else _file_stems(sources)
        _drop(reason, _mask(pc.is_null(ids)), NO_ID)
        _drop(reason, self._duplicates(ids, reason == KEPT), DUPLICATE_ID)
        captions = _as_text(chunk["caption"]) if "caption" in chunk.column_names else nulls
        if self.config.require_caption:
            _drop(reason, _mask(pc.is_null(captions)), NO_CAPTION)
        if self.config.max_caption_chars is not None:
            _drop(reason, _mask(pc.greater(pc.utf8_length(captions), self.config.max_caption_chars)), CAPTION_TOO_LONG)
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

    def _sources(self, text: pa.ChunkedArray) -> tuple[pa.ChunkedArray, np.ndarray, np.ndarray]:
        """Sources with local paths made absolute (relative to the manifest, file:// URIs unwrapped), and the
        masks of remote (http, https) and unsupported (s3://, ftp://, ...) ones."""
        remote = _mask(pc.match_substring_regex(text, r"^https?://", ignore_case=True))
        schemed = _mask(pc.match_substring_regex(text, SCHEME))
        unsupported = schemed & ~remote & ~_mask(pc.starts_with(text, "file:", ignore_case=True))
        local = np.flatnonzero(_mask(pc.is_valid(text)) & ~remote & ~unsupported)
        if len(local) == 0:
            return text, remote, unsupported
        resolved = [_local_path(t, self.base_dir) for t in pc.take(text, pa.array(local)).to_pylist()]
        is_local = np.zeros(len(text), dtype=bool)
        is_local[local] = True
        text = pc.replace_with_mask(text.combine_chunks(), pa.array(is_local), pa.array(resolved, pa.string()))
        return pa.chunked_array([text]), remote, unsupported

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
        """Rows among `candidates` (local sources) with no regular file at their path (absent, a folder, ...)."""
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
            try:
                seconds = self._probe(sources[int(row)].as_py(), bool(remote[row]))
            except DownloadError as exc:
                logger.warning("%s; counting the row as download_failed", exc)
                reason[row] = DOWNLOAD_FAILED
                continue
            if seconds is None:
                reason[row] = NO_DURATION
            else:
                durations[row] = seconds
                probed_in_bounds += lo <= seconds <= hi

    def _probe(self, source: str, remote: bool) -> float | None:
        """Duration of one source; a remote one is downloaded first (DownloadError when that fails)."""
        self.probed += 1
        if remote:
            timeout, attempts = self.config.probe_timeout_s, self.config.download_attempts
            source = str(fetch(source, self.download_dir, timeout, attempts=attempts))
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
        self.dropped[MALFORMED_ROW] = self.read_stats.malformed  # skipped by the reader, never seen by add()
        summary = {
            "manifest": str(self.manifest),
            "rows": self.rows + self.read_stats.malformed,
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
        try:
            text = urllib.request.url2pathname(urllib.parse.urlsplit(text).path)
        except ValueError:  # e.g. 'file://[::1/x.mp4': kept as written, it names no file (missing_file)
            pass
    return os.path.normpath(os.path.join(base_dir, text))  # join keeps an absolute path as it is


def list_videos(manifest: str | os.PathLike, config: ListingConfig | None = None) -> Listing:
    """List the usable videos of a manifest file or folder; see the module docstring for the rules.

    Raises ManifestError for a manifest that cannot be used. Bad rows never raise: each is counted under its
    drop reason. A remote file that must be probed and does not download (HTTP 404, 500 or a timeout on each
    of `download_attempts` tries) drops its row as download_failed.
    """
    config = config or ListingConfig()
    path = Path(manifest).expanduser().absolute()
    if not path.exists():
        raise ManifestError(f"manifest {path} does not exist (check the manifest path)")
    try:
        return _list(path, config, careful=False)
    except _ReadCarefully as exc:
        logger.info("Arrow could not read %s (%s); reading it again, more slowly and carefully", path, exc)
        return _list(path, config, careful=True)


def _list(path: Path, config: ListingConfig, careful: bool) -> Listing:
    lister = _Lister(path, config)
    start = time.perf_counter()
    for chunk in _read_manifest(path, config, lister.read_stats, careful):
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
