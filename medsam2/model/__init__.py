"""SAM2 model assembly: backbone (``backbone``), adapters (``adapters/``), decoders (``decoders/``), ``segmenter``."""
