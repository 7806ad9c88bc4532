"""Stage `finetune`: train the CNN as an N+1-way classifier of regions (R-CNN section 2.3; SPP-net; Fast R-CNN).

Regions are the trainval proposals plus ground-truth boxes; a region is its best
ground truth's class at IoU >= ``fg_threshold``, background at IoU in
``[bg_low, fg_threshold)``. Mini-batches of 128 hold 32 foreground regions. R-CNN
trains the whole network on warped crops; SPP-net trains only fc6, fc7 and the
classifier, on windows pooled from the cached conv maps (the trunk stays fixed);
Fast R-CNN trains the network (bar its first conv layers) on regions pooled from whole
images, two images per mini-batch, with a box-regression loss beside the class loss.
A share of the trainval images is held out to report validation accuracy every
``eval_every`` iterations, when a checkpoint is also written: a killed run resumes
from its last checkpoint.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from rcnn.config import fingerprint_params, section_kwargs
from rcnn.errors import UserError
from rcnn.modeling.checkpoints import initialise, save_checkpoint
from rcnn.modeling.models import device_for, device_label, to_training_device
from rcnn.store.artifacts import write_json_atomic
from rcnn.training.finetune import Schedule, TrainState, accuracy, fine_tune, split_validation, validation_set
from rcnn.training.regions import finetune_labels, image_regions

from . import proposals
from .context import Context
from .methods import build_method
from .provenance import upstream_check, upstream_digest
from .runner import progress_bar

NAME = "finetune"
SCHEMA_VERSION = 1
MODEL = "model.pt"


def splits(ctx: Context) -> tuple[str, ...]:
    return (ctx.cfg.data.trainval,)


def params(ctx: Context) -> dict:
    method = build_method(ctx.cfg)
    return {
        "method": method.name,
        "model": {**fingerprint_params(ctx.cfg.model), "weights": ctx.weights_param()},
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


def schedule(ctx: Context) -> Schedule:
    return Schedule(**section_kwargs(Schedule, ctx.cfg.finetune))


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
    train_idx, val_idx = split_validation(len(dataset.ids), ft.val_fraction, ft.seed)
    train_set = set(train_idx)
    masked = [lab if i in train_set else np.full_like(lab, -1) for i, lab in enumerate(labels)]
    method = build_method(cfg)
    sampler = method.sampler(ctx, masked)
    if len(sampler.fg_indices) == 0:
        raise UserError(f"no foreground regions in '{split}': no proposal reaches IoU {ft.fg_threshold} with an object")
    val = validation_set(labels, val_idx, ft.seed)

    model = method.untrained_model(ctx)
    state_path = work / "train_state.pt"
    history_path = work / "history.json"
    state = None
    if state_path.is_file() and history_path.is_file():
        try:
            state = TrainState.load(state_path)
            model.load_state_dict(state.model)
            # The history may be one checkpoint ahead of the state if a kill fell between the two writes.
            state.history = [h for h in json.loads(history_path.read_text()) if h["iteration"] <= state.iteration]
            ctx.log(f"{NAME}/{split}: resuming from iteration {state.iteration}")
            if (state.cuda_rng is not None) != (device.type == "cuda"):  # a scratch folder moved between machines
                ctx.log(
                    f"{NAME}/{split}: note: its saved state was made on a {'GPU' if state.cuda_rng is not None else 'CPU'} "
                    f"and goes on on {device_label(device)}, in this device's precision and warp (model.precision and "
                    "model.warp auto differ between them): the result will not be an unbroken run's"
                )
        except (UserError, ValueError, KeyError, TypeError, RuntimeError) as e:  # damaged: never trusted
            ctx.log(f"{NAME}/{split}: the saved training state cannot be used ({str(e).splitlines()[0]}); starting afresh")
            state_path.unlink()
            history_path.unlink()
            state, model = None, method.untrained_model(ctx)  # nothing of the damaged state kept
    if state is None:
        loaded = initialise(model, ctx.weights()[0])
        ctx.log(
            f"{NAME}/{split}: {cfg.model.backbone}, {len(loaded)} pretrained tensors ({cfg.model.weights}), "
            f"{len(sampler.fg_indices)} fg / {len(sampler.bg_indices)} bg training regions, device {device_label(device)}"
        )
    # The model moves first: loading optimizer state then puts its buffers on the same device.
    to_training_device(model, device)
    regions = method.training_regions(ctx, anns, boxes, model, labels)
    if state is None:
        method.prepare_training(ctx, regions, sampler)

    start = state.iteration if state is not None else 0
    saved = [start]  # the iteration of the last checkpoint on disk

    def checkpoint(new: TrainState) -> None:
        write_json_atomic(history_path, new.history)
        new.save(state_path)
        saved[0] = new.iteration

    bar = progress_bar(ctx, ft.max_iter, f"finetune {split}", unit="it")
    try:
        history = fine_tune(
            regions,
            sampler,
            schedule(ctx),
            device,
            validate=lambda: accuracy(regions, labels, val, device, cfg.model.precision),
            checkpoint=checkpoint,
            resume=state,
            progress=bar,
            log=lambda line: ctx.log(f"{NAME}/{split}: {line}"),
            precision=cfg.model.precision,
        )
    except KeyboardInterrupt:
        bar.close()
        ctx.log(f"{NAME}/{split}: interrupted; {resume_point(saved[0], ft.eval_every)}")
        raise
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
        "iterations_computed": ft.max_iter - start,  # fewer after a resume: the stage's time covers only these
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


def resume_point(saved: int, every: int) -> str:
    """What a rerun of an interrupted fine-tuning starts from, given the iteration of its last checkpoint."""
    if saved == 0:
        return f"no checkpoint was written yet (one every finetune.eval_every = {every} iterations), so a rerun starts afresh"
    return f"a rerun resumes from the checkpoint of iteration {saved} (one every finetune.eval_every = {every} iterations)"


def load(ctx: Context):
    """The fine-tuned model and its description."""
    from rcnn.modeling.checkpoints import load_checkpoint

    return load_checkpoint(_checked_model(ctx), device_for(ctx.cfg.model.device))


def window_offset(ctx: Context) -> float:
    """The receptive-field offset the fine-tuned SPP-net model maps windows with (its spec's)."""
    from rcnn.modeling.checkpoints import checkpoint_description

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
