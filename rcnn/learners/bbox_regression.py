"""Class-specific ridge bounding-box regressors on pool5 features, as in R-CNN (CVPR 2014, appendix C).

Training follows ``rcnn_train_bbox_regressor.m`` of the released R-CNN code; the model is plain arrays, saved as ``.npz``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from rcnn.errors import UserError
from rcnn.structures.box_coding import decode
from rcnn.structures.boxes import as_boxes

FORMAT = "rcnn.bbox_regressor"
FORMAT_VERSION = 1

# Added to the eigenvalues of the target covariance before the inverse square root,
# as rcnn_train_bbox_regressor.m does, so a near-constant target does not blow up.
WHITENING_EPS = 0.001


@dataclass(frozen=True)
class BBoxRegParams:
    """Box-regression settings; defaults are those of rcnn_train_bbox_regressor.m (R-CNN, CVPR 2014).

    Attributes:
        min_overlap: least IoU of a proposal with its ground truth to serve as a training
            example (R-CNN: 0.6; the paper notes lower-overlap pairs make the task hopeless).
        ridge_lambda: ridge penalty on the weights (R-CNN: 1000, chosen on a validation set).
        min_examples: classes with fewer usable examples keep an identity regressor (zero
            deltas) instead of a fit on a handful of points. Not in R-CNN, which assumed
            every VOC class had plenty.
    """

    min_overlap: float = 0.6
    ridge_lambda: float = 1000.0
    min_examples: int = 5


def mean_norm_scale(features: np.ndarray, target_norm: float = 20.0) -> float:
    """The scalar that makes the mean L2 norm of ``features [N, D]`` equal ``target_norm``.

    R-CNN (``rcnn_scale_features.m``) multiplies every feature by
    ``target_norm / mean_norm`` with ``target_norm = 20``, estimated on the training set;
    pass the result to :func:`rcnn.learners.bbox_training.train_bbox_regressors` as ``feature_scale``. Norms are
    computed in chunks, so no float64 copy of ``features`` is made.
    """
    features = np.asarray(features)
    if features.ndim != 2 or len(features) == 0:
        raise ValueError(f"features must have shape [N, D] with N > 0, got {features.shape}")
    total = 0.0
    for start in range(0, len(features), 4096):
        chunk = features[start : start + 4096].astype(np.float64)
        total += float(np.sqrt(np.einsum("ij,ij->i", chunk, chunk)).sum())
    mean_norm = total / len(features)
    if not np.isfinite(mean_norm) or mean_norm <= 0:
        raise ValueError(f"mean feature norm is {mean_norm}; cannot scale")
    return float(target_norm) / mean_norm


def fit_target_whitening(targets: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Centring and decorrelating transform of regression targets, as R-CNN computes it.

    With ``mu`` the mean of ``targets [M, 4]``, ``S = (Y - mu)^T (Y - mu) / M`` and
    ``S = V diag(D) V^T``: ``T = V diag(1 / sqrt(D + 0.001)) V^T`` and
    ``T_inv = V diag(sqrt(D + 0.001)) V^T`` (rcnn_train_bbox_regressor.m).

    Returns:
        float64 ``mean [4]``, ``transform [4, 4]`` and ``inverse [4, 4]`` for
        :func:`whiten_targets` and :func:`unwhiten_targets`.
    """
    y = np.asarray(targets, dtype=np.float64).reshape(-1, 4)
    if len(y) == 0:
        raise ValueError("cannot fit a whitening transform to zero targets")
    mean = y.mean(axis=0)
    centred = y - mean
    cov = centred.T @ centred / len(y)
    eigvals, eigvecs = np.linalg.eigh(cov)
    # eigh can return tiny negative eigenvalues for a rank-deficient covariance.
    eigvals = np.clip(eigvals, 0.0, None) + WHITENING_EPS
    transform = (eigvecs / np.sqrt(eigvals)) @ eigvecs.T
    inverse = (eigvecs * np.sqrt(eigvals)) @ eigvecs.T
    return mean, transform, inverse


def whiten_targets(targets: np.ndarray, mean: np.ndarray, transform: np.ndarray) -> np.ndarray:
    """``(targets [M, 4] - mean) @ transform`` in float64: the space the ridge regressors are fit in."""
    return (np.asarray(targets, dtype=np.float64).reshape(-1, 4) - mean) @ transform


def unwhiten_targets(whitened: np.ndarray, mean: np.ndarray, inverse: np.ndarray) -> np.ndarray:
    """``whitened [M, 4] @ inverse + mean`` in float64: undoes :func:`whiten_targets`."""
    return np.asarray(whitened, dtype=np.float64).reshape(-1, 4) @ inverse + mean


def select_examples(classes: np.ndarray, overlaps: np.ndarray, class_index: int, min_overlap: float) -> np.ndarray:
    """Indices (int64) of rows whose matched ground truth is of ``class_index`` with IoU >= ``min_overlap``.

    R-CNN's final filter was a strict ``O > min_overlap`` (its cache builder used
    ``>=``); the two differ only for an IoU of exactly the threshold.
    """
    classes = np.asarray(classes).reshape(-1)
    overlaps = np.asarray(overlaps).reshape(-1)
    return np.flatnonzero((classes == class_index) & (overlaps >= min_overlap)).astype(np.int64)


_ARRAYS = {
    # name: (dtype, shape as a function of (num_classes, feature_dim))
    "coef": (np.float32, lambda c, d: (c, 4, d)),
    "intercept": (np.float32, lambda c, d: (c, 4)),
    "target_mean": (np.float64, lambda c, d: (c, 4)),
    "target_transform": (np.float64, lambda c, d: (c, 4, 4)),
    "target_inverse": (np.float64, lambda c, d: (c, 4, 4)),
    "num_examples": (np.int64, lambda c, d: (c,)),
    "trained": (np.bool_, lambda c, d: (c,)),
}


@dataclass(frozen=True, eq=False)
class BBoxRegressor:
    """One ridge regressor per class, predicting R-CNN deltas (:mod:`rcnn.structures.box_coding`) from features.

    For class ``c`` and features ``x [D]``: whitened deltas
    ``z = feature_scale * x @ coef[c].T + intercept[c]``, then
    ``deltas = z @ target_inverse[c] + target_mean[c]``, then boxes by
    :func:`rcnn.structures.box_coding.decode`. A class with ``trained[c] == False`` has zero
    weights, zero mean and identity transforms, so its deltas are exactly zero.

    Attributes:
        coef: float32 ``[C, 4, D]`` ridge weights in whitened target space.
        intercept: float32 ``[C, 4]`` ridge biases.
        target_mean: float64 ``[C, 4]`` mean training deltas per class.
        target_transform: float64 ``[C, 4, 4]`` whitening ``T`` per class.
        target_inverse: float64 ``[C, 4, 4]`` its inverse ``T_inv``.
        num_examples: int64 ``[C]`` training examples seen per class.
        trained: bool ``[C]``; False where the class kept the identity regressor.
        feature_scale: scalar applied to raw features, fixed at training time.
        params: the settings it was trained with.
    """

    coef: np.ndarray
    intercept: np.ndarray
    target_mean: np.ndarray
    target_transform: np.ndarray
    target_inverse: np.ndarray
    num_examples: np.ndarray
    trained: np.ndarray
    feature_scale: float
    params: BBoxRegParams = BBoxRegParams()

    def __post_init__(self) -> None:
        coef = np.asarray(self.coef)
        if coef.ndim != 3 or coef.shape[1] != 4:
            raise ValueError(f"coef must have shape [C, 4, D], got {coef.shape}")
        c, _, d = coef.shape
        for name, (dtype, shape) in _ARRAYS.items():
            arr = np.asarray(getattr(self, name))
            if arr.dtype != dtype or arr.shape != shape(c, d):
                raise ValueError(f"{name} must be {np.dtype(dtype).name} {shape(c, d)}, got {arr.dtype.name} {arr.shape}")
            if arr.dtype.kind == "f" and not np.isfinite(arr).all():
                raise ValueError(f"{name} contains non-finite values")
            # Frozen means frozen: a shared model must not be edited through its arrays.
            arr = arr.view()
            arr.flags.writeable = False
            object.__setattr__(self, name, arr)
        scale = float(self.feature_scale)
        if not np.isfinite(scale) or scale <= 0:
            raise ValueError(f"feature_scale must be a positive finite number, got {self.feature_scale}")
        object.__setattr__(self, "feature_scale", scale)

    @property
    def num_classes(self) -> int:
        return int(self.coef.shape[0])

    @property
    def feature_dim(self) -> int:
        return int(self.coef.shape[2])

    @classmethod
    def identity(
        cls, num_classes: int, feature_dim: int, feature_scale: float = 1.0, params: BBoxRegParams | None = None
    ) -> BBoxRegressor:
        """A regressor that leaves every box where it is (all classes untrained)."""
        eye = np.broadcast_to(np.eye(4), (num_classes, 4, 4)).copy()
        return cls(
            coef=np.zeros((num_classes, 4, feature_dim), np.float32),
            intercept=np.zeros((num_classes, 4), np.float32),
            target_mean=np.zeros((num_classes, 4), np.float64),
            target_transform=eye,
            target_inverse=eye.copy(),
            num_examples=np.zeros(num_classes, np.int64),
            trained=np.zeros(num_classes, bool),
            feature_scale=feature_scale,
            params=params or BBoxRegParams(),
        )

    def _check_features(self, features: np.ndarray) -> np.ndarray:
        features = np.asarray(features)
        if features.dtype not in (np.float32, np.float64):
            features = features.astype(np.float32)
        if features.ndim != 2 or features.shape[1] != self.feature_dim:
            raise ValueError(f"features must have shape [N, {self.feature_dim}], got {features.shape}")
        return features

    def _class_deltas(self, features: np.ndarray, c: int) -> np.ndarray:
        if not self.trained[c]:
            return np.zeros((len(features), 4), np.float64)
        # Scaling the [N, 4] product instead of the [N, D] input avoids copying features.
        z = (features @ self.coef[c].T).astype(np.float64) * self.feature_scale + self.intercept[c]
        return unwhiten_targets(z, self.target_mean[c], self.target_inverse[c])

    def predict_deltas(self, features: np.ndarray, class_index: int | np.ndarray) -> np.ndarray:
        """float64 ``[N, 4]`` deltas ``(tx, ty, tw, th)`` for ``features [N, D]`` (raw, unscaled).

        ``class_index`` is one class for every row, or int ``[N]`` labels, one per row.
        """
        features = self._check_features(features)
        labels = np.asarray(class_index)
        if labels.ndim == 0:
            labels = np.full(len(features), int(labels), np.int64)
        labels = labels.reshape(-1)
        if labels.dtype.kind not in "iu":
            raise ValueError(f"class_index must be an int or integer labels, got dtype {labels.dtype}")
        if len(labels) != len(features):
            raise ValueError(f"got {len(features)} feature rows but {len(labels)} labels")
        if len(labels) and (labels.min() < 0 or labels.max() >= self.num_classes):
            raise ValueError(f"class indices must lie in [0, {self.num_classes}), got {labels.min()}..{labels.max()}")
        deltas = np.zeros((len(features), 4), np.float64)
        for c in np.unique(labels):
            rows = np.flatnonzero(labels == c)
            sub = features if len(rows) == len(features) else features[rows]
            deltas[rows] = self._class_deltas(sub, int(c))
        return deltas

    def predict(self, features: np.ndarray, proposals: np.ndarray, class_index: int | np.ndarray) -> np.ndarray:
        """Refined boxes for ``proposals``.

        Args:
            features: ``[N, D]`` raw features of the proposals (the same layer and
                preprocessing as at training; ``feature_scale`` is applied here).
            proposals: ``[N, 4]`` in ``(x1, y1, x2, y2)``, continuous pixel coordinates,
                width and height > 0.
            class_index: one class for all rows, or int ``[N]`` labels, one per row.

        Returns:
            float32 ``[N, 4]`` boxes ``(x1, y1, x2, y2)``, not clipped to the image.
        """
        proposals = as_boxes(proposals)
        deltas = self.predict_deltas(features, class_index)
        if len(deltas) != len(proposals):
            raise ValueError(f"got {len(deltas)} feature rows but {len(proposals)} proposals")
        return decode(proposals, deltas)

    def save(self, path: str | os.PathLike) -> None:
        """Write the model to ``path`` as an uncompressed ``.npz`` (no pickle), atomically."""
        path = Path(path)
        arrays = {name: np.asarray(getattr(self, name)) for name in _ARRAYS}
        tmp = path.with_name(path.name + ".tmp")
        with open(tmp, "wb") as f:
            np.savez(
                f,
                format=np.array(FORMAT),
                format_version=np.array(FORMAT_VERSION, np.int64),
                feature_scale=np.array(self.feature_scale, np.float64),
                min_overlap=np.array(self.params.min_overlap, np.float64),
                ridge_lambda=np.array(self.params.ridge_lambda, np.float64),
                min_examples=np.array(self.params.min_examples, np.int64),
                **arrays,
            )
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: str | os.PathLike, num_classes: int | None = None, feature_dim: int | None = None) -> BBoxRegressor:
        """Read a model written by :meth:`save`, optionally checking its class count and feature size.

        Raises:
            UserError: if the file is missing, not an ``.npz``, of another format or
                version, holds arrays of the wrong dtype, shape or value, or does not
                have the expected ``num_classes`` / ``feature_dim``.
        """
        path = Path(path)
        try:
            # Opened here, not by np.load, which leaks its handle when the zip is corrupt.
            with open(path, "rb") as f, np.load(f, allow_pickle=False) as npz:
                data = {name: npz[name] for name in npz.files}
        except FileNotFoundError as e:
            raise UserError(f"box regressor file not found: {path}") from e
        except Exception as e:  # zipfile, pickle refusal, truncated data: all mean "not our file"
            raise UserError(f"cannot read box regressor {path}: {e}") from e
        try:
            fmt = data.get("format")
            if fmt is None or fmt.shape != () or fmt.dtype.kind != "U" or str(fmt) != FORMAT:
                raise ValueError(f"not a {FORMAT} file")
            version = data.get("format_version")
            if version is None or version.shape != () or version.dtype != np.int64 or int(version) != FORMAT_VERSION:
                raise ValueError(f"unsupported format version {version}, expected {FORMAT_VERSION}")
            scalars = {
                "feature_scale": np.float64,
                "min_overlap": np.float64,
                "ridge_lambda": np.float64,
                "min_examples": np.int64,
            }
            for name, dtype in scalars.items():
                if name not in data or data[name].shape != () or data[name].dtype != dtype:
                    raise ValueError(f"{name} missing or not a {np.dtype(dtype).name} scalar")
            missing = [name for name in _ARRAYS if name not in data]
            if missing:
                raise ValueError(f"missing arrays: {', '.join(missing)}")
            unexpected = set(data) - set(_ARRAYS) - set(scalars) - {"format", "format_version"}
            if unexpected:
                raise ValueError(f"unexpected arrays: {', '.join(sorted(unexpected))}")
            params = BBoxRegParams(
                min_overlap=float(data["min_overlap"]),
                ridge_lambda=float(data["ridge_lambda"]),
                min_examples=int(data["min_examples"]),
            )
            model = cls(**{name: data[name] for name in _ARRAYS}, feature_scale=float(data["feature_scale"]), params=params)
            if (model.num_examples < 0).any():
                raise ValueError("negative example counts")
        except ValueError as e:
            raise UserError(f"corrupt box regressor {path}: {e}") from e
        if num_classes is not None and model.num_classes != num_classes:
            raise UserError(f"box regressor {path} has {model.num_classes} classes, expected {num_classes}")
        if feature_dim is not None and model.feature_dim != feature_dim:
            raise UserError(f"box regressor {path} has feature_dim {model.feature_dim}, expected {feature_dim}")
        return model
