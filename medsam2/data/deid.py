"""De-identification: salted pseudonyms for patient ids, a whitelist of header fields, PHI scrubbing of text.

Rules (applied at ingest; nothing else from a DICOM header is ever stored, logged or written to the cache):

* ``patient_id`` = ``"p" + HMAC-SHA256(salt, raw_key)[:16]``. The raw key (DICOM PatientID, a BraTS case id, a
  CVC sequence number, ...) is never stored. The salt comes from the ``salt`` argument, else the env var
  ``MEDSAM2_DEID_SALT``, else ``workdir/.salt`` (32 random bytes, created once, mode 0600). Same salt → same
  pseudonym, so grouping by patient works across ingests; without the salt the mapping cannot be reversed by
  hashing a list of candidate ids.
* Stored header fields are limited to :data:`SAFE_DICOM_FIELDS` (technical: modality, size, spacing, window,
  photometric, bit depth, SOP class, transfer syntax). Names, dates, accession numbers, institutions, UIDs,
  private tags, free-text descriptions: never.
* Error details from parsing libraries may echo header values; :func:`scrub` removes every PHI value found in
  the file's header (:func:`phi_values`) before the detail reaches the quarantine table or a log line.
* ``BurnedInAnnotation == "YES"`` images are quarantined (``burned_in_phi``): their pixels carry PHI.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
from pathlib import Path
from typing import Any

from medsam2.data.manifest import atomic_write_bytes

SALT_ENV = "MEDSAM2_DEID_SALT"

#: DICOM keywords whose values may be stored (manifest ``meta``). Everything else is dropped.
SAFE_DICOM_FIELDS = (
    "Modality",
    "Rows",
    "Columns",
    "NumberOfFrames",
    "PixelSpacing",
    "SliceThickness",
    "PhotometricInterpretation",
    "BitsAllocated",
    "BitsStored",
    "PixelRepresentation",
    "SamplesPerPixel",
    "RescaleSlope",
    "RescaleIntercept",
    "WindowCenter",
    "WindowWidth",
    "SOPClassUID",
)

#: Keywords whose values are PHI (or may be); used to scrub free text and by the de-identification test.
PHI_KEYWORDS = (
    "PatientName",
    "PatientID",
    "OtherPatientIDs",
    "PatientBirthDate",
    "PatientBirthTime",
    "PatientAddress",
    "PatientTelephoneNumbers",
    "AccessionNumber",
    "InstitutionName",
    "InstitutionAddress",
    "InstitutionalDepartmentName",
    "ReferringPhysicianName",
    "PerformingPhysicianName",
    "OperatorsName",
    "StationName",
    "StudyID",
    "StudyDate",
    "SeriesDate",
    "AcquisitionDate",
    "ContentDate",
    "StudyInstanceUID",
    "SeriesInstanceUID",
    "SOPInstanceUID",
    "FrameOfReferenceUID",
    "DeviceSerialNumber",
)


def load_salt(workdir: str | Path, salt: str | None = None) -> str:
    """The de-identification salt: ``salt`` arg > ``$MEDSAM2_DEID_SALT`` > ``workdir/.salt`` (created
    once)."""
    if salt:
        return salt
    env = os.environ.get(SALT_ENV)
    if env:
        return env
    path = Path(workdir) / ".salt"
    if path.exists():
        return path.read_text().strip()
    value = secrets.token_hex(32)
    atomic_write_bytes(path, value.encode())
    os.chmod(path, 0o600)
    return value


def pseudonymise(raw_key: str, salt: str) -> str:
    """``"p" + 16 hex`` = HMAC-SHA256(salt, raw_key); deterministic for a salt, irreversible without it."""
    return "p" + hmac.new(salt.encode(), raw_key.encode(), hashlib.sha256).hexdigest()[:16]


def _str_values(v: Any) -> list[str]:
    if v is None:
        return []
    if isinstance(v, (list, tuple)) or type(v).__name__ == "MultiValue":
        return [s for x in v for s in _str_values(x)]
    s = str(v).strip()
    out = [s] if s else []
    if "^" in s:  # person names: also each component (family, given, ...)
        out += [p for p in s.split("^") if len(p) >= 3]
    return out


def phi_values(ds: Any) -> list[str]:
    """Every non-empty PHI value in a pydicom Dataset (for scrubbing and tests); longest first."""
    vals: set[str] = set()
    for kw in PHI_KEYWORDS:
        vals.update(_str_values(ds.get(kw)))
    meta = getattr(ds, "file_meta", None)  # the instance UID of the file meta (kept when anonymisers blank the body)
    if meta is not None:
        vals.update(_str_values(meta.get("MediaStorageSOPInstanceUID")))
    return sorted((v for v in vals if len(v) >= 2), key=len, reverse=True)


def scrub(text: str, values: list[str], salt: str | None = None) -> str:
    """``text`` with every occurrence of each PHI value (longest first) replaced by ``<redacted>``, or with a salt
    by the value's pseudonym (:func:`pseudonymise`), which keeps distinct values distinct (file names that are
    SOPInstanceUIDs). Values under 3 characters are left alone with a salt (they would rewrite ordinary names)."""
    for v in sorted(values, key=len, reverse=True):
        if v and v in text and (salt is None or len(v) >= 3):
            text = text.replace(v, "<redacted>" if salt is None else pseudonymise(v, salt))
    return text


def _jsonable(v: Any) -> Any:
    if v is None:
        return None
    if isinstance(v, (list, tuple)) or type(v).__name__ == "MultiValue":
        return [_jsonable(x) for x in v]
    if isinstance(v, (int, float, str)):
        return v if not isinstance(v, str) else str(v)
    try:
        return float(v)
    except (TypeError, ValueError):
        return str(v)


def safe_dicom_meta(ds: Any) -> dict[str, Any]:
    """Whitelisted technical fields of a DICOM header (see :data:`SAFE_DICOM_FIELDS`) plus the transfer
    syntax."""
    out: dict[str, Any] = {}
    for kw in SAFE_DICOM_FIELDS:
        v = ds.get(kw)
        if v is not None and v != "":
            out[kw] = _jsonable(v)
    fm = getattr(ds, "file_meta", None)
    if fm is not None and "TransferSyntaxUID" in fm:
        out["TransferSyntaxUID"] = str(fm.TransferSyntaxUID)
    return out
