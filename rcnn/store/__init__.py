"""The on-disk artifact store: manifests, per-image record files and code identity."""
