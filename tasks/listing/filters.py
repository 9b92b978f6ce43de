"""The listing pass: every row gets its first drop reason, missing durations are probed, kept rows collected."""

import logging
import os
import time
import urllib.parse
import urllib.request
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from tasks.download import DownloadError, download_folder, fetch, redact_url, unsupported_reason
from tasks.listing.columns import as_text, to_mask, valid_utf8
from tasks.listing.config import ListingConfig, ManifestError
from tasks.listing.durations import parse_durations, probe_duration
from tasks.listing.readers import ReadCarefully, ReadStats, read_manifest

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
SCHEME = r"^(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*)://"


@dataclass
class Listing:
    """The kept videos, in manifest order, and what happened to the other rows."""

    videos: pd.DataFrame  # columns video_id, source, caption (str) and duration_s (float)
    summary: dict  # manifest, rows, kept, dropped {reason: count}, min/max_duration_s, probed


# ----------------------------------------------------------------------------------------------------------
# vectorised row helpers


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
        self.download_dir = download_folder(config.download_dir)
        self.seen = np.empty(0, dtype=np.uint64)  # sorted keys of every id met so far
        self.dropped = np.zeros(len(DROP_REASONS), dtype=np.int64)
        self.rows = self.kept = self.probed = 0
        self.unsupported: Counter[str] = Counter()  # rows dropped as unsupported_source, by scheme
        self.kept_tables: list[pa.Table] = []
        self.read_stats = ReadStats(manifest)

    def add(self, chunk: pa.Table) -> None:
        """Filter one chunk of rows (canonical column names) and keep its survivors."""
        chunk = valid_utf8(chunk)
        n = chunk.num_rows
        reason = np.full(n, KEPT, dtype=np.int8)
        nulls = pa.chunked_array([pa.nulls(n, pa.string())])
        sources, remote, unsupported = self._sources(as_text(chunk["source"]))
        _drop(reason, to_mask(pc.is_null(sources)), NO_SOURCE)
        _drop(reason, unsupported, UNSUPPORTED_SOURCE)
        ids = as_text(chunk["video_id"]) if "video_id" in chunk.column_names else _file_stems(sources)
        _drop(reason, to_mask(pc.is_null(ids)), NO_ID)
        _drop(reason, self._duplicates(ids, reason == KEPT), DUPLICATE_ID)
        captions = as_text(chunk["caption"]) if "caption" in chunk.column_names else nulls
        if self.config.require_caption:
            _drop(reason, to_mask(pc.is_null(captions)), NO_CAPTION)
        if self.config.max_caption_chars is not None:
            _drop(reason, to_mask(pc.greater(pc.utf8_length(captions), self.config.max_caption_chars)), CAPTION_TOO_LONG)
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
        masks of remote (http(s), installed fsspec protocols: s3://, ...) and unsupported (nosuch://) ones."""
        remote = to_mask(pc.match_substring_regex(text, r"^https?://", ignore_case=True))
        other = to_mask(pc.match_substring_regex(text, SCHEME)) & ~remote
        other &= ~to_mask(pc.starts_with(text, "file:", ignore_case=True))
        unsupported = np.zeros(len(text), dtype=bool)
        if other.any():  # few rows in most manifests: the http(s) test above is the fast path
            fetchable, unsupported = self._by_scheme(text, other)
            remote |= fetchable
        local = np.flatnonzero(to_mask(pc.is_valid(text)) & ~remote & ~unsupported)
        if len(local) == 0:
            return text, remote, unsupported
        resolved = [_local_path(t, self.base_dir) for t in pc.take(text, pa.array(local)).to_pylist()]
        is_local = np.zeros(len(text), dtype=bool)
        is_local[local] = True
        text = pc.replace_with_mask(text.combine_chunks(), pa.array(is_local), pa.array(resolved, pa.string()))
        return pa.chunked_array([text]), remote, unsupported

    def _by_scheme(self, text: pa.ChunkedArray, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Masks of the `rows` (schemed, not http, not file) fsspec can download, and of those it cannot."""
        at = np.flatnonzero(rows)
        schemes = pc.utf8_lower(pc.struct_field(pc.extract_regex(pc.take(text, pa.array(at)), SCHEME), "scheme"))
        bad = [s for s in pc.unique(schemes).to_pylist() if unsupported_reason(s) is not None]
        is_bad = to_mask(pc.is_in(schemes, value_set=pa.array(bad, pa.string())))
        counts = pc.value_counts(pc.filter(schemes, pa.array(is_bad))).to_pylist()
        self.unsupported.update({count["values"]: count["counts"] for count in counts})
        fetchable, unsupported = np.zeros_like(rows), np.zeros_like(rows)
        fetchable[at], unsupported[at] = ~is_bad, is_bad
        return fetchable, unsupported

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
        path = source
        if remote:  # ffmpeg cannot open s3:// and the like: probe the cached copy, which decoding reuses
            timeout, attempts = self.config.probe_timeout_s, self.config.download_attempts
            path = str(fetch(source, self.download_dir, timeout, attempts=attempts))
        seconds = probe_duration(path, self.config.probe_timeout_s)
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
        for scheme, count in sorted(self.unsupported.items()):
            logger.warning("%d rows dropped as unsupported_source: %s", count, unsupported_reason(scheme))
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
    """List the usable videos of a manifest file or folder; see `tasks.listing`'s docstring for the rules.

    Raises ManifestError for a manifest that cannot be used. Bad rows never raise: each is counted under its
    drop reason. A remote file that must be probed and does not download (HTTP 404, a missing S3 key, an HTTP
    500 or a timeout on each of `download_attempts` tries) drops its row as download_failed.
    """
    config = config or ListingConfig()
    path = Path(manifest).expanduser().absolute()
    if not path.exists():
        raise ManifestError(f"manifest {path} does not exist (check the manifest path)")
    try:
        return _list(path, config, careful=False)
    except ReadCarefully as exc:
        logger.info("Arrow could not read %s (%s); reading it again, more slowly and carefully", path, exc)
        return _list(path, config, careful=True)


def _list(path: Path, config: ListingConfig, careful: bool) -> Listing:
    lister = _Lister(path, config)
    start = time.perf_counter()
    for chunk in read_manifest(path, config, lister.read_stats, careful):
        lister.add(chunk)
        logger.info(
            "listing %s: %d rows read, %d kept (%.0f rows/s)",
            path.name,
            lister.rows,
            lister.kept,
            lister.rows / max(time.perf_counter() - start, 1e-9),
        )
    return lister.result()

