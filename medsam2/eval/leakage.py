"""Train/test leakage check: exact duplicates (sha256) and near-duplicates (64-bit perceptual hash).

A *leak* is a pair (reference row, test row) showing the same image, where reference rows are every manifest
row whose split is not the test split (train, val, unlabelled pools used by self-training, ...) of *any*
dataset — a Kvasir training image that reappears in a CVC test set leaks too.

- exact: equal, non-empty ``sha256`` (the manifest's hash of the stored file).
- near: Hamming distance of the images' 64-bit perceptual hashes ≤ ``max_hamming`` (and not already exact).
  The default hash is dHash (Krawetz): the grey image is area-averaged to 8 × 9 cells and each bit says
  whether a cell is brighter than its right neighbour, so it survives re-encoding, resizing and global
  brightness/contrast changes. ``hash_kind="phash"`` uses the DCT hash instead (low 8 × 8 DCT frequencies of a
  32 × 32 thumbnail against their median). Two unrelated images differ in about 32 of 64 bits.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pandas as pd

LEAK_COLUMNS = ["train_image_id", "test_image_id", "kind", "distance"]


def _to_gray(image: np.ndarray) -> np.ndarray:
    img = np.asarray(image)
    if img.ndim == 3:
        img = img[..., :3].mean(axis=2) if img.shape[2] >= 3 else img[..., 0]
    if img.ndim != 2 or img.size == 0:
        raise ValueError(f"expected a (H, W) or (H, W, C) image, got shape {np.asarray(image).shape}")
    return img.astype(np.float64)


def _area_resize(gray: np.ndarray, rows: int, cols: int) -> np.ndarray:
    """Mean of each cell of a ``rows`` × ``cols`` grid laid over ``gray`` (upsampled first if too small)."""
    h, w = gray.shape
    if h < rows or w < cols:
        gray = np.repeat(np.repeat(gray, -(-rows // h), axis=0), -(-cols // w), axis=1)
        h, w = gray.shape
    r_edges = np.linspace(0, h, rows + 1).astype(int)
    c_edges = np.linspace(0, w, cols + 1).astype(int)
    sums = np.add.reduceat(np.add.reduceat(gray, r_edges[:-1], axis=0), c_edges[:-1], axis=1)
    return sums / np.outer(np.diff(r_edges), np.diff(c_edges))


def _bits_to_int(bits: np.ndarray) -> int:
    return int(np.packbits(bits.reshape(-1).astype(np.uint8)).view(">u8")[0])


def dhash(image: np.ndarray) -> int:
    """64-bit difference hash of a uint8 (H, W) or (H, W, C) image, as a Python int in [0, 2**64)."""
    cells = _area_resize(_to_gray(image), 8, 9)
    return _bits_to_int(cells[:, 1:] > cells[:, :-1])


def phash(image: np.ndarray) -> int:
    """64-bit DCT perceptual hash of a uint8 (H, W) or (H, W, C) image, as a Python int in [0, 2**64)."""
    from scipy.fft import dctn

    low = dctn(_area_resize(_to_gray(image), 32, 32), norm="ortho")[:8, :8].reshape(-1)
    return _bits_to_int(low > np.median(low[1:]))


_HASHES: dict[str, Callable[[np.ndarray], int]] = {"dhash": dhash, "phash": phash}


def hamming(a: int, b: int) -> int:
    """Number of differing bits between two 64-bit hashes."""
    return int(a ^ b).bit_count()


def _popcount64(x: np.ndarray) -> np.ndarray:
    if hasattr(np, "bitwise_count"):
        return np.bitwise_count(x)
    return np.unpackbits(x.view(np.uint8).reshape(*x.shape, 8), axis=-1).sum(-1)  # numpy < 2


def _default_loader(uri: str) -> np.ndarray:
    from PIL import Image

    with Image.open(uri) as im:
        return np.asarray(im.convert("RGB"))


def find_leaks(
    manifest: pd.DataFrame,
    *,
    near_duplicates: bool = True,
    max_hamming: int = 4,
    image_loader: Callable[[str], np.ndarray] | None = None,
    test_split: str = "test",
    hash_kind: str = "dhash",
) -> pd.DataFrame:
    """Pairs of (non-test row, test row) that show the same image, across all datasets.

    Args:
        manifest: one row per image with columns ``image_id``, ``split``, ``sha256``, and ``image_uri`` when
            ``near_duplicates``; ``dataset`` is copied to the output when present.
        near_duplicates: also compare perceptual hashes (loads every image once).
        max_hamming: largest Hamming distance (of 64 bits) that counts as a near-duplicate.
        image_loader: ``image_uri -> uint8 (H, W[, C]) array``; default opens local files with Pillow (pass
            the project's reader for DICOM / NIfTI / s3 URIs).
        test_split: the split value of held-out rows.
        hash_kind: ``"dhash"`` (default) or ``"phash"``.

    Returns:
        DataFrame with columns ``train_image_id, test_image_id, kind ("exact" | "near"), distance`` (0 for
        exact; Hamming bits for near), plus ``train_dataset, test_dataset, train_split`` when available,
        sorted by kind, distance, ids. Empty (with these columns) when nothing leaks.

    Raises:
        KeyError: a needed column is missing. Loader errors propagate with the URI named.
    """
    need = ["image_id", "split", "sha256"] + (["image_uri"] if near_duplicates else [])
    missing = [c for c in need if c not in manifest.columns]
    if missing:
        raise KeyError(f"find_leaks needs manifest columns {missing}")
    if hash_kind not in _HASHES:
        raise ValueError(f"hash_kind must be one of {sorted(_HASHES)}, got {hash_kind!r}")
    is_test = manifest["split"].astype(str) == test_split
    ref, test = manifest[~is_test].reset_index(drop=True), manifest[is_test].reset_index(drop=True)
    extra_cols = [c for c in ("dataset", "split") if c in manifest.columns]
    out_columns = (
        LEAK_COLUMNS + [f"train_{c}" for c in extra_cols] + [f"test_{c}" for c in extra_cols if c != "split"]
    )
    pairs: list[tuple[int, int, str, int]] = []  # (ref index, test index, kind, distance)

    # Exact: equal non-empty sha256.
    def _sha(df: pd.DataFrame) -> pd.DataFrame:
        s = df["sha256"]
        ok = s.notna() & (s.astype(str).str.len() > 0)
        return pd.DataFrame({"sha": s[ok].astype(str).str.lower(), "idx": df.index[ok]})

    exact = _sha(ref).merge(_sha(test), on="sha", suffixes=("_ref", "_test"))
    pairs += [(int(r), int(t), "exact", 0) for r, t in zip(exact["idx_ref"], exact["idx_test"], strict=True)]
    exact_set = {(r, t) for r, t, _, _ in pairs}

    if near_duplicates and len(ref) and len(test):
        loader = image_loader or _default_loader
        hash_fn = _HASHES[hash_kind]

        def _hashes(df: pd.DataFrame) -> np.ndarray:
            values = []
            for uri in df["image_uri"]:
                try:
                    values.append(hash_fn(loader(uri)))
                except Exception as e:  # name the file, keep the cause
                    raise RuntimeError(f"find_leaks could not load/hash image {uri!r}: {e}") from e
            return np.array(values, dtype=np.uint64)

        h_ref, h_test = _hashes(ref), _hashes(test)
        chunk = max(1, 2_000_000 // len(h_ref))
        for start in range(0, len(h_test), chunk):
            dist = _popcount64(h_test[start : start + chunk, None] ^ h_ref[None, :])  # (chunk, n_ref)
            t_idx, r_idx = np.nonzero(dist <= max_hamming)
            for t, r in zip(t_idx + start, r_idx, strict=True):
                if (int(r), int(t)) not in exact_set:
                    pairs.append((int(r), int(t), "near", int(dist[t - start, r])))

    rows = []
    for r, t, kind, d in pairs:
        row = {
            "train_image_id": ref.at[r, "image_id"],
            "test_image_id": test.at[t, "image_id"],
            "kind": kind,
            "distance": d,
        }
        for c in extra_cols:
            row[f"train_{c}"] = ref.at[r, c]
            if c != "split":
                row[f"test_{c}"] = test.at[t, c]
        rows.append(row)
    result = pd.DataFrame(rows, columns=out_columns)
    if len(result):
        result = result.sort_values(["kind", "distance", "train_image_id", "test_image_id"], kind="stable")
    return result.reset_index(drop=True).astype({"distance": int})
