"""Data sources, annotation, token cache and datasets."""
