"""The trained detector at test time, and non-maximum suppression."""
