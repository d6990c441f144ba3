"""The 8-bit storage encodings: what a stored code means, how a slot row carries it, how a reader decodes it.

An 8-bit encoded point is stored as two arrays, both chunked like every other array and both covered by the
commit records' checksums:

  layer_{i}/{point}            (n_tokens, dim) codes: ``int8`` (int8) or ``float8_e4m3`` (uint8: the bits of a
                               float8 e4m3fn value, as in torch.float8_e4m3fn and ml_dtypes.float8_e4m3fn)
  scales/layer_{i}/{point}     (n_tokens, 1) float32: the row's scale

  decoded value = float32(code) * scale   (row by row; for float8_e4m3 float32(code) decodes its bits)

The scale is the row's largest absolute value over the largest code (127 for int8, 448 for float8 e4m3), so
every row uses the whole code range; a row of zeros has scale 0. A row holding a non-finite value has scale
NaN (it decodes as NaN; the commit record counts its values non-finite): an 8-bit code has no inf.

A row in a staging slot (the capturing process encodes on the model's device, before the copy to the host,
so the copy and the host carry a quarter of float32's bytes): three float32 (the scale, then the L2 norms of
the row's error, decoded against captured, and of the captured row, both in units of the scale: at most
``max_code * sqrt(dim)``, so no row overflows them; the writer squares them times the scale in float64 and
keeps each chunk's sums), then the ``dim`` codes, padded to a multiple of 4 bytes.

Torch-free (numpy): the writer process and the readers decode with it.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

SCALES_GROUP = "scales"
SLOT_HEADER = 3  # float32 per slot row before the codes: the scale, error and row norms in units of it


def _float8_e4m3fn_values() -> np.ndarray:
    """float32 value of each of the 256 float8 e4m3fn bit patterns (1 sign, 4 exponent bits with bias 7, 3
    mantissa bits; no inf; S.1111.111 is NaN)."""
    bits = np.arange(256, dtype=np.uint16)
    sign = np.where(bits & 0x80, -1.0, 1.0)
    exponent = (bits >> 3) & 0xF
    mantissa = (bits & 0x7).astype(np.float64)
    normal = (1.0 + mantissa / 8.0) * np.exp2(exponent.astype(np.float64) - 7.0)
    subnormal = (mantissa / 8.0) * 2.0 ** -6
    values = sign * np.where(exponent == 0, subnormal, normal)
    values[(bits & 0x7F) == 0x7F] = np.nan
    return values.astype(np.float32)


@dataclasses.dataclass(frozen=True)
class Encoding:
    """One 8-bit encoding with a per-row scale.

    Attributes:
        name: the storage dtype name (``CaptureConfig.dtype``, ``manifest.dtype``).
        code_dtype: numpy dtype of the stored codes.
        max_code: the largest code magnitude (the scale maps the row's absmax onto it).
        description: the manifest's and the array attributes' words for it.

    Thread safety: immutable.
    """

    name: str
    code_dtype: np.dtype
    max_code: float
    description: str

    def slot_row_bytes(self, dim: int) -> int:
        """Bytes of one row in a staging slot: header floats, codes, padding to 4 bytes."""
        return 4 * SLOT_HEADER + -(-dim // 4) * 4

    def split_slot_rows(self, rows: np.ndarray, dim: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(codes (n, dim), scales (n, 1) float32, norms (n, 2) float32: the error's and the row's, in units
        of the scale) as views of slot rows (n, slot_row_bytes) uint8."""
        header = rows[:, :4 * SLOT_HEADER].view(np.float32)
        codes = rows[:, 4 * SLOT_HEADER:4 * SLOT_HEADER + dim].view(self.code_dtype)
        return codes, header[:, :1], header[:, 1:]

    def decode(self, codes: np.ndarray, scales: np.ndarray, out: np.ndarray) -> np.ndarray:
        """Decoded float32 values of ``codes`` (n, dim) with ``scales`` (n, 1), into ``out`` (n, dim)."""
        if self.code_dtype == np.uint8:
            np.take(_FLOAT8_E4M3FN, codes, out=out)
            np.multiply(out, scales, out=out)
        else:
            np.multiply(codes, scales, out=out)
        return out

    def attributes(self, key: str) -> dict:
        """The codes array's zarr attributes: how to decode it without this package."""
        return {"encoding": self.description, "scale_array": scale_key(key),
                "decode": "float32(code) * scale, row by row"
                          + (" (code: float8 e4m3fn bits)" if self.code_dtype == np.uint8 else "")}

    def scale_attributes(self, key: str) -> dict:
        """The scale array's zarr attributes."""
        return {"scales_of": key, "encoding": self.description}


_FLOAT8_E4M3FN = _float8_e4m3fn_values()

ENCODINGS: dict[str, Encoding] = {
    "int8": Encoding("int8", np.dtype(np.int8), 127.0, "int8 codes, float32 per-row absmax scale"),
    "float8_e4m3": Encoding("float8_e4m3", np.dtype(np.uint8), 448.0,
                            "float8 e4m3fn codes (uint8 bits), float32 per-row absmax scale"),
}


def encoding_of(dtype: str) -> Encoding | None:
    """The 8-bit encoding a storage dtype names; None for float16, bfloat16 and float32 (stored as is)."""
    return ENCODINGS.get(dtype)


def scale_key(key: str) -> str:
    """Array path of the scales of an encoded activation array."""
    return f"{SCALES_GROUP}/{key}"


def squared_error_and_norm(norms: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """Per row (n, 2) float64: the squared error of the decoded values against the captured ones and the
    captured row's squared norm, from a slot header's ``norms`` (n, 2) and ``scales`` (n, 1); 0 for a row with
    a non-finite value (its scale is NaN)."""
    squared = np.square(norms.astype(np.float64) * scales.astype(np.float64))
    squared[~np.isfinite(scales[:, 0])] = 0.0
    return squared


def relative_rms_error(squared_error: float, squared_norm: float) -> float | None:
    """sqrt(sum of squared errors / sum of squared norms) of decoded against captured rows (None: no norm)."""
    return math.sqrt(squared_error / squared_norm) if squared_norm > 0 else None


class EncodedRows:
    """Rows of an encoded array as codes and scales, sliced by rows together (what the statistics read).

    Thread safety: a view; as safe as the arrays it holds.
    """

    def __init__(self, encoding: Encoding, codes: np.ndarray, scales: np.ndarray):
        self.encoding, self.codes, self.scales = encoding, codes, scales

    @property
    def shape(self) -> tuple[int, ...]:
        return self.codes.shape

    def __getitem__(self, rows: slice) -> EncodedRows:
        return EncodedRows(self.encoding, self.codes[rows], self.scales[rows])

    def __len__(self) -> int:
        return len(self.codes)

    def decode(self, out: np.ndarray) -> np.ndarray:
        return self.encoding.decode(self.codes, self.scales, out)
