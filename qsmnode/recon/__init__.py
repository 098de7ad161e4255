"""Reconstruction: multi-echo GRE -> QSM, R2*, SWI, on numpy or cupy."""
