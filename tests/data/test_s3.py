"""Ingest from s3:// (moto's standalone server over HTTP) gives the same manifest as from a local folder."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
from data_helpers import SALT, copy_kvasir

from medsam2.data.ingest import ingest
from medsam2.data.manifest import read_manifest


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def s3_endpoint(monkeypatch: pytest.MonkeyPatch):
    from moto.server import ThreadedMotoServer

    port = _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    for k, v in {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_SESSION_TOKEN": "testing",
    }.items():
        monkeypatch.setenv(k, v)
    yield f"http://127.0.0.1:{port}"
    server.stop()


def test_s3_ingest_matches_local(sample_data: Path, tmp_path: Path, s3_endpoint: str) -> None:
    import boto3

    src = copy_kvasir(sample_data, tmp_path / "kvasir-seg", n_test=2, n_other=4)
    s3 = boto3.client("s3", endpoint_url=s3_endpoint)
    s3.create_bucket(Bucket="lab")
    for p in sorted(src.rglob("*")):
        if p.is_file():
            s3.upload_file(str(p), "lab", f"raw/kvasir-seg/{p.relative_to(src).as_posix()}")
    s3.put_object(Bucket="lab", Key="raw/kvasir-seg/../escape.png", Body=b"x")  # key escaping the prefix

    remote = ingest("s3://lab/raw/kvasir-seg", tmp_path / "ws3", s3_endpoint_url=s3_endpoint, salt=SALT)
    local = ingest(str(src), tmp_path / "wlocal", salt=SALT)
    assert remote.dataset == "kvasir-seg" and remote.dataset_rows == local.dataset_rows == 6
    assert remote.quarantined == {"path_traversal": 1} and remote.splits == local.splits
    assert remote.dataset_version == local.dataset_version
    cols = [
        "image_id",
        "sha256",
        "mask_sha256",
        "box",
        "split",
        "patient_id",
        "pixel_sha256",
        "width",
        "height",
    ]
    a = read_manifest(tmp_path / "ws3")[cols].sort_values("image_id").reset_index(drop=True)
    b = read_manifest(tmp_path / "wlocal")[cols].sort_values("image_id").reset_index(drop=True)
    assert a.equals(b)
    assert read_manifest(tmp_path / "ws3")["source_uri"].str.startswith("s3://lab/raw/kvasir-seg/").all()
    # re-ingest from S3: unchanged objects are neither downloaded nor decoded (ETag + size in the stat cache)
    again = ingest("s3://lab/raw/kvasir-seg", tmp_path / "ws3", s3_endpoint_url=s3_endpoint, salt=SALT)
    assert (again.added, again.unchanged, again.decoded_units) == (0, 6, 0)
