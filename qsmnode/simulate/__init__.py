"""Numerical head phantom, forward model and vendor-flavoured DICOM writer."""
