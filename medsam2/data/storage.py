"""Where source files come from: a local folder or ``s3://bucket/prefix``, behind one small interface.

Ingest code sees only :class:`SourceFile` entries (a POSIX path relative to the source root, a size, a version
token) and calls :meth:`Storage.local_path` to get a readable local file. For S3 the object is downloaded on
demand into a private staging folder (deleted by :meth:`Storage.close`); objects whose ``(key, size, ETag)``
match the stat cache are never downloaded again. Credentials come from boto3's standard chain and are never
logged.

Safety: local listing does not follow symlinked directories; a symlinked file is reported with ``link_target``
so the caller can reject links that leave the source root (``outside_root``). S3 keys containing ``..`` or
absolute components are reported as ``path_traversal``.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SourceFile:
    """One file under the source root.

    rel: POSIX path relative to the root (``images/a.png``); version: ``"<size>:<mtime_ns>"`` locally,
    ``"<size>:<etag>"`` on S3 — equal versions mean unchanged content. problem: a reason code
    (``outside_root``, ``broken_link``, ``path_traversal``, ``symlink_dir``) when the entry must be
    quarantined.
    """

    rel: str
    size: int
    version: str
    problem: str | None = None
    detail: str = ""


class Storage(ABC):
    """Abstract source: ``list()`` once, then ``local_path(rel)`` for files the ingest needs to read."""

    uri: str
    name: str

    @abstractmethod
    def list(self) -> list[SourceFile]:
        """Every file under the source root (relative paths), with size and mtime."""

    @abstractmethod
    def local_path(self, rel: str) -> Path:
        """A local file holding ``rel``'s bytes (the file itself, or a downloaded copy)."""

    def uri_of(self, rel: str) -> str:
        return f"{self.uri.rstrip('/')}/{rel}"

    def close(self) -> None:  # noqa: B027 - optional hook: only remote storages hold resources
        """Release temporary downloads (remote storages); nothing to do for local folders."""

    def __enter__(self) -> Storage:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class LocalStorage(Storage):
    def __init__(self, root: str | Path) -> None:
        self.root = Path(root).absolute()
        if not self.root.is_dir():
            raise FileNotFoundError(f"source folder {root} does not exist")
        self.uri = str(self.root)
        self.name = self.root.name
        self._real_root = self.root.resolve()

    def list(self) -> list[SourceFile]:
        out: list[SourceFile] = []
        for dirpath, dirnames, filenames in os.walk(self.root, followlinks=False):
            d = Path(dirpath)
            keep = []
            for name in sorted(dirnames):
                p = d / name
                if p.is_symlink():
                    rel = p.relative_to(self.root).as_posix()
                    inside = self._inside(p)
                    out.append(
                        SourceFile(
                            rel,
                            0,
                            "link",
                            "outside_root" if not inside else "symlink_dir",
                            "symlinked folder is not followed",
                        )
                    )
                else:
                    keep.append(name)
            dirnames[:] = keep
            for name in sorted(filenames):
                p = d / name
                rel = p.relative_to(self.root).as_posix()
                if p.is_symlink():
                    if not p.exists():
                        out.append(SourceFile(rel, 0, "link", "broken_link", "symlink target does not exist"))
                        continue
                    if not self._inside(p):
                        out.append(
                            SourceFile(rel, 0, "link", "outside_root", "symlink points outside the source")
                        )
                        continue
                try:
                    st = p.stat()
                except OSError as e:
                    out.append(SourceFile(rel, 0, "err", "unreadable", type(e).__name__))
                    continue
                out.append(SourceFile(rel, st.st_size, f"{st.st_size}:{st.st_mtime_ns}"))
        return sorted(out, key=lambda f: f.rel)

    def _inside(self, p: Path) -> bool:
        try:
            p.resolve().relative_to(self._real_root)
            return True
        except ValueError:
            return False

    def local_path(self, rel: str) -> Path:
        p = self.root / rel
        if not self._inside(p):
            raise PermissionError(f"{rel} resolves outside the source root")
        return p


class S3Storage(Storage):
    """``s3://bucket/prefix`` via boto3 (paginated ``list_objects_v2``, ``get_object``).

    endpoint_url: from the argument, else ``MEDSAM2_S3_ENDPOINT_URL``, else ``AWS_ENDPOINT_URL`` (MinIO,
    moto), else AWS. The client is created lazily so listing credentials errors surface as one clear
    exception.
    """

    def __init__(self, uri: str, endpoint_url: str | None = None) -> None:
        import boto3  # local import: only S3 users pay for it

        assert uri.startswith("s3://"), uri
        bucket, _, prefix = uri[5:].partition("/")
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self.uri = f"s3://{bucket}/{self.prefix}" if self.prefix else f"s3://{bucket}"
        self.name = PurePosixPath(self.prefix).name if self.prefix else bucket
        endpoint = (
            endpoint_url or os.environ.get("MEDSAM2_S3_ENDPOINT_URL") or os.environ.get("AWS_ENDPOINT_URL")
        )
        self.client = boto3.client("s3", endpoint_url=endpoint)
        self._staging = Path(tempfile.mkdtemp(prefix="medsam2-s3-"))
        log.info("S3 source %s (endpoint %s)", self.uri, endpoint or "default")

    def list(self) -> list[SourceFile]:
        out: list[SourceFile] = []
        base = f"{self.prefix}/" if self.prefix else ""
        pages = self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=base)
        for page in pages:
            for obj in page.get("Contents", []):
                key = obj["Key"]
                if key.endswith("/"):
                    continue
                rel = key[len(base) :]
                parts = PurePosixPath(rel).parts
                if not rel or rel.startswith("/") or ".." in parts:
                    out.append(
                        SourceFile(
                            rel or key,
                            int(obj["Size"]),
                            "bad",
                            "path_traversal",
                            "object key escapes the prefix",
                        )
                    )
                    continue
                out.append(
                    SourceFile(rel, int(obj["Size"]), f"{obj['Size']}:{obj.get('ETag', '').strip(chr(34))}")
                )
        return sorted(out, key=lambda f: f.rel)

    def local_path(self, rel: str) -> Path:
        dest = self._staging / rel
        if dest.exists():
            return dest
        dest.parent.mkdir(parents=True, exist_ok=True)
        key = f"{self.prefix}/{rel}" if self.prefix else rel
        resp = self.client.get_object(Bucket=self.bucket, Key=key)
        tmp = dest.with_name(dest.name + ".part")
        with open(tmp, "wb") as f:
            for chunk in resp["Body"].iter_chunks(1 << 20):
                f.write(chunk)
        os.replace(tmp, dest)
        return dest

    def close(self) -> None:
        shutil.rmtree(self._staging, ignore_errors=True)


def open_storage(source: str | Path, *, s3_endpoint_url: str | None = None) -> Storage:
    """A :class:`Storage` for a local folder or an ``s3://bucket/prefix`` URI."""
    s = str(source)
    if s.startswith("s3://"):
        return S3Storage(s, endpoint_url=s3_endpoint_url)
    return LocalStorage(s)
