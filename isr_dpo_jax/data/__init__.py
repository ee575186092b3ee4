"""Data: videos, text, records, datasets and the synthetic video world."""
