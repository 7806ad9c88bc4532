"""Pipeline stages, in the order a run executes them."""

from . import proposals

STAGES = {
    "proposals": proposals,
}
