"""How each detection method turns regions into features: R-CNN warps regions, SPP-net pools windows."""
