"""Manifest readers: CSV/TSV, Parquet, JSON lines or a folder of videos, streamed as Arrow tables in chunks.

Each reader yields tables whose columns carry the canonical names of COLUMN_NAMES. The fast readers raise
ReadCarefully for files only the careful (slower) readers can take.
"""

import codecs
import difflib
import json
import logging
import re
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.json as pajson
import pyarrow.parquet as pq

from tasks.listing.config import ListingConfig, ManifestError

logger = logging.getLogger(__name__)

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


class ReadCarefully(Exception):
    """Arrow's fast reader gave up (invalid UTF-8, a JSON column whose type changes between rows, a JSON line
    that is not an object); the slower careful readers take such files."""


class ReadStats:
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


def _read_csv(path: Path, config: ListingConfig, stats: ReadStats, careful: bool) -> Iterator[pa.Table]:
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
        raise ReadCarefully(str(exc)) from exc


def _read_parquet(path: Path, config: ListingConfig) -> Iterator[pa.Table]:
    file = pq.ParquetFile(path)
    columns = _pick_columns(path, file.schema_arrow.names, config)
    for batch in file.iter_batches(batch_size=config.read_chunk_rows, columns=list(columns)):
        yield pa.Table.from_batches([batch]).rename_columns(columns)


def _read_jsonl(path: Path, config: ListingConfig, stats: ReadStats) -> Iterator[pa.Table]:
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
        raise ReadCarefully(str(exc)) from exc


def _read_jsonl_lines(path: Path, config: ListingConfig, stats: ReadStats) -> Iterator[pa.Table]:
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


def read_manifest(path: Path, config: ListingConfig, stats: ReadStats, careful: bool) -> Iterator[pa.Table]:
    """Tables of the manifest's rows; read failures become ManifestError naming the file.

    The fast readers raise ReadCarefully for files only the careful (slower) readers can take."""
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
