"""``python -m medsam2.cli``."""

from medsam2.cli import app

app()
