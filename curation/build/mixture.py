"""Task weights as VILA-M3's mixtures use them: an upsampling factor.

A task of weight `w` makes `floor(w)` variants of every item, plus one more with probability
`w - floor(w)`, drawn from a keyed hash of (seed, task, item): the same seed gives the same
draw on every build and in any order, and a weight of 0.5 keeps about half of the items.
Variant `v` calls the expert with `args[v % len(args)]`, so a task with several arguments
(VISTA3D's label groups) spreads its variants over them.
"""

from __future__ import annotations

import math

from curation.keys import Keyer
from curation.manifest import TaskSpec
from curation.build.split import unit_interval


def variant_count(weight: float, draw: float) -> int:
    """Variants for one item, given a uniform draw in [0, 1).

    >>> variant_count(2.0, 0.99), variant_count(2.5, 0.4), variant_count(2.5, 0.6), variant_count(0.25, 0.3)
    (2, 3, 2, 0)
    """
    whole = math.floor(weight)
    return whole + (1 if draw < weight - whole else 0)


def variants(task: TaskSpec, item_id: str, keyer: Keyer, seed: int) -> int:
    """How many conversations `task` makes of the item."""
    return variant_count(task.weight, unit_interval(keyer("weight", seed, task.template, task.source, item_id)))


def expert_arg(task: TaskSpec, variant: int) -> str:
    """The expert argument variant `variant` uses.

    >>> expert_arg(TaskSpec(template="t.j2", source="ct", expert="V", args=["organs", "skeleton"]), 3)
    'skeleton'
    """
    return task.args[variant % len(task.args)]
