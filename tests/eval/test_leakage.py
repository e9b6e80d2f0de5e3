"""Leakage check: planted exact and near duplicates are caught, distinct images are not."""

import hashlib
import io

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from scipy import ndimage

from medsam2.eval.leakage import LEAK_COLUMNS, dhash, find_leaks, hamming, phash


def photo(seed, h=96, w=128):
    """A smooth random RGB 'photo' (blurred blobs), like an endoscopy frame at low resolution."""
    rng = np.random.default_rng(seed)
    img = ndimage.zoom(rng.uniform(0, 255, size=(6, 8, 3)), (h / 6, w / 8, 1), order=3)
    return np.clip(img, 0, 255).astype(np.uint8)


def jpeg(img, quality=70):
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="JPEG", quality=quality)
    return np.asarray(Image.open(io.BytesIO(buf.getvalue())).convert("RGB"))


def sha(img):
    return hashlib.sha256(img.tobytes()).hexdigest()


def test_dhash_by_hand():
    ramp = np.tile(np.arange(90, dtype=np.uint8), (40, 1))  # brighter to the right everywhere
    assert dhash(ramp) == 2**64 - 1
    assert dhash(ramp[:, ::-1]) == 0
    assert hamming(0b1011, 0b0001) == 2


@pytest.mark.parametrize("hash_fn", [dhash, phash])
def test_hash_is_robust_to_reencoding_and_separates_distinct_images(hash_fn):
    a = photo(1)
    brighter = np.clip(a.astype(int) + 12, 0, 255).astype(np.uint8)
    assert hamming(hash_fn(a), hash_fn(jpeg(brighter))) <= 4
    assert hamming(hash_fn(a), hash_fn(np.asarray(Image.fromarray(a).resize((100, 75))))) <= 4
    distances = [hamming(hash_fn(photo(i)), hash_fn(photo(j))) for i in range(6) for j in range(i + 1, 6)]
    assert min(distances) > 12


def make_manifest():
    images = {f"mem://{i}": photo(i) for i in range(5)}
    images["mem://copy"] = images["mem://0"].copy()  # exact copy of train image 0
    images["mem://near"] = jpeg(np.clip(images["mem://1"].astype(int) + 10, 0, 255).astype(np.uint8))
    rows = [
        ("t0", "kvasir", "train", "mem://0"),
        ("t1", "kvasir", "train", "mem://1"),
        ("v2", "kvasir", "val", "mem://2"),
        ("x3", "kvasir", "test", "mem://3"),  # distinct
        ("x4", "cvc", "test", "mem://4"),  # distinct
        ("xc", "kvasir", "test", "mem://copy"),
        ("xn", "cvc", "test", "mem://near"),  # other dataset: leaks across datasets count
    ]
    df = pd.DataFrame(rows, columns=["image_id", "dataset", "split", "image_uri"])
    df["sha256"] = [sha(images[u]) for u in df["image_uri"]]
    return df, images


def test_find_leaks_catches_planted_duplicates_only():
    manifest, images = make_manifest()
    calls = []

    def loader(uri):
        calls.append(uri)
        return images[uri]

    leaks = find_leaks(manifest, image_loader=loader)
    assert list(leaks.columns[:4]) == LEAK_COLUMNS
    got = {(r.train_image_id, r.test_image_id, r.kind) for r in leaks.itertuples()}
    assert got == {("t0", "xc", "exact"), ("t1", "xn", "near")}
    near = leaks[leaks["kind"] == "near"].iloc[0]
    assert 0 <= near["distance"] <= 4
    assert near["train_dataset"] == "kvasir" and near["test_dataset"] == "cvc"
    assert leaks[leaks["kind"] == "exact"].iloc[0]["distance"] == 0
    assert sorted(calls) == sorted(manifest["image_uri"])  # each image loaded once


def test_exact_only_needs_no_images():
    manifest, _ = make_manifest()
    leaks = find_leaks(manifest.drop(columns="image_uri"), near_duplicates=False)
    assert leaks[["train_image_id", "test_image_id", "kind"]].values.tolist() == [["t0", "xc", "exact"]]


def test_no_leaks_gives_empty_frame_with_columns():
    manifest, images = make_manifest()
    clean = manifest[~manifest["image_id"].isin(["xc", "xn"])]
    leaks = find_leaks(clean, image_loader=images.__getitem__)
    assert leaks.empty and list(leaks.columns[:4]) == LEAK_COLUMNS


def test_missing_sha_is_not_a_match_and_errors_are_clear():
    manifest, images = make_manifest()
    manifest.loc[:, "sha256"] = None
    leaks = find_leaks(manifest, image_loader=images.__getitem__)
    assert set(leaks["kind"]) == {"near"} and len(leaks) == 2  # the exact copy now shows as near, distance 0
    with pytest.raises(KeyError, match="sha256"):
        find_leaks(manifest.drop(columns="sha256"))
    with pytest.raises(RuntimeError, match="mem://0"):
        find_leaks(manifest, image_loader=lambda uri: (_ for _ in ()).throw(OSError("gone")))
