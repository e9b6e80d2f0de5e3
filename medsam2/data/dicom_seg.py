"""A draft DICOM-SEG for a source DICOM instance (highdicom): what ``medsam2 predict`` writes for a DICOM input
and ``medsam2 suggest`` for a DICOM item of the labelling queue.

The SEG references its source instance or series (same Study, Frame of Reference, ReferencedSeriesSequence), has the
source's frame geometry and one binary segment. Patient identity stays inside the SEG (it goes back to the
PACS) and is never logged.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np


def write_dicom_seg(source: Path | list[Any], masks: list[np.ndarray], out_path: Path, label: str = "lesion"
                    ) -> Path:
    """DICOM-SEG with one binary frame per source frame; returns the written path. ``source``: one DICOM file
    (one frame per frame of it), or the pydicom datasets of a series' slices (one frame per slice, in order:
    :func:`medsam2.data.volumes.source_datasets`)."""
    import highdicom as hd
    import pydicom
    from pydicom.sr.codedict import codes

    import medsam2

    sources = [pydicom.dcmread(source)] if isinstance(source, (str, Path)) else list(source)
    desc = hd.seg.SegmentDescription(
        segment_number=1, segment_label=label,
        segmented_property_category=codes.SCT.MorphologicallyAbnormalStructure,
        segmented_property_type=codes.SCT.Lesion,
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
        algorithm_identification=hd.AlgorithmIdentificationSequence(
            name="MedSAM2", version=medsam2.__version__, family=codes.cid7162.ArtificialIntelligence),
    )
    seg = hd.seg.Segmentation(
        source_images=sources, pixel_array=np.stack(masks).astype(bool),
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY, segment_descriptions=[desc],
        series_instance_uid=hd.UID(), series_number=900, sop_instance_uid=hd.UID(), instance_number=1,
        manufacturer="MedSAM2", manufacturer_model_name="MedSAM2", software_versions=medsam2.__version__,
        device_serial_number="medsam2",
    )
    out_path.parent.mkdir(parents=True, exist_ok=True)
    seg.save_as(out_path)
    return out_path
