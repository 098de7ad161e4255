"""qsmnode: a DICOM node that reconstructs quantitative susceptibility maps (QSM)."""

__version__ = "0.1.0"
