"""What ingest knows of one source's files: the stat cache kept in the work dir, and the listing it reads through.

:class:`StatCache` remembers, per file version (``(size, mtime)`` or an S3 ETag), its sha256 and DICOM header
facts, so that an unchanged file costs one ``stat``; :class:`Source` is the listing of one storage with those
cached facts, lazy local paths, and the de-identified URI (:meth:`Source.ref`) that the manifest records.
"""

from __future__ import annotations

import hashlib
import hmac
import json
from pathlib import Path
from typing import Any

from medsam2.data.manifest import atomic_write_bytes
from medsam2.data.process import INGEST_VERSION
from medsam2.data.storage import SourceFile, Storage
from medsam2.hashing import file_sha256


class StatCache:
    """``key(uri) -> {"v": version, "sha": sha256, "dcm": {...}}``; reset when the de-identification salt
    changes. Keys are salted hashes of the source URIs: DICOM exports name files after their SOPInstanceUID and
    folders after patients, so no source path is written to the work dir."""

    def __init__(self, path: Path, salt: str) -> None:
        self.path = path
        self.salt_fp = hashlib.sha256(b"salt\0" + salt.encode()).hexdigest()[:16]
        self._salt = salt
        self.files: dict[str, dict[str, Any]] = {}
        if path.exists():
            try:
                data = json.loads(path.read_text())
                if data.get("salt_fp") == self.salt_fp and data.get("version") == INGEST_VERSION:
                    self.files = data.get("files", {})
            except (OSError, ValueError):
                pass

    def key(self, uri: str) -> str:
        return hmac.new(self._salt.encode(), b"statcache\0" + uri.encode(), hashlib.sha256).hexdigest()[:32]

    def get(self, uri: str, version: str) -> dict[str, Any] | None:
        e = self.files.get(self.key(uri))
        return e if e and e.get("v") == version else None

    def put(self, uri: str, version: str, **kv: Any) -> dict[str, Any]:
        key = self.key(uri)
        e = self.files.get(key)
        if not e or e.get("v") != version:
            e = {"v": version}
            self.files[key] = e
        e.update(kv)
        return e

    def save(self) -> None:
        blob = {"version": INGEST_VERSION, "salt_fp": self.salt_fp, "files": self.files}
        atomic_write_bytes(self.path, json.dumps(blob, separators=(",", ":")).encode())


class Source:
    """Listing + stat cache + lazy local paths + hashes for one storage.

    Holds ``storage``, ``cache`` (the :class:`StatCache`), ``info`` (relative path → :class:`SourceFile` of the
    listing) and ``public`` (relative path → its de-identified form, for the DICOM files whose path holds PHI;
    filled by discovery).

    :meth:`ref` is the URI that the manifest and quarantine record for a file: its real URI, except that in a
    DICOM file's path every PHI value of its own header (PACS exports name files after the SOPInstanceUID and
    folders after the patient) is replaced by its salted pseudonym (:func:`~medsam2.data.deid.scrub`), e.g.
    ``series/CT.p3f…`` for ``series/CT.1.3.12.2.1107.5…``; paths without PHI stay readable.
    """

    def __init__(self, storage: Storage, files: list[SourceFile], cache: StatCache) -> None:
        self.storage, self.cache = storage, cache
        self.info = {f.rel: f for f in files}
        self.public: dict[str, str] = {}  # rel -> its de-identified form, for DICOM files whose path holds PHI
        self._rel_of: dict[str, str] = {}

    def public_rel(self, rel: str) -> str:
        """``rel`` as the work dir records it: a DICOM path without its PHI, any other path as it is."""
        return self.public.get(rel, rel)

    def ref(self, rel: str) -> str:
        return self.storage.uri_of(self.public_rel(rel))

    def rel_of(self, ref: str) -> str:
        """The relative path of a file from its :meth:`ref`."""
        if len(self._rel_of) != len(self.info):
            self._rel_of = {self.ref(r): r for r in self.info}
        return self._rel_of[ref]

    def entry(self, rel: str) -> dict[str, Any]:
        f = self.info[rel]
        uri = self.storage.uri_of(rel)
        return self.cache.get(uri, f.version) or self.cache.put(uri, f.version)

    def sha(self, rel: str) -> str:
        e = self.entry(rel)
        if "sha" not in e:
            e["sha"] = file_sha256(self.storage.local_path(rel))
        return e["sha"]

    def path(self, rel: str) -> Path:
        return self.storage.local_path(rel)
