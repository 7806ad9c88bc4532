"""Per-class training on the cluster: one task per class, results joined in class order."""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator

import numpy as np


@contextlib.contextmanager
def joblib_on_cluster(session) -> Iterator[None]:
    """Inside, ``joblib.Parallel`` sends its calls to the cluster (joblib's Dask backend, through ``session``'s
    client): the SVMs' one-class mining tasks then run one per worker thread."""
    import joblib

    with session.client.as_current(), joblib.parallel_config(backend="dask"):
        yield


def fit_per_class(session, label: str, fit, rows: dict[str, np.ndarray], num_classes: int, **settings):
    """``fit(**rows, num_classes=..., **settings)`` (a learner fitting each class on its own rows, such as
    :func:`rcnn.learners.bbox_regression.train_bbox_regressors`) as one task per class, each sent only the rows
    whose ``classes`` is its class; class ``c`` of the result is class ``c`` of task ``c``, so the model is the
    one a single call on all rows returns. Every per-class array field (first axis ``num_classes``) is joined."""
    futures = []
    for c in range(num_classes):
        keep = rows["classes"] == c
        mine = {k: v[keep] for k, v in rows.items()}
        futures.append(session.client.submit(fit, **mine, num_classes=num_classes, **settings, pure=False))
    session.note(label, len(futures), 0)
    models = session.client.gather(futures)
    joined = {}
    for field in dataclasses.fields(models[0]):
        value = getattr(models[0], field.name)
        if isinstance(value, np.ndarray) and value.shape[:1] == (num_classes,):
            joined[field.name] = np.stack([getattr(m, field.name)[c] for c, m in enumerate(models)])
    return dataclasses.replace(models[0], **joined)
