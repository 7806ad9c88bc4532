"""`rcnn data`: create a synthetic dataset in VOC layout, or print a dataset's statistics."""

from __future__ import annotations

from pathlib import Path

import click

from rcnn.commands.shared import *  # noqa


@click.group("data")
def data_group():
    """Create or inspect datasets in PASCAL VOC layout."""


@data_group.command("synth")
@click.argument("directory", type=click.Path(file_okay=False))
@click.option("--images", default=60, show_default=True, help="Number of images.")
@click.option("--seed", default=0, show_default=True, help="Random seed; the same seed gives identical files.")
@click.option("--size", default=256, show_default=True, help="Image side in pixels.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
def data_synth(directory, images, seed, size, quiet):
    """Write a synthetic shapes dataset (5 classes) in VOC layout to DIRECTORY.

    Circles, squares, triangles, stars and crosses of random colours on cluttered,
    textured backgrounds, 1-6 per image, some overlapping or cut by the border.
    The result has JPEGImages/, Annotations/ and ImageSets/Main/{trainval,test}.txt.
    """
    from rcnn.data.synth import generate_dataset

    summary = generate_dataset(Path(directory), n_images=images, seed=seed, size=size, progress=not quiet)
    click.echo(f"wrote {directory}: {summary}")


@data_group.command("stats")
@click.argument("directory", type=click.Path(file_okay=False))
@click.option("--split", default="trainval", show_default=True, help="Split file name in ImageSets/Main.")
def data_stats(directory, split):
    """Print images, objects per class, difficult counts and box sizes of a VOC split."""
    from rcnn.data.datasets import VOCDataset
    from rcnn.data.stats import dataset_stats, format_stats

    click.echo(format_stats(dataset_stats(VOCDataset(directory, split))))
