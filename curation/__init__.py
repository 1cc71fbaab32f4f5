"""m3-curate: the data factory for VILA-M3-style stage-4 (expert-augmented) instruction data."""

__version__ = "0.1.0"
