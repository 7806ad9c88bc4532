"""Boxes and the R-CNN box transform: the one box convention, float32 (x1, y1, x2, y2)."""
