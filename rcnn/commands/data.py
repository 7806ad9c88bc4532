"""`rcnn data`: create a synthetic dataset in VOC layout, copy a sample of one, convert COCO annotations to one, or
print a dataset's statistics."""

from __future__ import annotations

from pathlib import Path

import click

from rcnn.errors import UserError


@click.group("data")
def data_group():
    """Create, copy, convert (from COCO) or inspect datasets in PASCAL VOC layout."""


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


@data_group.command("subset")
@click.argument("source", type=click.Path(file_okay=False))
@click.argument("directory", type=click.Path(file_okay=False))
@click.option(
    "--split",
    "splits",
    multiple=True,
    default=("trainval=100", "test=50"),
    show_default=True,
    metavar="NAME=N",
    help="N random images of split NAME; repeat for each split to copy.",
)
@click.option("--seed", default=0, show_default=True, help="Random seed; the same seed draws the same images.")
def data_subset(source, directory, splits, seed):
    """Copy a random sample of a VOC dataset's splits to a new folder DIRECTORY.

    The sampled images, their annotations and a split file per split are copied, so the
    sample is a dataset of its own: try a pipeline on it at full settings before the whole
    dataset (`rcnn run voc07-mini --set data.root=DIRECTORY`), or take it to another machine.
    Its stages are computed for it, not shared with the whole dataset's. Examples:

    \b
      rcnn data subset ../shared/data/voc07-mini mini-100
      rcnn data subset /data/cells cells-small --split train=200 --split val=40 --seed 1
    """
    from rcnn.data.datasets import ROOT_LAYOUT
    from rcnn.data.folders import folder_bytes
    from rcnn.data.subset import write_subset

    counts = {}
    for text in splits:
        name, sep, n = text.partition("=")
        if not sep or not name or not n.strip().isdigit():
            raise click.BadParameter(f"{text!r} is not NAME=N, e.g. trainval=100", param_hint="--split")
        if name in counts:
            raise click.BadParameter(f"split '{name}' is given twice", param_hint="--split")
        counts[name] = int(n)
    if not Path(source).is_dir():
        raise UserError(f"dataset root '{source}' does not exist; give `rcnn data subset` {ROOT_LAYOUT}")
    samples = write_subset(source, directory, counts, seed)
    parts = [f"{s.split} {len(s.ids)} of {s.of} images" for s in samples]
    click.echo(f"wrote {directory}: {', '.join(parts)} (seed {seed}), {folder_bytes(Path(directory)) / 2**20:.1f} MB")


def _pairs(texts, option: str, metavar: str, example: str) -> dict[str, str]:
    """``NAME=VALUE`` option values as a dict, each name once and a plain file name."""
    from rcnn.data.filenames import name_problem

    pairs: dict[str, str] = {}
    for text in texts:
        name, sep, value = text.partition("=")
        if not sep or not name or not value:
            raise click.BadParameter(f"{text!r} is not {metavar}, e.g. {example}", param_hint=option)
        if name in pairs:
            raise click.BadParameter(f"split '{name}' is given twice", param_hint=option)
        problem = name_problem(name) or ("it starts with '.'" if name.startswith(".") else None)
        if problem is not None:  # it becomes ImageSets/Main/NAME.txt
            raise click.BadParameter(f"split name {name!r} cannot be a file name ({problem})", param_hint=option)
        pairs[name] = value
    return pairs


@data_group.command("from-coco")
@click.argument("directory", type=click.Path(file_okay=False))
@click.option(
    "--split",
    "splits",
    multiple=True,
    required=True,
    metavar="NAME=JSON",
    help="Split NAME's COCO annotation file; repeat per split.",
)
@click.option(
    "--images",
    multiple=True,
    metavar="NAME=DIR",
    help="The folder split NAME's file_name entries are relative to [default: the JSON file's folder].",
)
@click.option("--quiet", is_flag=True, help="No progress bar.")
def data_from_coco(directory, splits, images, quiet):
    """Write COCO-format box annotations as a VOC-layout dataset in the new folder DIRECTORY.

    Each --split names one COCO JSON (images, annotations, categories; as COCO, CVAT, Label
    Studio and Roboflow export them) and the split file it becomes: ImageSets/Main/NAME.txt,
    listing each image by its file name without extension. Images are hard-linked into
    JPEGImages/ where the filesystem allows (no extra space; the same file, so editing
    one edits both), else copied. Boxes are kept exactly
    (COCO's [x, y, width, height] becomes VOC's 1-based xmin = x + 1, xmax = x + width); crowd
    regions become objects marked difficult (both evaluations ignore them); boxes reaching past
    the image are clipped to it, and those under 1 pixel wide or tall are left out (VOC cannot
    hold them), each counted in the summary. Masks and keypoints are not read. Examples:

    \b
      rcnn data from-coco cells --split trainval=export/train/_annotations.coco.json \\
          --split test=export/valid/_annotations.coco.json
      rcnn data from-coco coco-voc --split trainval=annotations/instances_train2017.json \\
          --images trainval=train2017 --split test=annotations/instances_val2017.json --images test=val2017
    """
    from rcnn.data.coco import read_coco_split, write_coco_as_voc
    from rcnn.data.folders import refuse_used

    files = _pairs(splits, "--split", "NAME=JSON", "trainval=train.json")
    folders = _pairs(images, "--images", "NAME=DIR", "trainval=images/train")
    unknown = [name for name in folders if name not in files]
    if unknown:
        raise click.BadParameter(f"split '{unknown[0]}' has no --split {unknown[0]}=JSON", param_hint="--images")
    refuse_used(Path(directory))
    read = [read_coco_split(name, path, folders.get(name)) for name, path in files.items()]
    ways = write_coco_as_voc(directory, read, progress=not quiet)
    parts = [f"{s.split} {len(s.images)} images, {s.objects} objects" for s in read]
    click.echo(f"wrote {directory}: {'; '.join(parts)} ({ways['linked']} images hard-linked, {ways['copied']} copied)")
    for s in read:
        notes = [
            f"{n} {what}"
            for n, what in (
                (s.crowd, "crowd regions marked difficult"),
                (s.clipped, "boxes clipped to their image"),
                (s.dropped, "boxes under 1 pixel left out"),
                (s.empty, "images without objects (background only)"),
            )
            if n
        ]
        if notes:
            click.echo(f"  {s.split}: {', '.join(notes)}")
    used = {name for s in read for image in s.images for name in image.names}
    classes = [name for name in dict.fromkeys(name for s in read for name in s.categories) if name in used]
    unused = [name for s in read for name in s.categories if name not in used]
    click.echo(f"  classes ({len(classes)}): {', '.join(classes)}")
    if unused:
        click.echo(f"  categories without objects (not classes a pipeline learns): {', '.join(dict.fromkeys(unused))}")
    names = list(files)
    click.echo(f"check each split's images with `rcnn data stats {directory} --check --split {names[0]}`")
    if len(names) < 2:
        click.echo("  one split only: a pipeline needs a split to learn from and another to score (data.trainval, data.test)")
        return
    train = "trainval" if "trainval" in files else names[0]
    test = "test" if "test" in files else next(n for n in reversed(names) if n != train)
    keys = "".join(f", {key}: {name}" for key, name in (("trainval", train), ("test", test)) if name != key)
    click.echo(f"a pipeline reads it with\n  data: {{root: {directory}{keys}}}")


@data_group.command("stats")
@click.argument("directory", type=click.Path(file_okay=False))
@click.option("--split", default="trainval", show_default=True, help="Split file name in ImageSets/Main.")
@click.option("--check", is_flag=True, help="Also decode every image and check its size against its annotation (slower).")
def data_stats(directory, split, check):
    """Print images, objects per class, difficult counts and box sizes of a VOC split, and its bad images.

    Every annotation of the split (trainval unless --split says another) is parsed and
    every image file must exist; with --check every image is also decoded, as the stages
    will, and images whose EXIF orientation tag turns them in viewers are named (boxes
    refer to the stored pixels), as are JPEGs that decode only with the decoder's
    warnings (damaged mid-file) and dim 16-bit images. An id with more than one image
    file (x.jpg and x.png) is noted, naming the one read, and so are class names that
    differ only in case (RBC, rbc) or are alike (circle, circles). Images with a problem are listed, one line each, and
    left out of the counts; the exit status is then 1.
    """
    from rcnn.data.datasets import IMAGE_SUFFIXES, ROOT_LAYOUT, VOCDataset, find_bad_images
    from rcnn.data.imagefile import dim_16bit_peak, exif_orientation
    from rcnn.data.stats import alike_classes, dataset_stats, decoder_warnings, format_stats, several_files

    if not Path(directory).is_dir():
        raise UserError(f"dataset root '{directory}' does not exist; give `rcnn data stats` {ROOT_LAYOUT}")
    dataset = VOCDataset(directory, split)
    if check:
        bad = find_bad_images(dataset)
    else:
        bad = {i: reason for i in dataset.ids if (reason := dataset.problem(i)) is not None}
    stats = dataset_stats(VOCDataset(directory, split, skip=bad))
    click.echo(format_stats(stats))
    case, near = alike_classes(list(stats["per_class"]))
    if case:
        click.echo(
            "\n  note: class names that differ only in case, which a pipeline refuses as two classes (one devkit file on "
            f"macOS or Windows): {'; '.join(', '.join(group) for group in case)}; give each class one spelling"
        )
    if near:
        click.echo(
            "\n  note: class names so alike that one may be misspelt (a pipeline learns each as a class of its own): "
            + "; ".join(f"{a}, {b}" for a, b in near)
        )
    turned = [i for i in dataset.ids if check and i not in bad and exif_orientation(dataset.image_path(i)) != 1]
    if turned:
        click.echo(
            f"\n  note: {len(turned)} image(s) carry an EXIF orientation tag that viewers apply and rcnn does not "
            f"(boxes refer to the stored pixels, as in VOC): {', '.join(turned[:5])}{', ...' if len(turned) > 5 else ''}"
        )
    dim = {i: peak for i in dataset.ids if check and i not in bad and (peak := dim_16bit_peak(dataset.image_path(i))) is not None}
    if dim:
        first = ", ".join(f"{i} ({peak})" for i, peak in list(dim.items())[:5]) + (", ..." if len(dim) > 5 else "")
        click.echo(
            f"\n  note: {len(dim)} 16-bit image(s) use values only up to the one given, of 65535, and decode to 8 bits "
            f"nearly black (rcnn keeps the top 8 bits); scale them to the full range first: {first}"
        )
    damaged = {i: text for i in dataset.ids if check and i not in bad and (text := decoder_warnings(dataset.image_path(i)))}
    if damaged:
        first = "; ".join(f"{i} ({text})" for i, text in list(damaged.items())[:3]) + ("; ..." if len(damaged) > 3 else "")
        click.echo(
            f"\n  note: {len(damaged)} image(s) decode only with the decoder's warnings (damaged data: parts may be grey "
            f"or shifted; the stages use them as decoded, and their warnings name no file): {first}"
        )
    several = several_files(dataset.root / "JPEGImages", dataset.ids, IMAGE_SUFFIXES)
    if several:
        first = "; ".join(f"{', '.join(names)}: {dataset.image_path(i).name} read" for i, names in list(several.items())[:3])
        click.echo(
            f"\n  note: {len(several)} image id(s) have more than one image file, and only one is read (.jpg first, then "
            f"{', '.join(IMAGE_SUFFIXES[1:])}); remove the others if they are not the same picture: {first}"
            + ("; ..." if len(several) > 3 else "")
        )
    if bad:
        click.echo(f"\n  {len(bad)} bad image(s), left out above:")
        for image_id, reason in bad.items():
            click.echo(f"  {image_id}: {reason}")
        raise UserError(f"{len(bad)} of {len(dataset)} image(s) of split '{split}' in {directory} are bad (listed above)")
