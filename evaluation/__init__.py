"""Scoring of segmentations against reference labels (imports from app/, never the reverse)."""
