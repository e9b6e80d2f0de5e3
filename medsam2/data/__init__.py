"""Data platform: ingest sources into a manifest + uint8 cache, validate it, split it, augment it.

Modules: ``manifest`` (schema, versioning, atomic I/O), ``storage`` (local / s3), ``readers`` + ``dicom``
(decoding), ``layouts`` (pairing rules, profiles), ``deid`` (pseudonyms, PHI), ``process`` (one unit → rows),
``ingest`` (orchestration) over ``discover`` (what the source holds, per kind of file), ``source`` (the
listing, stat cache), ``ledger`` (accepted / quarantined rows, checkpoints) and ``dedup`` (same content),
``splits``, ``validate`` (great-expectations), ``transforms`` (albumentations).
Imports are lazy: ``import medsam2.data`` loads nothing heavy.
"""
