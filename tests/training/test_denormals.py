"""Fine-tuning on a CPU sets subnormal weights and optimizer state to zero every FLUSH_EVERY iterations."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from rcnn.training import finetune
from rcnn.training.finetune import Schedule, fine_tune
from rcnn.training.sampling import FgBgSampler

TINY = torch.finfo(torch.float32).tiny  # the smallest normal float32


class Regions:
    """Two images of 16 regions each, scored by one linear layer on fixed random inputs."""

    def __init__(self):
        torch.manual_seed(0)
        self.model = nn.Linear(8, 3)
        self.inputs = torch.randn(2, 16, 8)

    def trainable(self):
        return list(self.model.parameters())

    def train_mode(self):
        self.model.train()

    def logits(self, img_idx, reg_idx, iteration):
        return self.model(self.inputs[torch.as_tensor(img_idx), torch.as_tensor(reg_idx)])


def subnormal(t: torch.Tensor) -> torch.Tensor:
    return (t != 0) & (t.abs() < TINY)


def test_subnormal_weights_and_state_are_zeroed_every_flush_every_iterations_on_a_cpu(monkeypatch):
    regions = Regions()
    labels = [np.array([1, 2] + [0] * 14), np.array([2, 1] + [0] * 14)]
    sampler = FgBgSampler.from_image_labels(labels, batch_size=8, fg_fraction=0.25)
    planted = torch.zeros(3, 8, dtype=torch.bool)
    planted[:, ::2] = True  # half the weights made subnormal, as training leaves some
    with torch.no_grad():
        regions.model.weight[planted] = 1e-39
    monkeypatch.setattr(finetune, "FLUSH_EVERY", 3)
    # lr 0 (SGD with momentum): the weights would stay as they are, subnormals included, without the flush.
    seen = []

    def checkpoint(state):
        seen.append(state)

    schedule = Schedule(max_iter=2, lr=0.0, eval_every=1)
    fine_tune(regions, sampler, schedule, torch.device("cpu"), lambda: None, checkpoint)
    assert subnormal(regions.model.weight).sum() == planted.sum()  # not yet: 2 iterations of 3
    fine_tune(regions, sampler, Schedule(max_iter=3, lr=0.0, eval_every=1), torch.device("cpu"), lambda: None, checkpoint,
              resume=seen[-1])  # fmt: skip
    weight = regions.model.weight.detach()
    assert not subnormal(weight).any() and not weight[planted].any()
    assert torch.equal(weight[~planted], Regions().model.weight.detach()[~planted])  # normal weights untouched
    state = seen[-1].optimizer["state"]
    assert state and not any(subnormal(t).any() for s in state.values() for t in s.values() if torch.is_tensor(t))
