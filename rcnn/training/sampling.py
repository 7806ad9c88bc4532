"""Fine-tuning mini-batches: draw foreground and background regions in a fixed proportion.

R-CNN (Girshick et al., CVPR 2014) section 2.3: batches of 128 regions hold 32 positives. The labels
they are drawn from come from :func:`rcnn.training.regions.finetune_labels`.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np


class _Cycle:
    """Endless draws from ``items`` without replacement: one shuffled pass after another."""

    def __init__(self, items: np.ndarray, rng: np.random.Generator):
        self._items = items
        self._rng = rng
        self._order = rng.permutation(items)
        self._pos = 0

    def take(self, k: int) -> np.ndarray:
        """The next ``k`` items; no item twice in one call while ``k <= len(items)``."""
        if k > 0 and len(self._items) == 0:
            raise ValueError("cannot draw from an empty set of regions")
        parts: list[np.ndarray] = []
        while k > 0:
            if self._pos == len(self._order):
                order = self._rng.permutation(self._items)
                if parts:
                    # Items already drawn in this call go to the back of the new pass.
                    taken = np.isin(order, np.concatenate(parts))
                    order = np.concatenate([order[~taken], order[taken]])
                self._order, self._pos = order, 0
            part = self._order[self._pos : self._pos + k]
            self._pos += len(part)
            k -= len(part)
            parts.append(part)
        return np.concatenate(parts) if parts else self._items[:0]


class FgBgSampler:
    """Draws fine-tuning mini-batches of ``batch_size`` regions, ``fg_fraction`` of them foreground.

    Regions are pooled over all images, so a batch mixes images (as R-CNN's window data layer does).
    Each batch holds ``round(fg_fraction * batch_size)`` (at least 1) foreground regions (32 of 128 in R-CNN) and
    background for the rest; when foreground runs short the batch is topped up with background, and
    when background runs short with foreground. Regions labelled -1 are never drawn. Foreground and
    background are each drawn without replacement in shuffled passes, so no region appears twice in
    a batch unless there are fewer regions of its kind than the batch needs. A batch lists its
    foreground first, then its background. If there are fewer usable regions than ``batch_size``,
    every batch holds all of them.

    Args:
        labels: int ``[R]`` label of every region of every image, in ``{-1, 0, 1..C}``.
        batch_size: regions per batch (128 in R-CNN).
        fg_fraction: share of foreground in a batch (0.25 in R-CNN).
        image_index: optional int ``[R]`` image of each region, for :meth:`locate`.
        region_index: optional int ``[R]`` index of each region within its image, for :meth:`locate`.
    """

    def __init__(
        self,
        labels: np.ndarray,
        batch_size: int = 128,
        fg_fraction: float = 0.25,
        image_index: np.ndarray | None = None,
        region_index: np.ndarray | None = None,
    ):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if not 0.0 < fg_fraction <= 1.0:
            raise ValueError(f"fg_fraction must be in (0, 1], got {fg_fraction}")
        self.labels = np.asarray(labels, dtype=np.int64).reshape(-1)
        self.batch_size = int(batch_size)
        self.fg_fraction = float(fg_fraction)
        # Half up, not Python's half-to-even, and at least one so that an epoch over the fg ends.
        self.fg_per_batch = max(1, int(np.floor(fg_fraction * batch_size + 0.5)))
        self.fg_indices = np.flatnonzero(self.labels > 0)
        self.bg_indices = np.flatnonzero(self.labels == 0)
        for name, index in (("image_index", image_index), ("region_index", region_index)):
            if index is not None and len(index) != len(self.labels):
                raise ValueError(f"{name} has {len(index)} entries for {len(self.labels)} regions")
        self.image_index = None if image_index is None else np.asarray(image_index, dtype=np.int64)
        self.region_index = None if region_index is None else np.asarray(region_index, dtype=np.int64)

    @classmethod
    def from_image_labels(cls, labels_per_image: Sequence[np.ndarray], **kwargs) -> FgBgSampler:
        """A sampler over the regions of several images, given each image's ``[R_i]`` labels."""
        sizes = [len(np.asarray(lab).reshape(-1)) for lab in labels_per_image]
        flat = [np.asarray(lab, dtype=np.int64).reshape(-1) for lab in labels_per_image]
        labels = np.concatenate(flat) if flat else np.zeros(0, dtype=np.int64)
        image_index = np.repeat(np.arange(len(sizes), dtype=np.int64), sizes)
        region_index = np.concatenate([np.arange(s, dtype=np.int64) for s in sizes]) if sizes else image_index
        return cls(labels, image_index=image_index, region_index=region_index, **kwargs)

    def locate(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``(image, region)`` int64 indices of the flat region indices in ``batch``."""
        if self.image_index is None or self.region_index is None:
            raise ValueError("this sampler was built without image_index and region_index")
        return self.image_index[batch], self.region_index[batch]

    def _composition(self, fg_left: int) -> tuple[int, int]:
        """Foreground and background counts of a batch when at most ``fg_left`` foreground may be used."""
        n_fg = min(self.fg_per_batch, fg_left)
        n_bg = min(self.batch_size - n_fg, len(self.bg_indices))
        n_fg = min(self.batch_size - n_bg, fg_left)
        return n_fg, n_bg

    def epoch_batches(self, rng: np.random.Generator | int, n_batches: int | None = None) -> Iterator[np.ndarray]:
        """Yield int64 index arrays into ``labels``, one per mini-batch.

        With ``n_batches=None`` this is one epoch: every foreground region exactly once, in
        ``ceil(n_fg / fg_per_batch)`` batches when background is plentiful, the last one topped up
        with background (without foreground: every background region once). With ``n_batches``
        (R-CNN trained by iterations) it yields that many batches, starting a freshly shuffled pass
        over the foreground whenever one is used up, so every batch has its full foreground share.

        Args:
            rng: a ``numpy.random.Generator`` or a seed; the same seed gives the same batches.
            n_batches: number of batches, or ``None`` for one epoch.
        """
        rng = np.random.default_rng(rng)
        n_fg_total, n_bg_total = len(self.fg_indices), len(self.bg_indices)
        if n_fg_total + n_bg_total == 0:
            return
        fg = _Cycle(self.fg_indices, rng)
        bg = _Cycle(self.bg_indices, rng)
        fg_seen = bg_seen = done = 0
        while True:
            if n_batches is not None:
                if done == n_batches:
                    return
                n_fg, n_bg = self._composition(n_fg_total)
            elif n_fg_total:
                if fg_seen == n_fg_total:
                    return
                n_fg, n_bg = self._composition(n_fg_total - fg_seen)
            else:
                if bg_seen == n_bg_total:
                    return
                n_fg, n_bg = 0, min(self.batch_size, n_bg_total - bg_seen)
            fg_seen += n_fg
            bg_seen += n_bg
            done += 1
            yield np.concatenate([fg.take(n_fg), bg.take(n_bg)]).astype(np.int64)


class ImageBatchSampler(FgBgSampler):
    """Fast R-CNN's mini-batches (Girshick, ICCV 2015, section 2.3): ``images_per_batch`` images (2), then
    ``batch_size / images_per_batch`` regions from each (64 of 128), a ``fg_fraction`` (0.25) of them foreground
    where the image has that many, the rest background, each drawn without replacement; an image short of
    background gives fewer regions, as Fast R-CNN's minibatch code does. Images are drawn in shuffled passes over
    those with a usable region. Batches are flat indices, as :class:`FgBgSampler`'s, foreground first per image.
    """

    def __init__(self, labels: np.ndarray, images_per_batch: int = 2, **kwargs):
        super().__init__(labels, **kwargs)
        if images_per_batch < 1:
            raise ValueError(f"images_per_batch must be >= 1, got {images_per_batch}")
        if self.image_index is None:
            raise ValueError("an image-centric sampler needs image_index and region_index")
        self.images_per_batch = int(images_per_batch)
        self.per_image = max(1, self.batch_size // self.images_per_batch)
        self.fg_per_image = max(1, int(np.floor(self.fg_fraction * self.per_image + 0.5)))
        self.usable_images = np.unique(self.image_index[self.labels >= 0])
        # Each image's foreground and background, ascending, from one grouping of the regions by image (a scan of
        # every region per image would be 5,000 scans of 10 million regions on VOC2007 at 2000 boxes).
        fg, bg = self.fg_indices, self.bg_indices
        self._fg = _by_image(fg, self.image_index[fg], self.usable_images)
        self._bg = _by_image(bg, self.image_index[bg], self.usable_images)

    def epoch_batches(self, rng: np.random.Generator | int, n_batches: int | None = None) -> Iterator[np.ndarray]:
        """Yield ``n_batches`` batches (None: one pass over the usable images); the same seed, the same batches."""
        rng = np.random.default_rng(rng)
        if len(self.usable_images) == 0:
            return
        images = _Cycle(self.usable_images, rng)
        n_passes = -(-len(self.usable_images) // self.images_per_batch)
        for _ in range(n_passes if n_batches is None else n_batches):
            parts = []
            for i in images.take(min(self.images_per_batch, len(self.usable_images))).tolist():
                fg, bg = self._fg[i], self._bg[i]
                n_fg = min(self.fg_per_image, len(fg))
                n_bg = min(self.per_image - n_fg, len(bg))
                parts.append(rng.choice(fg, n_fg, replace=False))
                parts.append(rng.choice(bg, n_bg, replace=False))
            yield np.concatenate(parts).astype(np.int64)


def _by_image(indices: np.ndarray, images: np.ndarray, wanted: np.ndarray) -> dict[int, np.ndarray]:
    """``{image: its entries of indices}`` for each image in ``wanted``; ``indices`` ascending, ``images`` theirs."""
    order = np.argsort(images, kind="stable")  # stable: each image's indices stay ascending
    sorted_images = images[order]
    lo, hi = np.searchsorted(sorted_images, wanted, "left"), np.searchsorted(sorted_images, wanted, "right")
    return {int(i): indices[order[a:b]] for i, a, b in zip(wanted, lo, hi)}
