"""Findings and the structured report."""
