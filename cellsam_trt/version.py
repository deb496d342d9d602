"""The package version (kept in one place: the artefact manifests and cache keys record it)."""
__version__ = "0.1.0"
