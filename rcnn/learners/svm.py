"""Per-class linear SVMs trained with hard-negative mining, as the R-CNN release did it.

Reproduces ``rcnn_train.m`` of the R-CNN code (Girshick et al., "Rich feature hierarchies for
accurate object detection and semantic segmentation", CVPR 2014): features rescaled to a mean norm
of 20, one pass of hard-negative mining per class, liblinear (through scikit-learn) on a cache of
all positives and the hard negatives.
"""

from __future__ import annotations

import json
import os
import warnings
import zipfile
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import joblib
import numpy as np
from sklearn.svm import LinearSVC

from rcnn.errors import UserError
from rcnn.store.artifacts import write_json_atomic

FORMAT = "rcnn.svm/1"
#: loky, joblib's process pool, replaces a worker whose memory grew past 300 MB once its task is done, and says so
#: with a warning that blames a timeout or a leak (joblib issues 869 and 883). A mining worker reads every image's
#: features, so it grows that much on real data; the results are the same. Kept from the user.
LOKY_RECYCLED = "A worker stopped while some jobs were given to the executor"


@dataclass(frozen=True)
class SVMParams:
    """SVM training hyper-parameters; the defaults are those of the R-CNN release."""

    C: float = 0.001  # rcnn_train.m 'svm_C' = 10^-3 (liblinear -c)
    pos_loss_weight: float = 2.0  # rcnn_train.m 'pos_loss_weight' (liblinear -w1)
    bias_mult: float = 10.0  # rcnn_train.m 'bias_mult' (liblinear -B)
    neg_overlap: float = 0.3  # rcnn_train.m neg_ovr_thresh; paper Sec. 2.3 (IoU grid-searched over 0..0.5)
    hard_threshold: float = -1.0001  # rcnn_train.m init_cache hard_thresh: margin violators and the margin itself
    evict_threshold: float = -1.2  # rcnn_train.m init_cache evict_thresh
    retrain_limit: int = 2000  # rcnn_train.m init_cache retrain_limit
    target_norm: float = 20.0  # rcnn_scale_features.m target_norm (the range C was tuned on)
    tol: float = 0.1  # liblinear's default -e for the dual solvers; R-CNN passed no -e
    max_iter: int = 1000  # liblinear's built-in cap on dual coordinate-descent passes


@dataclass(frozen=True, eq=False)
class ImageFeatures:
    """Features of the ground-truth boxes and proposals of one image.

    Attributes:
        features: float32 ``[N, D]``, unscaled (training applies the feature scale).
        gt_classes: int64 ``[N]``, class index ``0..C-1`` for ground-truth rows, -1 for proposals.
        overlaps: float32 ``[N, C]``, IoU of each row with the best-overlapping ground truth of
            each class (0 where the image has none), as R-CNN's ``roidb.overlap``.
    """

    features: np.ndarray
    gt_classes: np.ndarray
    overlaps: np.ndarray

    def __post_init__(self) -> None:
        features = np.asarray(self.features, dtype=np.float32)
        gt_classes = np.asarray(self.gt_classes, dtype=np.int64).reshape(-1)
        overlaps = np.asarray(self.overlaps, dtype=np.float32)
        if features.ndim != 2 or overlaps.ndim != 2 or not (len(features) == len(gt_classes) == len(overlaps)):
            raise ValueError(
                f"ImageFeatures need features [N, D], gt_classes [N] and overlaps [N, C]; got shapes "
                f"{features.shape}, {gt_classes.shape} and {overlaps.shape}"
            )
        if ((gt_classes < -1) | (gt_classes >= overlaps.shape[1])).any():
            raise ValueError(f"gt_classes must be -1 or a class index below {overlaps.shape[1]}")
        object.__setattr__(self, "features", features)
        object.__setattr__(self, "gt_classes", gt_classes)
        object.__setattr__(self, "overlaps", overlaps)


def thin_negatives(boxes: np.ndarray, gt_classes: np.ndarray, max_overlap: float) -> np.ndarray:
    """Rows to keep when negatives that overlap another negative by more than ``max_overlap`` are dropped.

    SPP-net (section 4.2 of the TPAMI paper) removed negative samples overlapping another negative by
    more than 70 %. Proposals are visited in their given order (selective search's ranking) and one is
    kept unless its IoU with an already kept proposal exceeds ``max_overlap``; ground-truth rows
    (``gt_classes >= 0``), the positives, are always kept.

    Args:
        boxes: ``[N, 4]`` in ``(x1, y1, x2, y2)``, continuous pixel coordinates.
        gt_classes: int64 ``[N]``, -1 for proposals.
        max_overlap: IoU above which a later proposal is dropped.

    Returns:
        int64 ``[K]`` indices of the kept rows, in their original order.
    """
    from rcnn.detection.nms import nms

    gt_classes = np.asarray(gt_classes).reshape(-1)
    proposals = np.flatnonzero(gt_classes < 0)
    ranks = -np.arange(len(proposals), dtype=np.float64)  # earlier proposals win
    kept = proposals[nms(np.asarray(boxes, np.float32)[proposals], ranks, max_overlap)]
    return np.sort(np.concatenate([np.flatnonzero(gt_classes >= 0), kept]))


ImageSource = Sequence[ImageFeatures] | Callable[[], Iterable[ImageFeatures]]
"""Training images, read once per pass: a sequence, or a function returning a fresh iterator."""


def _iterate(images: ImageSource) -> Iterator[ImageFeatures]:
    if callable(images):
        return iter(images())
    if iter(images) is images:
        raise TypeError("a one-shot iterator cannot be read twice; pass a sequence or a function returning an iterator")
    return iter(images)


def _row_norms(features: np.ndarray) -> np.ndarray:
    return np.sqrt(np.einsum("ij,ij->i", features, features, dtype=np.float64))


def feature_scale(features: np.ndarray | Iterable[np.ndarray], target_norm: float = 20.0) -> float:
    """The scalar that gives ``features`` (``[N, D]``, or an iterable of such arrays) a mean L2 norm of ``target_norm``.

    R-CNN estimated the mean norm from 200 random rows of 200 random training images; this takes
    the exact mean over all rows given, so pass a sample to bound the cost.
    """
    chunks = [features] if isinstance(features, np.ndarray) else features
    total, count = 0.0, 0
    for chunk in chunks:
        norms = _row_norms(np.asarray(chunk, dtype=np.float32).reshape(len(chunk), -1))
        total, count = total + float(norms.sum()), count + len(norms)
    if count == 0 or total == 0.0:
        raise ValueError("feature_scale needs at least one non-zero feature row")
    return float(target_norm / (total / count))


def train_plain_svm(X_pos: np.ndarray, X_neg: np.ndarray, params: SVMParams = SVMParams()) -> tuple[np.ndarray, float]:
    """One liblinear fit, ``-s 3 -c C -w1 pos_loss_weight -B bias_mult`` (R-CNN's ``update_model``).

    Args:
        X_pos: float32 ``[P, D]`` positive features (label +1), scaled.
        X_neg: float32 ``[M, D]`` negative features (label -1), scaled.

    Returns:
        ``(w, b)``: float32 ``[D]`` weights and the bias, so that ``score = x @ w + b``. liblinear
        appends a constant feature ``bias_mult`` and regularises its weight like the others;
        scikit-learn's ``intercept_`` is already that weight times ``bias_mult``.
    """
    X = np.concatenate([X_pos, X_neg], dtype=np.float64)
    y = np.concatenate([np.ones(len(X_pos)), -np.ones(len(X_neg))])
    svc = LinearSVC(
        C=params.C,
        loss="hinge",
        dual=True,
        fit_intercept=True,
        intercept_scaling=params.bias_mult,
        class_weight={1: params.pos_loss_weight, -1: 1.0},
        tol=params.tol,
        max_iter=params.max_iter,
        random_state=0,
    )
    svc.fit(X, y)
    # R-CNN stored single-precision detectors.
    return svc.coef_[0].astype(np.float32), float(np.float32(svc.intercept_[0]))


@dataclass(frozen=True, eq=False)
class ClassSVM:
    """The mined SVM of one class.

    Attributes:
        weight: float32 ``[D]``, for scaled features. bias: the bias.
        history: one dict per retrain: ``image`` (index of the image after which it ran),
            ``num_pos``, ``num_neg`` (cache size), ``pos_loss``, ``neg_loss``, ``reg_loss``,
            ``total_loss`` (liblinear's objective on the cache) and ``num_evicted``.
        cache_keys: int64 ``[M, 2]`` ``(image index, row)`` of the negatives left in the cache.
    """

    weight: np.ndarray
    bias: float
    history: list[dict]
    cache_keys: np.ndarray


class _Cache:
    """One class's training cache: all positives and the negatives mined so far, in arrival order."""

    def __init__(self, positives: np.ndarray, dim: int):
        self.pos = positives
        self.neg = np.zeros((0, dim), np.float32)
        self.keys = np.zeros((0, 2), np.int64)
        self.pending: list[tuple[np.ndarray, np.ndarray]] = []
        self.num_added = 0
        self.history: list[dict] = []

    def add(self, image: int, rows: np.ndarray, features: np.ndarray) -> None:
        if len(rows):
            self.pending.append((np.stack([np.full(len(rows), image), rows], axis=1), features))
            self.num_added += len(rows)

    def flush(self) -> None:
        if self.pending:
            self.keys = np.concatenate([self.keys] + [k for k, _ in self.pending])
            self.neg = np.concatenate([self.neg] + [f for _, f in self.pending])
            self.pending = []


OnRetrain = Callable[[int, int, np.ndarray, float, np.ndarray, np.ndarray], None]
"""Called after each retrain with ``(class, image, w, b, cache keys [M, 2], cache scores [M])``, before eviction."""


def _retrain(cache: _Cache, cls: int, image: int, params: SVMParams, on_retrain: OnRetrain | None) -> tuple[np.ndarray, float]:
    cache.flush()
    w, b = train_plain_svm(cache.pos, cache.neg, params)
    z_pos, z_neg = cache.pos @ w + np.float32(b), cache.neg @ w + np.float32(b)
    pos_loss = params.C * params.pos_loss_weight * float(np.maximum(0, 1 - z_pos).sum(dtype=np.float64))
    neg_loss = params.C * float(np.maximum(0, 1 + z_neg).sum(dtype=np.float64))
    # liblinear also regularises the bias weight, b / bias_mult (as rcnn_train.m's reg_loss).
    reg_loss = 0.5 * float(w.astype(np.float64) @ w) + 0.5 * (b / params.bias_mult) ** 2
    if on_retrain is not None:
        on_retrain(cls, image, w, b, cache.keys.copy(), z_neg)
    keep = ~(z_neg < params.evict_threshold)
    cache.history.append(
        dict(image=image, num_pos=len(cache.pos), num_neg=len(cache.neg), pos_loss=pos_loss, neg_loss=neg_loss,
             reg_loss=reg_loss, total_loss=pos_loss + neg_loss + reg_loss, num_evicted=int((~keep).sum()))
    )  # fmt: skip
    cache.neg, cache.keys, cache.num_added = cache.neg[keep], cache.keys[keep], 0
    return w, b


def mine_hard_negatives(
    images: ImageSource,
    positives: Mapping[int, np.ndarray],
    params: SVMParams = SVMParams(),
    scale: float = 1.0,
    on_retrain: OnRetrain | None = None,
    progress: bool = False,
) -> dict[int, ClassSVM]:
    """One pass of R-CNN hard-negative mining over ``images``, in order, for the classes in ``positives``.

    The negatives of class ``c`` are the rows (proposals and other classes' ground truth) whose
    overlap with class ``c`` is below ``neg_overlap`` (never its own ground truth). All of the
    first image's are cached; later, those the current model scores above ``hard_threshold``. A
    class retrains after the first image, once more than ``retrain_limit`` negatives were added
    since its last retrain, and after the last image; then it evicts the cached negatives scoring
    below ``evict_threshold``. ``images`` is read once, in order, whatever the number of classes.

    Args:
        positives: class index -> float32 ``[P, D]`` features of its ground-truth boxes, scaled.
        scale: multiplies each image's features before scoring and caching.
    """
    from tqdm import tqdm

    caches: dict[int, _Cache] = {}
    W = B = None
    it = _iterate(images)
    current = next(it, None)
    bar = tqdm(desc="hard negatives", unit="image", disable=None if progress else True)
    i = 0
    while current is not None:
        upcoming = next(it, None)
        x = current.features * np.float32(scale)
        if W is None:
            W = np.zeros((x.shape[1], current.overlaps.shape[1]), np.float32)
            B = np.zeros(current.overlaps.shape[1], np.float32)
            caches = {c: _Cache(np.asarray(p, np.float32), x.shape[1]) for c, p in sorted(positives.items())}
        # Every worker scores all C columns so that the BLAS call, hence each score, is the same
        # whichever way the classes are split between workers.
        z = x @ W + B if i > 0 else None
        for c, cache in caches.items():
            candidate = (current.overlaps[:, c] < params.neg_overlap) & (current.gt_classes != c)
            if z is not None:
                candidate &= z[:, c] > params.hard_threshold
            rows = np.flatnonzero(candidate)
            cache.add(i, rows, x[rows])
            if (i == 0 or cache.num_added > params.retrain_limit or upcoming is None) and (len(cache.neg) or cache.pending):
                W[:, c], B[c] = _retrain(cache, c, i, params, on_retrain)
        current, i = upcoming, i + 1
        bar.update()
    bar.close()
    if W is None:
        raise UserError("no training images")
    return {c: ClassSVM(W[:, c].copy(), float(B[c]), cache.history, cache.keys) for c, cache in caches.items()}


@dataclass(frozen=True, eq=False)
class SVMModel:
    """Linear detectors of ``C`` classes over ``D``-dimensional features.

    Attributes:
        weights: float32 ``[D, C]``, for features multiplied by ``feature_scale``.
        biases: float32 ``[C]``.
        feature_scale: the training features' scale (``target_norm / mean norm``).
        history: per class, the list of retrain records of :class:`ClassSVM`.
    """

    weights: np.ndarray
    biases: np.ndarray
    feature_scale: float
    history: tuple[list[dict], ...] = ()

    def __post_init__(self) -> None:
        weights, biases = np.asarray(self.weights), np.asarray(self.biases)
        if weights.dtype != np.float32 or biases.dtype != np.float32:
            raise ValueError(f"weights and biases must be float32; got {weights.dtype} and {biases.dtype}")
        if weights.ndim != 2 or biases.shape != (weights.shape[1],):
            raise ValueError(f"weights must be [D, C] and biases [C]; got {weights.shape} and {biases.shape}")
        if not (np.isfinite(weights).all() and np.isfinite(biases).all()):
            raise ValueError("weights and biases must be finite")
        if not (np.isfinite(self.feature_scale) and self.feature_scale > 0):
            raise ValueError(f"feature_scale must be positive; got {self.feature_scale}")
        history = tuple(list(h) for h in self.history) or tuple([] for _ in range(weights.shape[1]))
        if len(history) != weights.shape[1]:
            raise ValueError(f"history must hold one list per class ({weights.shape[1]}); got {len(history)}")
        object.__setattr__(self, "weights", weights)
        object.__setattr__(self, "biases", biases)
        object.__setattr__(self, "feature_scale", float(self.feature_scale))
        object.__setattr__(self, "history", history)

    def scores(self, features: np.ndarray) -> np.ndarray:
        """Scores float32 ``[N, C]`` of unscaled features ``[N, D]`` (this applies ``feature_scale``)."""
        x = np.asarray(features, dtype=np.float32) * np.float32(self.feature_scale)
        return x @ self.weights + self.biases

    @staticmethod
    def history_path(path: str | os.PathLike) -> Path:
        """Where :meth:`save` puts the training history beside the ``.npz``: ``<stem>.history.json``."""
        path = Path(path)
        return path.with_name(path.stem + ".history.json")

    def save(self, path: str | os.PathLike) -> None:
        """Write the arrays to ``path`` (``.npz``) and the history to :meth:`history_path`, each atomically."""
        path = Path(path)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        with open(tmp, "wb") as f:
            np.savez(f, format=np.array(FORMAT), weights=self.weights, biases=self.biases,
                     feature_scale=np.array(self.feature_scale, np.float64))  # fmt: skip
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        write_json_atomic(self.history_path(path), list(self.history))

    @classmethod
    def load(cls, path: str | os.PathLike) -> SVMModel:
        """Read a model written by :meth:`save`; raises :class:`UserError` if it is missing or malformed."""
        path = Path(path)
        try:
            with np.load(path, allow_pickle=False) as npz:
                arrays = {k: npz[k] for k in ("format", "weights", "biases", "feature_scale")}
            history = json.loads(cls.history_path(path).read_text())
        except FileNotFoundError as e:
            raise UserError(f"SVM model file missing: {e.filename}") from None
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as e:
            raise UserError(f"{path}: not a readable SVM model ({type(e).__name__}: {e})") from None
        if arrays["format"].shape != () or str(arrays["format"]) != FORMAT:
            raise UserError(f"{path}: not an SVM model of format {FORMAT}")
        if arrays["feature_scale"].shape != () or not (isinstance(history, list) and all(isinstance(h, list) for h in history)):
            raise UserError(f"{path}: malformed SVM model (feature_scale or history)")
        try:
            return cls(arrays["weights"], arrays["biases"], float(arrays["feature_scale"]), tuple(history))
        except (TypeError, ValueError) as e:
            raise UserError(f"{path}: malformed SVM model: {e}") from None


def train_class_svms(
    images: ImageSource,
    num_classes: int,
    params: SVMParams = SVMParams(),
    n_jobs: int = 1,
    scale: float | None = None,
    progress: bool = False,
    class_names: Sequence[str] | None = None,
) -> SVMModel:
    """Train one SVM per class with R-CNN's hard-negative mining (see :func:`mine_hard_negatives`).

    A first pass over ``images`` collects the positives and, unless ``scale`` is given, the
    feature scale (:func:`feature_scale` over all rows). The mining pass then runs in
    ``min(n_jobs, num_classes)`` joblib workers, each reading all images for its share of the
    classes; so ``images`` must be re-readable and picklable (a list, or a function that opens
    the feature file itself), and with ``n_jobs`` workers the features are read ``n_jobs`` times.
    The result does not depend on ``n_jobs``. ``class_names`` (``num_classes`` of them) name the
    classes in errors.
    """
    from tqdm import tqdm

    positives: list[list[np.ndarray]] = [[] for _ in range(num_classes)]
    total, count = 0.0, 0
    for img in tqdm(_iterate(images), desc="positives", unit="image", disable=None if progress else True):
        if img.overlaps.shape[1] != num_classes:
            raise UserError(f"images have overlaps for {img.overlaps.shape[1]} classes, expected {num_classes}")
        for c in np.unique(img.gt_classes[img.gt_classes >= 0]):
            positives[c].append(img.features[img.gt_classes == c])
        if scale is None:
            norms = _row_norms(img.features)
            total, count = total + float(norms.sum()), count + len(norms)
    if scale is None:
        if total == 0.0:
            raise UserError("no non-zero training features to compute the feature scale from")
        scale = params.target_norm / (total / count)
    empty = [c for c in range(num_classes) if not positives[c]]
    if empty:
        named = ", ".join(class_names[c] if class_names is not None else f"class {c}" for c in empty)
        raise UserError(f"{named}: no ground-truth box to train on")
    pos = {c: np.concatenate(p) * np.float32(scale) for c, p in enumerate(positives)}
    groups = np.array_split(np.arange(num_classes), min(joblib.effective_n_jobs(n_jobs), num_classes))
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=LOKY_RECYCLED, category=UserWarning)
        parts = joblib.Parallel(n_jobs=len(groups))(
            joblib.delayed(mine_hard_negatives)(images, {int(c): pos[c] for c in g}, params, scale, progress=progress and k == 0)
            for k, g in enumerate(groups)
        )
    svms = {c: svm for part in parts for c, svm in part.items()}
    weights = np.stack([svms[c].weight for c in range(num_classes)], axis=1)
    biases = np.array([svms[c].bias for c in range(num_classes)], np.float32)
    return SVMModel(weights, biases, float(scale), tuple(svms[c].history for c in range(num_classes)))
