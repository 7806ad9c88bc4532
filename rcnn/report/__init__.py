"""The `rcnn compare` study: runs read from their manifests, tables, figures and seed summaries."""
