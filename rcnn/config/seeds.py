"""Seed runs: ``NAME@seed<k>``, pipeline NAME with the seeds of its training set to k.

The seeds are fine-tuning's sampling, flips and validation images (``finetune.seed``) and the new layers'
first weights (``model.seed``). A seed run has a folder of its own, ``runs/NAME@seed<k>``, so seeds never mix;
what no seed touches (proposals, SPP-net's conv maps) is shared between them by the store.
``rcnn run NAME --seeds 0,1,2`` runs three such pipelines; :mod:`rcnn.report.seeds` summarises them.
"""

from __future__ import annotations

import re

from rcnn.errors import ConfigError

_SEED = re.compile(r"0|[1-9][0-9]{0,8}")
SEEDED_NAME = re.compile(rf"^(?P<base>.+)@seed(?P<seed>{_SEED.pattern})$")
SEED_KEYS = ("finetune.seed", "model.seed")


def seeded_name(name: str, seed: int) -> str:
    """The name of pipeline ``name`` run with seed ``seed``: ``"demo@seed1"``."""
    return f"{name}@seed{seed}"


def split_seeded_name(name: str) -> tuple[str, int | None]:
    """``"demo@seed1"`` -> ``("demo", 1)``; a plain name -> ``(name, None)``."""
    m = SEEDED_NAME.match(name)
    return (m.group("base"), int(m.group("seed"))) if m else (name, None)


def parse_seeds(text: str) -> tuple[int, ...]:
    """``"0,1,2"`` -> ``(0, 1, 2)``: distinct non-negative integers, in the order given."""
    seeds = []
    for part in text.split(","):
        part = part.strip()
        if not _SEED.fullmatch(part):
            raise ConfigError(f"--seeds {text}: {part!r} is not a seed; give non-negative integers, e.g. --seeds 0,1,2")
        if int(part) in seeds:
            raise ConfigError(f"--seeds {text}: seed {part} is given twice")
        seeds.append(int(part))
    return tuple(seeds)
