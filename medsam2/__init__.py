"""MedSAM2: fine-tune Meta's SAM2 for medical image segmentation.

The library is pure: it imports neither prefect nor ray; mlflow only in ``medsam2.tracking``.
Stages, one hop each: ``medsam2.data.ingest`` → ``medsam2.data.validate`` → ``medsam2.engine.train`` →
``medsam2.engine.evaluate`` → ``medsam2.tracking.promote``.
"""

__version__ = "0.1.0"
