"""Networks: backbones and checkpoints, region warping, SPP pooling, inference preparation."""
