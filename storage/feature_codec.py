"""How `dino_features` are stored: float16 (the seed's), or the compact int8 codec at half the bytes.

int8 (opt-in, chosen when a store is created and recorded in its attributes as `feature_codec`): every video
gets, per feature channel, an offset and a scale over all of its frames and tokens,

    offset[d] = (max[d] + min[d]) / 2        scale[d] = (max[d] - min[d]) / 254
    q[f, n, d] = round((x[f, n, d] - offset[d]) / scale[d])   in [-127, 127]

so each channel's range of that video is cut into 254 even steps, and the value is read back as
q * scale + offset (the error of a value is at most scale / 2). Per channel, because DINOv2's channels differ
in range by orders of magnitude; per video, because 384 float32 scales and offsets (3 KiB) are next to nothing
beside the 3 MB of codes, whereas a scale per frame or per token would cost more than the target allows. The
codes are stored raw (int8 needs no byte order), so the loader still reads only the frames it needs, from a
local file or with ranged requests to an object store; `scale` and `offset` are their own (V, D) float32
arrays, `dino_scale` and `dino_offset`. The training device dequantises (`features_on_device`).

float8 (e4m3) is not offered: numpy has no float8 dtype without the extra `ml_dtypes` package, and with 3
mantissa bits its error per value (~3 %) is far above int8's on the same range.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Literal, Mapping

import numpy as np

if TYPE_CHECKING:  # torch is imported by the caller; this module stays light for the command line's help
    import torch

FeatureCodec = Literal["float16", "int8"]
FEATURE_CODECS: tuple[str, ...] = ("float16", "int8")
STORED_DTYPE = {"float16": "float16", "int8": "int8"}
INT8_STEPS = 254  # codes -127..127: symmetric around the offset, -128 unused


def quantise_int8(features: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(n, F, N, D) features -> codes (n, F, N, D) int8, scale (n, D) float32, offset (n, D) float32."""
    x = np.asarray(features, dtype=np.float32)
    low, high = x.min(axis=(1, 2)), x.max(axis=(1, 2))  # (n, D)
    offset = (high + low) / 2
    scale = (high - low) / INT8_STEPS
    scale[scale == 0] = 1.0  # a constant channel: every code is 0, the value is the offset
    codes = np.rint((x - offset[:, None, None, :]) / scale[:, None, None, :])
    return np.clip(codes, -127, 127).astype(np.int8), scale.astype(np.float32), offset.astype(np.float32)


def dequantise_int8(codes: np.ndarray, scale: np.ndarray, offset: np.ndarray) -> np.ndarray:
    """codes (n, ..., D) int8 with scale and offset (n, D) -> float32 values of the same shape."""
    middle = (1,) * (codes.ndim - 2)
    n, d = scale.shape
    return codes.astype(np.float32) * scale.reshape(n, *middle, d) + offset.reshape(n, *middle, d)


def features_on_device(batch: Mapping[str, Any], device: "torch.device | str") -> "torch.Tensor":
    """A batch's features on `device` as float16, (B, T, N, D): moved as stored, dequantised there when int8."""
    features = batch["features"].to(device, non_blocking=True)
    if "feature_scale" not in batch:
        return features
    scale = batch["feature_scale"].to(device, non_blocking=True)[:, None, None, :]
    offset = batch["feature_offset"].to(device, non_blocking=True)[:, None, None, :]
    return (features.float() * scale + offset).half()


def codec_error(original: np.ndarray, restored: np.ndarray) -> dict[str, float]:
    """How far `restored` is from `original` (n, F, N, D): relative L2 per video (max and mean) and the cosine
    similarity of every token's feature vector (min and 0.1 % quantile)."""
    x = np.asarray(original, dtype=np.float64)
    y = np.asarray(restored, dtype=np.float64)
    diff = (x - y).reshape(len(x), -1)
    relative = np.linalg.norm(diff, axis=1) / np.maximum(np.linalg.norm(x.reshape(len(x), -1), axis=1), 1e-12)
    dots = (x * y).sum(axis=-1)
    norms = np.linalg.norm(x, axis=-1) * np.linalg.norm(y, axis=-1)
    cosine = (dots / np.maximum(norms, 1e-12)).ravel()
    return {"relative_l2_max": float(relative.max()), "relative_l2_mean": float(relative.mean()),
            "cosine_min": float(cosine.min()), "cosine_q001": float(np.quantile(cosine, 0.001))}
