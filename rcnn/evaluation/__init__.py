"""PASCAL VOC scoring: devkit average precision, devkit result files, AP tables."""
