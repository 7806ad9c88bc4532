"""The fine-tuning loop: SGD (or Adam) on fg/bg mini-batches of regions, with a step learning-rate schedule,
periodic validation and checkpoints from which a killed run resumes exactly (R-CNN section 2.3).

What a region *is* belongs to the method: :func:`fine_tune` trains any ``regions`` object with

- ``model``: the :class:`~rcnn.modeling.models.DetectorNet` being trained;
- ``trainable()``: the parameters that learn (R-CNN: all; SPP-net: fc6, fc7 and the classifier);
- ``train_mode()``: the model's modules put in training mode before each step;
- ``logits(img_idx, reg_idx, iteration)``: class scores ``[B, C + 1]`` of regions ``reg_idx`` of images
  ``img_idx``; ``iteration`` keys the random flips (None at validation: no augmentation);
- optionally ``loss(logits, labels)``: the step's loss from the regions ``logits`` last ran (Fast R-CNN's
  multi-task loss); without it, the cross-entropy of the logits.

It is :class:`rcnn.methods.rcnn_regions.WarpedRegions` for R-CNN,
:class:`rcnn.methods.spp_regions.PooledRegions` for SPP-net and :class:`rcnn.methods.fast_regions.FastRegions`
for Fast R-CNN.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from rcnn.errors import UserError
from rcnn.modeling.checkpoints import save_tensors
from rcnn.modeling.inference import flush_denormals, inference_dtype
from rcnn.modeling.transfer import to_device
from rcnn.training.sampling import FgBgSampler

VAL_REGIONS = 2048  # fixed validation set size: enough for +-1 % accuracy


@dataclass(frozen=True)
class Schedule:
    """The optimiser and its schedule (defaults: R-CNN's, section 2.3 and its released solver)."""

    max_iter: int
    lr: float = 0.001
    optimizer: str = "sgd"  # or "adam"
    momentum: float = 0.9
    weight_decay: float = 0.0005
    step_size: int = 20000  # lr multiplied by gamma every step_size iterations
    gamma: float = 0.1
    eval_every: int = 1000  # validate and checkpoint this often
    seed: int = 0  # of the mini-batch order
    # Caffe's per-blob multipliers in R-CNN's pascal_finetune_train.prototxt: biases learn at 2x the rate
    # without weight decay; the new classifier (fc8_pascal) at 10x.
    bias_lr_mult: float = 2.0
    bias_decay: bool = False
    classifier_lr_mult: float = 10.0

    def lr_at(self, iteration: int) -> float:
        # From the iteration alone, so that resuming needs no scheduler state.
        return self.lr * self.gamma ** (iteration // self.step_size)

    def param_groups(self, model: nn.Module, trainable: list[nn.Parameter]) -> list[dict]:
        """``trainable`` (parameters of ``model``) in optimiser groups, each with its ``lr_mult`` and weight decay.

        A parameter is a bias when its name ends in ``bias`` (batch-norm scales are weights, as Caffe had none),
        and the classifier's when it belongs to ``model.classifier``; parameters treated alike share one group.
        """
        wanted = {id(p) for p in trainable}
        if not wanted <= {id(p) for p in model.parameters()}:
            raise ValueError("trainable parameters must belong to the model")
        groups: dict[tuple[float, float], list[nn.Parameter]] = {}
        for name, p in model.named_parameters():
            if id(p) not in wanted:
                continue
            bias = name.endswith("bias")
            mult = (self.bias_lr_mult if bias else 1.0) * (self.classifier_lr_mult if name.startswith("classifier.") else 1.0)
            decay = 0.0 if bias and not self.bias_decay else self.weight_decay
            groups.setdefault((mult, decay), []).append(p)
        return [{"params": ps, "lr_mult": mult, "weight_decay": decay} for (mult, decay), ps in groups.items()]

    def make_optimizer(self, model: nn.Module, trainable: list[nn.Parameter]) -> torch.optim.Optimizer:
        """The optimiser over ``trainable`` at the first iteration's rates (see :meth:`set_lr`)."""
        groups = self.param_groups(model, trainable)
        if self.optimizer == "adam":
            opt = torch.optim.Adam(groups, lr=self.lr)
        else:
            opt = torch.optim.SGD(groups, lr=self.lr, momentum=self.momentum)
        self.set_lr(opt, 0)
        return opt

    def set_lr(self, optimizer: torch.optim.Optimizer, iteration: int) -> None:
        """Each group's rate at ``iteration``: the schedule's rate times the group's ``lr_mult``."""
        for group in optimizer.param_groups:
            group["lr"] = self.lr_at(iteration) * group["lr_mult"]


@dataclass
class TrainState:
    """Everything a resumed run needs to continue exactly where a checkpoint left off."""

    iteration: int
    model: dict
    optimizer: dict
    torch_rng: torch.Tensor
    cuda_rng: torch.Tensor | None = None
    history: list[dict] = field(default_factory=list)

    def save(self, path: Path) -> None:
        """Write the state (tensors and plain containers only) under a temporary name, then rename it."""
        state = {
            "model": self.model,
            "optimizer": self.optimizer,
            "torch_rng": self.torch_rng,
            "iteration": self.iteration,
        }
        if self.cuda_rng is not None:
            state["cuda_rng"] = self.cuda_rng
        tmp = path.with_name(path.name + ".tmp")
        save_tensors(state, tmp)
        tmp.replace(path)

    @classmethod
    def load(cls, path: Path) -> TrainState:
        try:
            raw = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # a damaged state is never trusted: the caller starts afresh
            raise UserError(f"training state '{path}' is damaged ({e})") from None
        return cls(int(raw["iteration"]), raw["model"], raw["optimizer"], raw["torch_rng"], raw.get("cuda_rng"))


def split_validation(n_images: int, fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Indices of the training and the held-out images (``fraction`` of ``n_images``, at least one left to train)."""
    rng = np.random.default_rng(seed)
    order = rng.permutation(n_images)
    n_val = int(round(fraction * n_images)) if n_images > 1 else 0
    return sorted(order[n_val:].tolist()), sorted(order[:n_val].tolist())


def validation_set(labels: list[np.ndarray], val_idx: list[int], seed: int) -> tuple[np.ndarray, np.ndarray]:
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


#: Every this many iterations on a CPU, subnormal weights and optimizer state are set to zero
#: (:func:`rcnn.modeling.inference.flush_denormals`; 0: never). Training drives some values into that range,
#: where a CPU computes with them many times slower. A pass over the weights costs about what a tenth of a
#: step does for AlexNet on a CPU, hence not at every step; subnormals appear slowly.
FLUSH_EVERY = 25


def training_autocast(device: torch.device, precision: str = "auto") -> torch.autocast:
    """Autocast of fine-tuning's forward passes in ``model.precision`` (``auto``: bfloat16 on a GPU, off on a CPU)."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=inference_dtype(device, precision) == torch.bfloat16)


@torch.no_grad()
def accuracy(
    regions, labels: list[np.ndarray], val: tuple[np.ndarray, np.ndarray], device: torch.device, precision: str = "auto"
) -> float | None:
    """Classification accuracy of the model on the held-out regions ``val`` (None when there are none)."""
    img_idx, reg_idx = val
    if len(img_idx) == 0:
        return None
    # Image by image: a chunk then spans few images, and Fast R-CNN runs its trunk once per image in a chunk.
    order = np.lexsort((reg_idx, img_idx))
    img_idx, reg_idx = np.asarray(img_idx)[order], np.asarray(reg_idx)[order]
    regions.model.eval()
    correct = 0
    for start in range(0, len(img_idx), 256):
        bi, br = img_idx[start : start + 256], reg_idx[start : start + 256]
        with training_autocast(device, precision):
            pred = regions.logits(bi, br, None).argmax(1).cpu().numpy()
        correct += int((pred == np.array([labels[i][r] for i, r in zip(bi, br)])).sum())
    return correct / len(img_idx)


def fine_tune(
    regions,
    sampler: FgBgSampler,  # or its image-centric kind, ImageBatchSampler
    schedule: Schedule,
    device: torch.device,
    validate: Callable[[], float | None],
    checkpoint: Callable[[TrainState], None],
    resume: TrainState | None = None,
    progress=None,
    log: Callable[[str], None] = lambda line: None,
    precision: str = "auto",
) -> list[dict]:
    """Train ``regions.model`` (already on ``device``) for ``schedule.max_iter`` iterations; return the history.

    Every ``schedule.eval_every`` iterations and at the end, ``validate()`` gives the validation accuracy and
    ``checkpoint(state)`` receives the state to keep; a run started with ``resume`` (a state written by
    ``checkpoint``) continues from it and ends with the same weights as an unbroken run. The forward passes run
    under :func:`training_autocast` (``precision``: bfloat16 on a GPU by default); on a GPU cuDNN's deterministic
    kernels are chosen, so that a resumed run does not drift from an unbroken one. ``progress`` is a tqdm-like
    bar (``update``, ``set_postfix``), or None.
    """
    optimizer = schedule.make_optimizer(regions.model, regions.trainable())
    start_iter, history = 0, []
    if resume is not None:
        optimizer.load_state_dict(resume.optimizer)
        torch.set_rng_state(resume.torch_rng)
        if device.type == "cuda" and resume.cuda_rng is not None:  # dropout masks on the GPU come from its own generator
            torch.cuda.set_rng_state(resume.cuda_rng, device)
        start_iter, history = resume.iteration, list(resume.history)
    with deterministic_cudnn(device):  # the process's settings are restored afterwards
        loss_fn = getattr(regions, "loss", None) or (lambda logits, target: nn.functional.cross_entropy(logits.float(), target))
        flush = device.type == "cpu" and FLUSH_EVERY > 0  # a GPU computes with subnormal numbers at full speed
        batches = sampler.epoch_batches(schedule.seed, n_batches=schedule.max_iter)
        for _ in range(start_iter):
            next(batches)

        if progress is not None:
            progress.update(start_iter)
        started = shown = time.perf_counter()
        # Running sums stay on the device (float64, adding float32 values as Python floats would): reading them
        # makes the host wait for the device, so they are read for the progress bar at most once a second and at
        # each evaluation, not at every step.
        run_loss, run_acc, run_n = _zero(device), _zero(device), 0
        for it in range(start_iter, schedule.max_iter):
            regions.train_mode()
            schedule.set_lr(optimizer, it)
            batch = next(batches)
            img_idx, reg_idx = sampler.locate(batch)
            target = to_device(sampler.labels[batch], device)
            with training_autocast(device, precision):
                logits = regions.logits(img_idx, reg_idx, it)
                loss = loss_fn(logits, target)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if flush and (it + 1) % FLUSH_EVERY == 0:  # subnormal weights and optimizer state: see flush_denormals
                flush_denormals(t for group in optimizer.param_groups for t in group["params"])
                flush_denormals(t for state in optimizer.state.values() for t in state.values() if torch.is_tensor(t))
            run_loss += loss.detach()
            run_acc += (logits.argmax(1) == target).float().mean()
            run_n += 1
            evaluate = (it + 1) % schedule.eval_every == 0 or it + 1 == schedule.max_iter
            if progress is not None:
                progress.update(1)
                if evaluate or time.perf_counter() - shown >= 1.0:
                    progress.set_postfix(
                        loss=f"{_finite(run_loss, it, schedule) / run_n:.3f}", acc=f"{float(run_acc) / run_n:.3f}"
                    )
                    shown = time.perf_counter()
            if evaluate:
                mean_loss, mean_acc = _finite(run_loss, it, schedule) / run_n, float(run_acc) / run_n
                val_acc = validate()
                history.append(
                    {
                        "iteration": it + 1,
                        "loss": mean_loss,
                        "train_acc": mean_acc,
                        "val_acc": val_acc,
                        "lr": schedule.lr_at(it),
                        "seconds": time.perf_counter() - started,
                    }
                )
                log(
                    f"iteration {it + 1}/{schedule.max_iter}  loss {mean_loss:.3f}  "
                    f"train acc {mean_acc:.3f}  val acc {'n/a' if val_acc is None else f'{val_acc:.3f}'}"
                )
                run_loss, run_acc, run_n = _zero(device), _zero(device), 0
                cuda_rng = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
                model_state = regions.model.state_dict()
                rng = torch.get_rng_state()
                checkpoint(TrainState(it + 1, model_state, optimizer.state_dict(), rng, cuda_rng, list(history)))
        return history


@contextlib.contextmanager
def deterministic_cudnn(device: torch.device):
    """On a GPU, cuDNN's deterministic kernels without autotuning while the block runs; the flags as they were after."""
    if device.type != "cuda":
        yield
        return
    flags = torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    try:
        yield
    finally:
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = flags


def _finite(run_loss: torch.Tensor, it: int, schedule: Schedule) -> float:
    """The running loss sum, read from the device; a diverged run (nan or inf) stops here, before its network is
    kept as a checkpoint or used: every later stage would compute on it, and fail far from the cause."""
    value = float(run_loss)
    if not np.isfinite(value):
        raise UserError(
            f"fine-tuning diverged: the loss is {value} by iteration {it + 1} of {schedule.max_iter} (learning rate "
            f"{schedule.lr_at(it):g} then; the classifier's is {schedule.classifier_lr_mult:g}x that); lower finetune.lr "
            f"(now {schedule.lr:g})"
        )
    return value


def _zero(device: torch.device) -> torch.Tensor:
    return torch.zeros((), dtype=torch.float64, device=device)
