"""Active learning: which unlabelled images to label next (``medsam2 suggest``).

- :mod:`.scores`: the acquisition scores, one registry (``ACQUISITIONS``): SAM's predicted IoU, mask entropy,
  flip disagreement, k-center diversity over image embeddings, random.
- :mod:`.pool`: the unlabelled pool of a work dir, the signals the scores read, the ranking.
- :mod:`.queue`: the labelling queue (CSV, Label Studio import with pre-annotations, overlays, DICOM-SEG).
- Label Studio's brush RLE and import tasks are in :mod:`medsam2.data.labelstudio` (the label ingest reads them too).
"""
