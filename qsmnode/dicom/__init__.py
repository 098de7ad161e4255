"""DICOM input (vendor-aware loading), geometry and output writers."""
