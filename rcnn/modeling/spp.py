"""SPP-net's spatial pyramid pooling for detection: windows mapped onto a conv feature map, pooled into a pyramid.

He, Zhang, Ren, Sun, "Spatial Pyramid Pooling in Deep Convolutional Networks for Visual Recognition", ECCV 2014.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import nn
from torchvision.ops import roi_pool

from rcnn.modeling.spp_geometry import map_windows
from rcnn.modeling.transfer import to_device

#: The paper's 4-level pyramid for detection, {6x6, 3x3, 2x2, 1x1}: 50 bins (12,800-d on 256 conv5 channels).
PYRAMID_LEVELS: tuple[int, ...] = (6, 3, 2, 1)
#: How each level's ``n x n x C`` maxima are flattened: ``"channels"``, channel-major ``(C, n, n)`` as
#: Caffe flattens a blob (SPP-net's own layout); ``"bins"``, bin-major ``(n, n, C)``, each bin's channels
#: side by side, as the table method computes them (no transpose: faster).
LAYOUTS = ("channels", "bins")


# ----------------------------------------------------------------------------- window mapping


# ----------------------------------------------------------------------------- pyramid pooling


def bins_order(channels: int, levels: Sequence[int] = PYRAMID_LEVELS) -> torch.Tensor:
    """Positions in a ``"channels"`` pyramid vector of each entry of the ``"bins"`` one.

    ``bins = channels_vec[..., order]`` converts a pooled vector, and ``weight[:, order]`` the weights of
    a layer reading it (``W x`` is unchanged).
    """
    parts, start = [], 0
    for n in _check_levels(levels):
        parts.append(start + torch.arange(channels * n * n).view(channels, n, n).permute(1, 2, 0).reshape(-1))
        start += channels * n * n
    return torch.cat(parts)


def spp_dim(channels: int, levels: Sequence[int] = PYRAMID_LEVELS) -> int:
    """Length of a pooled window's feature: ``channels * sum(n * n for n in levels)``."""
    return channels * sum(n * n for n in _check_levels(levels))


def _check_levels(levels: Sequence[int]) -> tuple[int, ...]:
    levels = tuple(int(n) for n in levels)
    if not levels or min(levels) < 1:
        raise ValueError(f"pyramid levels must be a non-empty sequence of positive ints, got {levels}")
    return levels


def _roi_pool_inexact(rects: np.ndarray, n: int, dtype: torch.dtype) -> np.ndarray:
    """bool ``[N]``: windows where ``roi_pool``'s floating-point bins differ from the integer ones.

    ``roi_pool`` computes bin ``i`` of ``n`` over ``h`` cells as ``floor(i * (h / n))`` to
    ``ceil((i + 1) * (h / n))`` in the input's dtype. Rounding in ``h / n`` can push the last bin one
    cell past the window (e.g. n = 7, h = 57 in float32); this repeats that arithmetic to find where.
    For n in 1..6 it cannot happen below three million cells (checked exhaustively), so the paper's
    levels always take the fast path.
    """
    real = np.float64 if dtype == torch.float64 else np.float32  # on the host: IEEE arithmetic, as the kernel's
    sizes = (rects[:, 2:] - rects[:, :2] + 1).reshape(-1, 1)  # [2N, 1]: widths and heights
    i = np.arange(n)
    bin_size = sizes.astype(real) / real(n)
    start = np.floor(i.astype(real) * bin_size).astype(np.int64)
    end = np.ceil((i + 1).astype(real) * bin_size).astype(np.int64)
    exact_start = i * sizes // n
    exact_end = -(-(i + 1) * sizes // n)
    wrong = (start != exact_start) | (end != exact_end)
    return wrong.reshape(-1, 2 * n).any(axis=1)


def spp_pool(
    feature_map: torch.Tensor,
    rects,
    levels: Sequence[int] = PYRAMID_LEVELS,
    batch_index=None,
    algorithm: str = "auto",
    out: torch.Tensor | None = None,
    layout: str = "channels",
) -> torch.Tensor:
    """Max-pool each cell rectangle of a feature map into an ``n x n`` grid per pyramid level.

    For a rectangle ``h`` cells tall, bin ``i`` of ``n`` spans rows ``[floor(i h / n), ceil((i+1) h / n))``
    counted from its top (columns likewise), the SPP / RoI-pooling convention; bins overlap by a cell
    where ``n`` does not divide ``h`` and repeat cells when ``h < n``.

    Two algorithms give identical results (max is exact in any order):

    - ``"table"``: 2-D sparse tables of the map (the max over every ``2^a x 2^b`` block) answer
      each bin with four lookups; a level that divides a finer one (3, 2 and 1 divide 6) is the max
      over that level's bins, which tile it exactly. 7x to 19x faster than ``"roi_pool"`` on a CPU for
      the paper's levels, the most on float16 maps (``benchmarks/bench_spp_pool.py``).
    - ``"roi_pool"``: :func:`torchvision.ops.roi_pool` per level (``spatial_scale=1``, which treats box
      corners as inclusive cell indices); the rare windows where its floating-point bin edges are off
      by a cell (only for levels above 6) are pooled with
      :func:`torch.nn.functional.adaptive_max_pool2d` instead. The reference the table is tested against.

    Args:
        feature_map: ``[C, H, W]`` or ``[B, C, H, W]``. Half and bfloat16 maps are pooled in their own
            dtype by the table algorithm (max is exact, and fewer bytes are faster), in float32 by
            ``roi_pool``, and returned in their own dtype. Several maps of different sizes can be
            pooled in one call by zero-padding them to a common size: rectangles never reach the padding.
        rects: int64 ``[N, 4]`` inclusive cell rectangles ``(x1, y1, x2, y2)`` inside the map, as
            returned by :func:`map_windows` (numpy array or tensor).
        levels: pyramid levels ``n``, each giving ``n x n`` bins; the paper's ``(6, 3, 2, 1)`` by default.
        batch_index: int64 ``[N]``, the map of ``[B, C, H, W]`` each rectangle belongs to (default: map 0).
        algorithm: ``"table"``, ``"roi_pool"`` or ``"auto"`` (the default): the table when there are at
            least 4 windows per map, else ``roi_pool``.
        out: optional ``[N, C * sum(n^2)]`` tensor (any float dtype, rows contiguous) to write the
            result into and return, saving a copy when the caller gathers several calls' results.
        layout: how each level is flattened (:data:`LAYOUTS`): ``"channels"`` (the default, SPP-net's
            Caffe order) or ``"bins"`` (each bin's channels together; skips the table algorithm's
            transpose, which is a fifth of its time on the demo). :func:`bins_order` converts.

    Returns:
        ``[N, C * sum(n^2)]``: the levels in the given order, each flattened ``(C, n, n)`` (or
        ``(n, n, C)`` for ``layout="bins"``), on the feature map's device and in its dtype.
    """
    levels = _check_levels(levels)
    if algorithm not in ("auto", "table", "roi_pool"):
        raise ValueError(f"algorithm must be 'auto', 'table' or 'roi_pool', got {algorithm!r}")
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    fmap = feature_map if feature_map.dim() == 4 else feature_map.unsqueeze(0)
    if fmap.dim() != 4:
        raise ValueError(f"feature_map must be [C, H, W] or [B, C, H, W], got {tuple(feature_map.shape)}")
    out_dtype = fmap.dtype
    _, channels, height, width = fmap.shape
    # Checked and planned on the host (numpy): on a GPU each look at a device value waits for its queue.
    rects = _host_int64(rects).reshape(-1, 4)
    if out is not None and tuple(out.shape) != (len(rects), spp_dim(channels, levels)):
        raise ValueError(f"out must be [{len(rects)}, {spp_dim(channels, levels)}], got {tuple(out.shape)}")
    if len(rects) == 0:
        return out if out is not None else fmap.new_zeros((0, spp_dim(channels, levels)), dtype=out_dtype)
    x1, y1, x2, y2 = rects.T
    if ((x1 < 0) | (y1 < 0) | (x2 >= width) | (y2 >= height) | (x2 < x1) | (y2 < y1)).any():
        raise ValueError(f"rects must be inclusive cell rectangles inside the {height} x {width} feature map")
    batch_index = np.zeros(len(rects), np.int64) if batch_index is None else _host_int64(batch_index).reshape(-1)
    if len(batch_index) != len(rects) or ((batch_index < 0) | (batch_index >= fmap.shape[0])).any():
        raise ValueError(f"batch_index must hold one map index in [0, {fmap.shape[0]}) per rectangle")
    derive = algorithm == "auto"  # an explicit "roi_pool" pools every level itself: the reference
    if algorithm == "auto":
        algorithm = "table" if len(rects) >= 4 * fmap.shape[0] else "roi_pool"
    if algorithm == "roi_pool" or (fmap.requires_grad and torch.is_grad_enabled()):
        pooled = _roi_pool_levels(fmap, rects, batch_index, levels, layout, derive)
    else:
        pooled = _table_pool_levels(fmap, rects, levels, batch_index, layout, out)
    if out is None:
        return pooled.to(out_dtype)
    return out if pooled is out else out.copy_(pooled)


def roi_pool_by_table(fmap: torch.Tensor, rois: torch.Tensor, output_size: int, spatial_scale: float) -> torch.Tensor:
    """``torchvision.ops.roi_pool(fmap, rois, (n, n), spatial_scale)``, ``[K, C, n, n]``, the same numbers, from
    :func:`spp_pool`'s table where it gives them: float32 maps without gradients, at least 4 RoIs per map, and
    RoIs whose cell rectangles (``roi_pool`` rounds ``coordinate * spatial_scale`` half away from zero, and a box
    under one cell gets one) have every bin at least partly on the map (bins past its far borders cut there, as
    ``roi_pool`` cuts them) with the bin edges ``roi_pool``'s floating-point arithmetic gives (every one for ``n``
    up to 6). The other RoIs go to ``roi_pool`` itself, and so does everything else. ``rois``: ``[K, 5]``, map
    index first, as ``roi_pool``'s."""
    n = int(output_size)
    if fmap.dtype != torch.float32 or (fmap.requires_grad and torch.is_grad_enabled()) or len(rois) < 4 * len(fmap):
        return roi_pool(fmap, rois.to(fmap.dtype), (n, n), spatial_scale)
    r = rois.detach().to("cpu", torch.float32).numpy().reshape(-1, 5)
    scaled = (r[:, 1:] * np.float32(spatial_scale)).astype(np.float64)  # the kernel's float32 product
    cells = (np.sign(scaled) * np.floor(np.abs(scaled) + 0.5)).astype(np.int64)  # C's round()
    cells[:, 2:] = np.maximum(cells[:, 2:], cells[:, :2])  # roi_pool: at least one cell wide and tall
    batch = r[:, 0].astype(np.int64)
    height, width = fmap.shape[-2:]
    # Past the far borders (a box at the image's edge, where the map was rounded down) the bins are cut there,
    # as roi_pool cuts them; a RoI with a bin wholly outside (roi_pool: zeros) goes to roi_pool.
    last_bin = cells[:, :2] + (n - 1) * (cells[:, 2:] - cells[:, :2] + 1) // n
    table = (cells[:, :2] >= 0).all(1) & (last_bin[:, 0] < width) & (last_bin[:, 1] < height)
    table &= ~_roi_pool_inexact(cells, n, torch.float32) & (batch >= 0) & (batch < len(fmap))
    by_table, rest = np.flatnonzero(table), np.flatnonzero(~table)
    out = fmap.new_empty((len(r), fmap.shape[1], n, n))
    if len(by_table):
        pooled = _table_pool_levels(fmap, cells[by_table], (n,), batch[by_table])
        out.index_copy_(0, to_device(by_table, fmap.device), pooled.view(-1, fmap.shape[1], n, n))
    if len(rest):
        clipped = roi_pool(fmap, rois[to_device(rest, rois.device)].to(fmap.dtype), (n, n), spatial_scale)
        out.index_copy_(0, to_device(rest, fmap.device), clipped)
    return out


def _coarser_sources(levels: tuple[int, ...]) -> dict[int, int | None]:
    """For each level, the smallest finer level it divides (its bins are unions of that level's), or None.

    Bin i of m over h cells equals the union of bins k i .. k i + k - 1 of n = k m: floor(k i h / n)
    = floor(i h / m), and likewise the ceilings.
    """
    return {m: min((n for n in levels if n > m and n % m == 0), default=None) for m in set(levels)}


def _host_int64(x) -> np.ndarray:
    """int64 numpy of an array or tensor (a tensor's values truncated toward zero, as ``Tensor.long``)."""
    return (x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)).astype(np.int64, copy=False)


def _roi_pool_levels(
    fmap: torch.Tensor,
    rects: np.ndarray,
    batch_index: np.ndarray,
    levels: tuple[int, ...],
    layout: str = "channels",
    derive: bool = False,
) -> torch.Tensor:
    """``roi_pool`` per level; with ``derive``, only the levels no finer one tiles, the rest as maxima
    over their bins (3, 2 and 1 from 6: a quarter of the work for the paper's pyramid)."""
    if fmap.dtype not in (torch.float32, torch.float64):
        fmap = fmap.float()  # roi_pool's CPU kernel has no half precision; the result is exact either way
    rois = to_device(np.concatenate([batch_index[:, None], rects], axis=1), fmap.device).to(fmap.dtype)
    source = _coarser_sources(levels) if derive else dict.fromkeys(levels)
    pooled: dict[int, torch.Tensor] = {}  # [N, C, n, n]
    for n in sorted(source, reverse=True):
        if source[n] is not None:
            pooled[n] = _coarsen(pooled[source[n]].permute(0, 2, 3, 1).contiguous(), n).permute(0, 3, 1, 2)
            continue
        out = roi_pool(fmap, rois, (n, n), spatial_scale=1.0)
        inexact = np.flatnonzero(_roi_pool_inexact(rects, n, fmap.dtype))
        if len(inexact):
            exact = torch.stack(
                [
                    nn.functional.adaptive_max_pool2d(fmap[b, :, r[1] : r[3] + 1, r[0] : r[2] + 1], n)
                    for b, r in zip(batch_index[inexact].tolist(), rects[inexact].tolist())
                ]
            )
            out = out.index_copy(0, to_device(inexact, fmap.device), exact)
        pooled[n] = out
    return torch.cat([(pooled[n].permute(0, 2, 3, 1) if layout == "bins" else pooled[n]).flatten(1) for n in levels], dim=1)


#: Rows of map cells gathered per chunk by the table method (bounds its temporary memory).
_TABLE_CHUNK_VALUES = 1 << 24
#: Above this many table values (in the map's dtype) the table method falls back to ``roi_pool``.
_TABLE_MAX_VALUES = 1 << 28


def _bin_edges(lo: np.ndarray, hi: np.ndarray, n: int, cells: int) -> tuple[np.ndarray, np.ndarray]:
    """First and last (inclusive) cell of each of ``n`` bins over ``[lo, hi]``, the last cut at the map's ``cells``:
    int64 ``[N, n]`` each."""
    size = (hi - lo + 1)[:, None]
    i = np.arange(n)
    first = lo[:, None] + i * size // n
    last = np.minimum(lo[:, None] + (-(-(i + 1) * size // n)) - 1, cells - 1)
    return first, last


def _floor_log2(x: np.ndarray) -> np.ndarray:
    """``floor(log2(x))`` of positive int64 ``x`` below 2^53, exactly: ``x = m 2^e`` with ``0.5 <= m < 1``."""
    return np.frexp(x.astype(np.float64))[1].astype(np.int64) - 1


def _table_pool_levels(
    fmap: torch.Tensor,
    rects: np.ndarray,
    levels: tuple[int, ...],
    batch_index: np.ndarray,
    layout: str = "channels",
    into: torch.Tensor | None = None,
) -> torch.Tensor:
    """Rectangles may reach past the map's far borders: each bin is cut at the border, as ``roi_pool`` cuts it
    (callers leave out rectangles with a bin wholly outside; :func:`spp_pool`'s are inside the map)."""
    batch, channels, height, width = fmap.shape
    source = _coarser_sources(levels)  # a level that divides a finer one is derived from it
    direct = sorted(m for m, n in source.items() if n is None)
    # The bookkeeping (bins, block sizes, row numbers) is small integer arithmetic: numpy on the host
    # does it several times faster than a chain of tiny tensor operations; the table and the lookups
    # stay on the map's device.
    x1, y1, x2, y2 = rects.T
    owner = batch_index
    edges = {n: (_bin_edges(y1, y2, n, height), _bin_edges(x1, x2, n, width)) for n in direct}
    log_h = {n: _floor_log2(e[0][1] - e[0][0] + 1) for n, e in edges.items()}
    log_w = {n: _floor_log2(e[1][1] - e[1][0] + 1) for n, e in edges.items()}
    rows = max(int(v.max()) for v in log_h.values()) + 1
    cols = max(int(v.max()) for v in log_w.values()) + 1
    if rows * cols * fmap.numel() > _TABLE_MAX_VALUES:
        return _roi_pool_levels(fmap, rects, batch_index, levels, layout)
    # table[b, a, i, y, x] = max of map i over rows y .. y + 2^a - 1 and columns x .. x + 2^b - 1, channels
    # last so each lookup is one contiguous row. Entries where that block does not fit the map are never
    # read: the row steps leave them uninitialised, and the column steps (one call for every a at once)
    # fill them with maxima of whatever is there.
    table = fmap.new_empty((cols, rows, batch, height, width, channels))
    table[0, 0] = fmap.permute(0, 2, 3, 1)
    for a in range(1, rows):
        fit_h, d = height - (1 << a) + 1, 1 << (a - 1)
        torch.maximum(table[0, a - 1, :, :fit_h], table[0, a - 1, :, d : d + fit_h], out=table[0, a, :, :fit_h])
    for b in range(1, cols):
        fit_w, d = width - (1 << b) + 1, 1 << (b - 1)
        torch.maximum(table[b - 1, :, :, :, :fit_w], table[b - 1, :, :, :, d : d + fit_w], out=table[b, :, :, :, :fit_w])
    flat = table.view(-1, channels)
    pooled: dict[int, torch.Tensor] = {}
    chunk = max(1, _TABLE_CHUNK_VALUES // (channels * max(n * n for n in direct)))
    for n in direct:
        (top, bottom), (left, right) = edges[n]
        a, b = log_h[n], log_w[n]
        parts = []
        for s in range(0, len(rects), chunk):
            sl = slice(s, s + chunk)
            # Each bin is the max of four blocks of 2^a x 2^b cells at its corners (overlapping where
            # the bin is not that size); a corner at a time keeps the gathered rows in cache.
            base = ((b[sl][:, None, :] * rows + a[sl][:, :, None]) * batch + owner[sl][:, None, None]) * height
            y_first, y_last = top[sl][:, :, None], (bottom[sl] - (1 << a[sl]) + 1)[:, :, None]
            x_first, x_last = left[sl][:, None, :], (right[sl] - (1 << b[sl]) + 1)[:, None, :]
            corners = ((y_first, x_first), (y_last, x_first), (y_first, x_last), (y_last, x_last))
            index = to_device(np.stack([(base + yy) * width + xx for yy, xx in corners]).reshape(4, -1), fmap.device)
            out = flat.index_select(0, index[0])
            for k in range(1, 4):
                torch.maximum(out, flat.index_select(0, index[k]), out=out)
            parts.append(out.view(-1, n, n, channels))
        pooled[n] = parts[0] if len(parts) == 1 else torch.cat(parts)
    for m in sorted(source, reverse=True):
        if m not in pooled:
            pooled[m] = _coarsen(pooled[source[m]], m)
    # Each level flattened in the layout asked for, written straight into its columns of the result.
    result = into if into is not None else fmap.new_empty((len(rects), channels * sum(n * n for n in levels)))
    start = 0
    for n in levels:
        block = result[:, start : start + channels * n * n]
        if layout == "bins":
            block.view(len(rects), n, n, channels).copy_(pooled[n])
        else:
            block.view(len(rects), channels, n, n).copy_(pooled[n].permute(0, 3, 1, 2))
        start += channels * n * n
    return result


def _coarsen(fine: torch.Tensor, m: int) -> torch.Tensor:
    """``[N, m, m, C]`` maxima over ``k x k`` groups of the ``[N, n, n, C]`` bins, ``n = k m``."""
    count, n, _, channels = fine.shape
    k = n // m
    grouped = fine.view(count, m, k, n, channels)
    rows = grouped[:, :, 0]
    for j in range(1, k):
        rows = torch.maximum(rows, grouped[:, :, j])
    grouped = rows.view(count, m, m, k, channels)
    out = grouped[:, :, :, 0]
    for j in range(1, k):
        out = torch.maximum(out, grouped[:, :, :, j])
    return out


# ----------------------------------------------------------------------------- scales


# ----------------------------------------------------------------------------- convenience


def spp_features(
    trunk: nn.Module,
    image: torch.Tensor,
    boxes_scaled,
    stride: int,
    levels: Sequence[int] = PYRAMID_LEVELS,
    offset: float = 0.0,
) -> torch.Tensor:
    """Run ``trunk`` once on one image and pyramid-pool every window from its feature map.

    Args:
        trunk: image ``[1, 3, H, W]`` -> feature map ``[1, C, H', W']`` (:attr:`DetectorNet.trunk`).
        image: normalised RGB ``[3, H, W]``, already resized to one scale.
        boxes_scaled: ``[N, 4]`` windows in ``(x1, y1, x2, y2)`` continuous pixel coordinates of the
            resized image.
        stride: the trunk's total stride.
        levels: pyramid levels (the paper's ``(6, 3, 2, 1)`` by default).
        offset: the trunk's receptive-field offset (:func:`map_windows`).

    Returns:
        ``[N, C * sum(n^2)]``. Gradients flow unless the caller wraps this in ``torch.no_grad()``.
    """
    fmap = trunk(image.unsqueeze(0))
    rects = map_windows(boxes_scaled, stride, fmap.shape[-2], fmap.shape[-1], offset)
    return spp_pool(fmap, rects, levels)
