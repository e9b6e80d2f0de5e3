"""Label Studio's brush masks: the RLE it stores, and the import tasks that carry a model's masks as
pre-annotations (``predictions``).

A ``brushlabels`` result holds ``value.rle``: a list of bytes in the rle-pack format of thi.ng/umbrella that
Label Studio's front end decodes (and ``label_studio_converter.brush.decode_rle`` in Python) over the mask's
RGBA pixels, row-major, 4 values per pixel, the mask in the alpha channel (0 or 255)::

    32 bits   number of values N (= H·W·4)
    5 bits    word size − 1 (8-bit words: 7)
    4×4 bits  the four run-length field widths − 1 (3, 4, 8, 16 bits)
    per run   1 bit: 1 = a repeated word, 0 = literal words
              2 bits: which width the length field has; that many bits: run length − 1
              then one word (repeat) or run-length words (literal)

and then zero bits up to a whole byte. The encoder here writes repeat runs only (a mask is long runs); the
decoder reads both kinds, as Label Studio's own exports may hold literal runs.
"""

from __future__ import annotations

from typing import Any

import numpy as np

_WIDTHS = (3, 4, 8, 16)
_WORD = 8


class _Bits:
    """Reads big-endian bit fields from bytes."""

    def __init__(self, data: bytes) -> None:
        self.bits = np.unpackbits(np.frombuffer(bytes(data), np.uint8))
        self.i = 0

    def read(self, n: int) -> int:
        if self.i + n > self.bits.size:
            raise ValueError("brush RLE ends in the middle of a field")
        out = 0
        for b in self.bits[self.i:self.i + n]:
            out = (out << 1) | int(b)
        self.i += n
        return out


def encode_rle(values: np.ndarray) -> list[int]:
    """rle-pack encoding of a 1-D uint8 array (``values``: (N,) uint8, any values 0-255) → list of bytes."""
    arr = np.asarray(values, np.uint8).reshape(-1)
    parts = [f"{arr.size:032b}", f"{_WORD - 1:05b}", "".join(f"{w - 1:04b}" for w in _WIDTHS)]
    if arr.size:
        change = np.flatnonzero(arr[1:] != arr[:-1]) + 1
        starts = np.concatenate([[0], change])
        lengths = np.diff(np.concatenate([starts, [arr.size]]))
        for start, length in zip(starts.tolist(), lengths.tolist(), strict=True):
            word = f"{int(arr[start]):08b}"
            while length > 0:
                n = min(length, 1 << _WIDTHS[-1])
                idx = next(k for k, w in enumerate(_WIDTHS) if n <= 1 << w)
                parts.append(f"1{idx:02b}{n - 1:0{_WIDTHS[idx]}b}{word}")
                length -= n
    bits = "".join(parts)
    bits += "0" * (-len(bits) % 8)
    return [int(bits[i:i + 8], 2) for i in range(0, len(bits), 8)]


def decode_rle(rle: list[int] | bytes) -> np.ndarray:
    """Inverse of :func:`encode_rle` (and of Label Studio's encoder): bytes → (N,) uint8."""
    bits = _Bits(bytes(rle))
    num = bits.read(32)
    word = bits.read(5) + 1
    widths = [bits.read(4) + 1 for _ in range(4)]
    out = np.zeros(num, np.uint8)
    i = 0
    while i < num:
        repeat = bits.read(1)
        j = i + 1 + bits.read(widths[bits.read(2)])
        if j > num:
            raise ValueError(f"brush RLE run ends at {j}, past its {num} values")
        if repeat:
            out[i:j] = bits.read(word)
        else:
            for k in range(i, j):
                out[k] = bits.read(word)
        i = j
    return out


def mask_to_rle(mask: np.ndarray) -> list[int]:
    """(H,W) bool mask → Label Studio brush RLE (RGBA, 255 where the mask is set)."""
    m = np.asarray(mask, bool).astype(np.uint8) * 255
    return encode_rle(np.repeat(m.reshape(-1), 4))


def rle_to_mask(rle: list[int] | bytes, height: int, width: int) -> np.ndarray:
    """Label Studio brush RLE of an (H,W) image → (H,W) bool mask (alpha > 0)."""
    flat = decode_rle(rle)
    if flat.size != height * width * 4:
        raise ValueError(f"brush RLE holds {flat.size} values, not {height}x{width}x4 = {height * width * 4}")
    return flat.reshape(height, width, 4)[:, :, 3] > 0


#: The labelling config that the tasks of :func:`task` fit (names of the tags their results refer to).
LABEL_CONFIG = """<View>
  <Image name="image" value="$image" zoom="true"/>
  <BrushLabels name="tag" toName="image">
    <Label value="{label}" background="#ff0000"/>
  </BrushLabels>
</View>
"""


def task(image_url: str, mask: np.ndarray, *, image_id: str, label: str, model_version: str, score: float,
         extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """One Label Studio import task: ``data`` (the image URL, ``medsam2_id`` to map an export back to its
    manifest row, ``extra``) and one prediction: the (H,W) bool ``mask`` as a ``brushlabels`` result of the
    :data:`LABEL_CONFIG` tags, with ``score`` (the acquisition score) and ``model_version``."""
    h, w = mask.shape
    result = {"id": f"{image_id[:40]}-mask", "type": "brushlabels", "from_name": "tag", "to_name": "image",
              "original_width": int(w), "original_height": int(h), "image_rotation": 0,
              "value": {"format": "rle", "rle": mask_to_rle(mask), "brushlabels": [label]}}
    return {"data": {"image": image_url, "medsam2_id": image_id, **(extra or {})},
            "predictions": [{"model_version": model_version, "score": float(score), "result": [result]}]}
