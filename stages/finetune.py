"""Stage `finetune`: train the CNN as an N+1-way classifier of regions (R-CNN section 2.3; SPP-net).

Regions are the trainval proposals plus ground-truth boxes; a region is its best
ground truth's class at IoU >= ``fg_threshold``, background at IoU in
``[bg_low, fg_threshold)``. Mini-batches of 128 hold 32 foreground regions. R-CNN
trains the whole network on warped crops; SPP-net trains only fc6, fc7 and the
classifier, on windows pooled from the cached conv maps (the trunk stays fixed).
A share of the trainval images is held out to report validation accuracy every
``eval_every`` iterations, when a checkpoint is also written: a killed run resumes
from its last checkpoint.
"""

from __future__ import annotations

import json
import time
from collections import OrderedDict
from pathlib import Path

import cv2
import numpy as np
import torch
from torch import nn

from rcnn.config import fingerprint_params
from rcnn.data.datasets import ImageAnnotation, load_image
from rcnn.errors import UserError
from rcnn.modeling.models import DetectorNet, device_for, device_label, initialise, normalise_crops, save_checkpoint
from rcnn.modeling.warp import warp_regions
from rcnn.store.artifacts import write_json_atomic
from rcnn.training.regions import finetune_labels, image_regions
from rcnn.training.sampling import FgBgSampler

from . import convmaps, proposals
from .context import Context
from .methods import build_method
from .provenance import upstream_check, upstream_digest
from .runner import progress_bar

NAME = "finetune"
SCHEMA_VERSION = 1
MODEL = "model.pt"
VAL_REGIONS = 2048  # fixed validation set size: enough for +-1 % accuracy


def splits(ctx: Context) -> tuple[str, ...]:
    return (ctx.cfg.data.trainval,)


def params(ctx: Context) -> dict:
    method = build_method(ctx.cfg)
    return {
        "method": method.name,
        "model": fingerprint_params(ctx.cfg.model),
        "finetune": fingerprint_params(ctx.cfg.finetune),
        "classes": list(ctx.classes),
        "use_difficult": ctx.cfg.data.use_difficult,
        **method.finetune_params(ctx),
    }


def inputs(ctx: Context, split: str) -> dict[str, str]:
    return {
        f"data/{split}": ctx.dataset(split).fingerprint,
        f"proposals/{split}": upstream_digest(ctx, "proposals", split),
        **build_method(ctx.cfg).upstream_inputs(ctx, split),
        **ctx.weights()[1],
    }


class RegionImages:
    """Decoded RGB images, most recently used kept (fine-tuning revisits images constantly)."""

    def __init__(self, annotations: list[ImageAnnotation], capacity: int = 2000):
        self.annotations = annotations
        self.capacity = capacity
        self._cache: OrderedDict[int, np.ndarray] = OrderedDict()

    def __getitem__(self, index: int) -> np.ndarray:
        if index in self._cache:
            self._cache.move_to_end(index)
            return self._cache[index]
        image = cv2.cvtColor(load_image(self.annotations[index]), cv2.COLOR_BGR2RGB)
        self._cache[index] = image
        if len(self._cache) > self.capacity:
            self._cache.popitem(last=False)
        return image


def warp_batch(
    images: RegionImages, boxes: list[np.ndarray], batch_img: np.ndarray, batch_reg: np.ndarray, spec, context_pad: int
) -> np.ndarray:
    """Warped crops ``[B, S, S, 3]`` for the regions ``(batch_img[k], batch_reg[k])``, in batch order."""
    crops = np.empty((len(batch_img), spec.input_size, spec.input_size, 3), np.uint8)
    for i in np.unique(batch_img):
        sel = np.flatnonzero(batch_img == i)
        crops[sel] = warp_regions(images[i], boxes[i][batch_reg[sel]], spec.input_size, context_pad, spec.mean_pixel)
    return crops


class WarpedRegions:
    """R-CNN's training inputs: warped, optionally mirrored crops through the whole network."""

    def __init__(self, ctx: Context, anns: list[ImageAnnotation], boxes: list[np.ndarray], model: DetectorNet):
        self.images = RegionImages(anns)
        self.boxes, self.model, self.ft = boxes, model, ctx.cfg.finetune

    def trainable(self) -> list[nn.Parameter]:
        return list(self.model.parameters())

    def train_mode(self) -> None:
        """Put the model in training mode (dropout on) before a step."""
        self.model.train()

    def logits(self, img_idx: np.ndarray, reg_idx: np.ndarray, iteration: int | None) -> torch.Tensor:
        spec = self.model.spec
        crops = warp_batch(self.images, self.boxes, img_idx, reg_idx, spec, self.ft.context_pad)
        if self.ft.mirror and iteration is not None:
            # Flips come from a generator keyed by the iteration, so a resumed run flips the same crops.
            flip = np.random.default_rng([self.ft.seed, iteration]).random(len(crops)) < 0.5
            crops[flip] = crops[flip, :, ::-1]
        device = next(self.model.parameters()).device
        return self.model(normalise_crops(crops, spec, device))


class PooledRegions:
    """SPP-net's training inputs: windows pooled from the cached conv maps; only fc6, fc7, fc8 learn.

    With ``finetune.mirror`` each training window is, with probability 1/2, pooled from the maps of
    the flipped image instead, at the mirrored place: SPP-net's released code fine-tunes on the
    trainval images and their mirror images (``flip_finetune = true`` in ``Script_spp_voc.m``).
    """

    def __init__(self, ctx: Context, anns: list[ImageAnnotation], boxes: list[np.ndarray], model: DetectorNet):
        self.maps = convmaps.load(ctx, ctx.cfg.data.trainval)
        self.ids = [a.image_id for a in anns]
        self.widths = [a.width for a in anns]
        self.boxes, self.model, self.target = boxes, model, ctx.cfg.spp.target_size
        self.ft, self.random_scale = ctx.cfg.finetune, ctx.cfg.spp.random_scale
        self._cache: OrderedDict[tuple[int, bool], tuple[list[torch.Tensor], np.ndarray, np.ndarray]] = OrderedDict()
        self.device = next(model.parameters()).device
        for p in model.trunk.parameters():
            p.requires_grad_(False)

    def trainable(self) -> list[nn.Parameter]:
        return [p for name, p in self.model.named_parameters() if not name.startswith("trunk.")]

    def train_mode(self) -> None:
        """Training mode for the fc layers; the fixed conv layers (and their batch-norm statistics, if any) stay in eval."""
        self.model.train()
        self.model.trunk.eval()

    def _image(self, i: int, mirror: bool = False) -> tuple[list[torch.Tensor], np.ndarray, np.ndarray]:
        """Image ``i``'s conv maps (of its mirror image with ``mirror``), the scale each of its regions
        is pooled at, and each region's cell rectangle at every scale ``[K, N, 4]`` (placed once)."""
        key = (i, mirror)
        if key not in self._cache:
            from rcnn.methods.spp_regions import as_map_tensors, scale_cells
            from rcnn.modeling.spp import select_scale
            from rcnn.structures.boxes import mirror_boxes

            maps, factors = convmaps.image_record(self.maps, self.ids[i], mirror)
            # Channels first: training batches hold a window or two per image, pooled by roi_pool from a
            # batch of crops in its layout, and cropping channels-last maps into it would transpose them.
            maps = [m.contiguous() for m in as_map_tensors(maps, self.device)]
            boxes = mirror_boxes(self.boxes[i], self.widths[i]) if mirror else self.boxes[i]
            spec = self.model.spec
            rects = scale_cells([m.shape for m in maps], factors, boxes, spec.stride, spec.offset)
            self._cache[key] = (maps, select_scale(boxes, list(factors), self.target), rects)
            if len(self._cache) > 4000:
                self._cache.popitem(last=False)
        return self._cache[key]

    def pooled(
        self, img_idx: np.ndarray, reg_idx: np.ndarray, mirror: np.ndarray | None = None, draw: np.ndarray | None = None
    ) -> torch.Tensor:
        """Pyramids ``[B, D]`` of the regions ``reg_idx`` of images ``img_idx``, in batch order: from
        their mirror images where ``mirror`` is set, and with ``draw`` (uniform in ``[0, 1)``, one per
        region) at a random scale instead of the closest one."""
        from rcnn.methods.spp_regions import pool_cells

        mirror = np.zeros(len(img_idx), bool) if mirror is None else np.asarray(mirror, bool)
        # Pool the batch grouped by image (rows come back in `order`), then restore the batch order.
        key = img_idx.astype(np.int64) * 2 + mirror
        order = np.argsort(key, kind="stable")
        items = []
        for k in np.unique(key):
            maps, scale, rects = self._image(int(k) // 2, bool(k % 2))
            rows = order[key[order] == k]
            regions = reg_idx[rows]
            at = scale[regions] if draw is None else np.minimum((draw[rows] * len(maps)).astype(np.int64), len(maps) - 1)
            items.append((maps, at, rects[at, regions]))
        pooled = pool_cells(items, self.model.spec.spp_levels)
        return pooled[torch.from_numpy(np.argsort(order)).to(self.device)]

    def logits(self, img_idx: np.ndarray, reg_idx: np.ndarray, iteration: int | None) -> torch.Tensor:
        mirror = draw = None
        if iteration is not None:
            # As R-CNN's crop flips: drawn from a generator keyed by the iteration, so a resumed run draws the same.
            rng = np.random.default_rng([self.ft.seed, iteration])
            mirror = rng.random(len(img_idx)) < 0.5 if self.ft.mirror else None
            draw = rng.random(len(img_idx)) if self.random_scale else None
        fc7 = self.model.head(self.pooled(img_idx, reg_idx, mirror, draw))["fc7"]
        return self.model.classifier(self.model.dropout(fc7))

    @torch.no_grad()
    def input_scale(self, sampler: FgBgSampler, seed: int, rms: float, n_batches: int = 8) -> float:
        """The factor giving fc6's input a root-mean-square value of ``rms`` over a sample of training batches."""
        norms = []
        for batch in sampler.epoch_batches(seed, n_batches=n_batches):
            norms.append(self.pooled(*sampler.locate(batch)).norm(dim=1))
        mean_norm = float(torch.cat(norms).mean())
        return rms * self.model.spec.pool5_dim**0.5 / mean_norm if mean_norm > 0 else 1.0


def _split_validation(ids: list[str], fraction: float, seed: int) -> tuple[list[int], list[int]]:
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(ids))
    n_val = int(round(fraction * len(ids))) if len(ids) > 1 else 0
    return sorted(order[n_val:].tolist()), sorted(order[:n_val].tolist())


def compute(ctx: Context, split: str, work: Path) -> tuple[dict[str, Path], dict]:
    cfg, ft = ctx.cfg, ctx.cfg.finetune
    dataset = ctx.dataset(split)
    dataset.check(ctx.classes)
    device = device_for(cfg.model.device)
    anns = dataset.annotations()
    boxes, labels = [], []
    with proposals.load(ctx, split) as props:
        for ann in anns:
            regions = image_regions(ann, props.array(ann.image_id, "boxes", np.float32, 2), ctx.classes, cfg.data.use_difficult)
            boxes.append(regions.boxes)
            labels.append(finetune_labels(regions, ft.fg_threshold, ft.bg_low))
    train_idx, val_idx = _split_validation(dataset.ids, ft.val_fraction, ft.seed)
    train_set = set(train_idx)
    masked = [lab if i in train_set else np.full_like(lab, -1) for i, lab in enumerate(labels)]
    sampler = FgBgSampler.from_image_labels(masked, batch_size=ft.batch_size, fg_fraction=ft.fg_fraction)
    if len(sampler.fg_indices) == 0:
        raise UserError(f"no foreground regions in '{split}': no proposal reaches IoU {ft.fg_threshold} with an object")
    val = _validation_set(labels, val_idx, ft.seed)

    method = build_method(cfg)
    model = method.untrained_model(ctx)
    state_path = work / "train_state.pt"
    history_path = work / "history.json"
    start_iter, history, state = 0, [], None
    if state_path.is_file() and history_path.is_file():
        state = load_train_state(state_path)
        model.load_state_dict(state["model"])
        start_iter = int(state["iteration"])
        # The history may be one checkpoint ahead of the state if a kill fell between the two writes.
        history = [h for h in json.loads(history_path.read_text()) if h["iteration"] <= start_iter]
        ctx.log(f"{NAME}/{split}: resuming from iteration {start_iter}")
    else:
        loaded = initialise(model, ctx.weights()[0])
        ctx.log(
            f"{NAME}/{split}: {cfg.model.backbone}, {len(loaded)} pretrained tensors ({cfg.model.weights}), "
            f"{len(sampler.fg_indices)} fg / {len(sampler.bg_indices)} bg training regions, device {device_label(device)}"
        )
    # The model moves first: loading optimizer state then puts its buffers on the same device.
    model.to(device)
    regions = method.training_regions(ctx, anns, boxes, model)
    if state is None:
        method.prepare_training(ctx, regions, sampler)
    if ft.optimizer == "adam":
        optimizer = torch.optim.Adam(regions.trainable(), lr=ft.lr, weight_decay=ft.weight_decay)
    else:
        optimizer = torch.optim.SGD(regions.trainable(), lr=ft.lr, momentum=ft.momentum, weight_decay=ft.weight_decay)
    if state is not None:
        optimizer.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["torch_rng"])
        if device.type == "cuda" and "cuda_rng" in state:  # dropout masks on the GPU come from its own generator
            torch.cuda.set_rng_state(state["cuda_rng"], device)
    if device.type == "cuda":
        # cuDNN's fastest kernels may sum in a different order on every call: a resumed run would drift
        # from an unbroken one. The deterministic ones cost little on these networks.
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    loss_fn = nn.CrossEntropyLoss()
    amp = device.type == "cuda"
    batches = sampler.epoch_batches(ft.seed, n_batches=ft.max_iter)
    for _ in range(start_iter):
        next(batches)

    bar = progress_bar(ctx, ft.max_iter, f"finetune {split}", unit="it")
    bar.update(start_iter)
    started = time.perf_counter()
    run_loss, run_acc, run_n = 0.0, 0.0, 0
    for it in range(start_iter, ft.max_iter):
        regions.train_mode()
        # Step schedule computed from the iteration alone, so resuming needs no scheduler state.
        for group in optimizer.param_groups:
            group["lr"] = ft.lr * ft.gamma ** (it // ft.step_size)
        batch = next(batches)
        img_idx, reg_idx = sampler.locate(batch)
        target = torch.from_numpy(sampler.labels[batch]).to(device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            logits = regions.logits(img_idx, reg_idx, it)
            loss = loss_fn(logits.float(), target)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        run_loss += float(loss.detach())
        run_acc += float((logits.argmax(1) == target).float().mean())
        run_n += 1
        bar.update(1)
        bar.set_postfix(loss=f"{run_loss / run_n:.3f}", acc=f"{run_acc / run_n:.3f}")
        if (it + 1) % ft.eval_every == 0 or it + 1 == ft.max_iter:
            val_acc = _accuracy(model, regions, labels, val, device)
            history.append(
                {
                    "iteration": it + 1,
                    "loss": run_loss / run_n,
                    "train_acc": run_acc / run_n,
                    "val_acc": val_acc,
                    "lr": optimizer.param_groups[0]["lr"],
                    "seconds": time.perf_counter() - started,
                }
            )
            ctx.log(
                f"{NAME}/{split}: iteration {it + 1}/{ft.max_iter}  loss {run_loss / run_n:.3f}  "
                f"train acc {run_acc / run_n:.3f}  val acc {'n/a' if val_acc is None else f'{val_acc:.3f}'}"
            )
            run_loss, run_acc, run_n = 0.0, 0.0, 0
            write_json_atomic(history_path, history)
            _save_state(state_path, model, optimizer, it + 1)
    bar.close()

    model.cpu()
    out = work / MODEL
    save_checkpoint(
        out,
        model,
        # Timings stay out of the checkpoint so that a resumed run writes the same bytes.
        {
            "classes": list(ctx.classes),
            "history": [{k: v for k, v in h.items() if k != "seconds"} for h in history],
            "context_pad": ft.context_pad,
            "weights": cfg.model.weights,
        },
    )
    last = history[-1] if history else {}
    metrics = {
        "iterations": ft.max_iter,
        "val_acc": last.get("val_acc"),
        "train_acc": last.get("train_acc"),
        "loss": last.get("loss"),
        "history": history,
        "device": device_label(device),
        "fg_regions": int(len(sampler.fg_indices)),
        "bg_regions": int(len(sampler.bg_indices)),
        "val_images": len(val_idx),
        "fc6_input_scale": float(model.fc6_input_scale),
    }
    return {MODEL: out, MODEL + ".json": out.with_name(MODEL + ".json")}, metrics


def _validation_set(labels: list[np.ndarray], val_idx: list[int], seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Up to VAL_REGIONS held-out regions, a quarter foreground when possible: (image, region) arrays."""
    pairs = [(i, r, int(labels[i][r] > 0)) for i in val_idx for r in np.flatnonzero(labels[i] >= 0)]
    if not pairs:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    arr = np.array(pairs, np.int64)
    rng = np.random.default_rng(seed + 1)
    fg, bg = arr[arr[:, 2] == 1], arr[arr[:, 2] == 0]
    fg = fg[rng.permutation(len(fg))[: VAL_REGIONS // 4]]
    bg = bg[rng.permutation(len(bg))[: VAL_REGIONS - len(fg)]]
    both = np.concatenate([fg, bg])
    return both[:, 0], both[:, 1]


@torch.no_grad()
def _accuracy(model: DetectorNet, regions, labels, val, device) -> float | None:
    img_idx, reg_idx = val
    if len(img_idx) == 0:
        return None
    model.eval()
    correct = 0
    for start in range(0, len(img_idx), 256):
        bi, br = img_idx[start : start + 256], reg_idx[start : start + 256]
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            pred = regions.logits(bi, br, None).argmax(1).cpu().numpy()
        correct += int((pred == np.array([labels[i][r] for i, r in zip(bi, br)])).sum())
    return correct / len(img_idx)


def _save_state(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer, iteration: int) -> None:
    tmp = path.with_name(path.name + ".tmp")
    state = {
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "torch_rng": torch.get_rng_state(),
        "iteration": iteration,
    }
    device = next(model.parameters()).device
    if device.type == "cuda":
        state["cuda_rng"] = torch.cuda.get_rng_state(device)
    torch.save(state, tmp)
    tmp.replace(path)


def load_train_state(path: Path) -> dict:
    """The training state written by :func:`_save_state` (tensors and plain containers only)."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a damaged state is recomputed rather than trusted
        raise UserError(f"training state '{path}' is damaged ({e}); rerun with --force") from None


def load(ctx: Context):
    """The fine-tuned model and its description."""
    from rcnn.modeling.models import load_checkpoint

    return load_checkpoint(_checked_model(ctx), device_for(ctx.cfg.model.device))


def window_offset(ctx: Context) -> float:
    """The receptive-field offset the fine-tuned SPP-net model maps windows with (its spec's)."""
    from rcnn.modeling.models import checkpoint_description

    return checkpoint_description(_checked_model(ctx))[0].offset


def _checked_model(ctx: Context) -> Path:
    """The fine-tuned weights' path, once they and their description match the manifest."""
    split = ctx.cfg.data.trainval
    verify = upstream_check(ctx, NAME, split)
    path = ctx.unit_dir(NAME, split) / MODEL
    verify(path)
    verify(path.with_name(MODEL + ".json"))
    return path


def describe(manifest: dict) -> str:
    m = manifest.get("metrics", {})
    val = m.get("val_acc")
    val_text = f"{val:.3f}" if isinstance(val, float) else "n/a"
    return (
        f"{m.get('iterations')} iterations on {m.get('device')}, final loss {m.get('loss', float('nan')):.3f}, "
        f"validation accuracy {val_text} ({m.get('val_images')} held-out images)"
    )
