"""Seconds of a video: parsed from a manifest column (seconds, ISO-8601, clock time) or probed from the file."""

import logging
import re
import subprocess

import imageio_ffmpeg
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from tasks.listing.columns import decode_utf8

logger = logging.getLogger(__name__)

FFMPEG_DURATION = re.compile(r"Duration:\s*(\d+):(\d{2}):(\d{2}(?:\.\d+)?)")
# Exactly WebVid's form, PT00H00M22S: parsed by slicing, ten times faster than the general pattern below.
ISO_WEBVID = r"^PT\d\dH\d\dM\d\dS$"
ISO_GENERAL = (
    r"^[Pp](?:(?P<d>\d+(?:\.\d*)?)[Dd])?"
    r"(?:[Tt](?:(?P<h>\d+(?:\.\d*)?)[Hh])?(?:(?P<m>\d+(?:\.\d*)?)[Mm])?(?:(?P<s>\d+(?:\.\d*)?)[Ss])?)?$"
)
PLAIN_NUMBER = r"^(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?$"
CLOCK = r"^(?:(?P<h>\d+):)?(?P<m>\d{1,2}):(?P<s>\d{1,2}(?:\.\d*)?)$"  # 0:22, 00:00:22, 1:02:03.5


def parse_durations(column: pa.ChunkedArray) -> np.ndarray:
    """Seconds from numbers, numeric strings, ISO-8601 durations (PT00H00M22S, PT1M5.5S) or clock times
    (00:00:22, 1:05.5); NaN if unusable."""
    kind = column.type
    if pa.types.is_dictionary(kind):
        column, kind = pc.cast(column, kind.value_type), kind.value_type
    if pa.types.is_binary(kind) or pa.types.is_large_binary(kind):
        column, kind = decode_utf8(column), pa.string()
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


def _number_or_null(text: pa.ChunkedArray, mask: pa.ChunkedArray) -> pa.ChunkedArray:
    """float64 of `text` where `mask` holds (text known to be numeric there), null elsewhere."""
    return pc.cast(pc.if_else(mask, text, pa.scalar(None, pa.string())), pa.float64())


# ----------------------------------------------------------------------------------------------------------
# probing the file (durations the manifest lacks)


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

