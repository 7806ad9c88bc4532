"""Datasets in PASCAL VOC layout: the reader, the synthetic generator, statistics and safe file names."""
