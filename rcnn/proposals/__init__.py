"""Region proposals: selective search through OpenCV, and proposal recall."""
