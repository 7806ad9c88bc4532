"""R-CNN and SPP-net object detection as staged, cached jobs."""

__version__ = "0.1.0"
