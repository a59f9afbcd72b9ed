"""One seed range everywhere, checked before anything slow runs.

torch's `Generator.manual_seed` silently wraps a negative seed to 2**64 - k and fails with an overflow deep inside
a pipeline above 2**64 - 1; numpy refuses negatives. So layergen takes 0 .. 2**63 - 1, and a command that derives
seeds (image k uses seed + k) checks the whole span up front.
"""
from __future__ import annotations

import argparse
import operator

from .errors import LayergenError

MAX_SEED = 2**63 - 1


def check_seed(seed, what: str = "seed", span: int = 1) -> int:
    """`seed` as an int, if `seed .. seed + span - 1` are all valid seeds; otherwise a clear error."""
    try:
        value = operator.index(seed)
    except TypeError:
        raise LayergenError(f"{what} must be an integer, got {seed!r}") from None
    if value < 0 or value + max(span, 1) - 1 > MAX_SEED:
        extra = f" (and {what} + {span - 1} for the later images)" if span > 1 and value >= 0 else ""
        raise LayergenError(f"{what} must be in [0, {MAX_SEED}]{extra}, got {value}")
    return value


def seed_arg(text: str) -> int:
    """argparse `type=` for --seed: a usage error (exit 2, no traceback) for anything out of range."""
    try:
        return check_seed(int(text))
    except (ValueError, LayergenError) as exc:
        raise argparse.ArgumentTypeError(str(exc) if isinstance(exc, LayergenError) else
                                         f"invalid seed {text!r}: expected a whole number") from None


def generator(seed, what: str = "seed"):
    """A CPU torch.Generator seeded with a checked seed."""
    import torch

    return torch.Generator().manual_seed(check_seed(seed, what))
