"""Vectorised clean-up of manifest columns: text that is trimmed, valid UTF-8 and null when blank."""

import logging

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

logger = logging.getLogger(__name__)

# Nothing but whitespace, separators, control and format characters (zero-width space, BOM): no caption.
BLANK = r"^[\s\p{Z}\p{Cc}\p{Cf}]*$"


def as_text(column: pa.ChunkedArray) -> pa.ChunkedArray:
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
        column = decode_utf8(column)
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
    return pc.if_else(to_mask(pc.match_substring_regex(text, BLANK)), pa.scalar(None, pa.string()), text)


def valid_utf8(table: pa.Table) -> pa.Table:
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
                table = table.set_column(i, table.field(i).name, decode_utf8(pc.cast(column, pa.binary())))
    return table


def decode_utf8(column: pa.ChunkedArray) -> pa.ChunkedArray:
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


def to_mask(values: pa.ChunkedArray) -> np.ndarray:
    """A boolean Arrow column as a numpy mask, null counted as False."""
    return pc.fill_null(values, False).to_numpy(zero_copy_only=False).astype(bool)

