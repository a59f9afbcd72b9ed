import argparse

import pytest
import torch

from layergen.errors import LayergenError
from layergen.layout import Box, LayoutError
from layergen.pipelines.layer_diffusion import make_generator_list
from layergen.seeds import MAX_SEED, check_seed, generator, seed_arg


def test_seed_range_covers_every_derived_seed():
    assert check_seed(0) == 0 and check_seed(MAX_SEED) == MAX_SEED
    assert check_seed(MAX_SEED - 3, span=4) == MAX_SEED - 3
    for bad, span in ((-1, 1), (MAX_SEED + 1, 1), (MAX_SEED - 2, 4)):
        with pytest.raises(LayergenError, match=r"must be in \[0, 9223372036854775807\]"):
            check_seed(bad, span=span)
    with pytest.raises(LayergenError, match="must be an integer"):
        check_seed(1.5)


def test_seed_arg_is_a_usage_error_for_anything_out_of_range():
    assert seed_arg("42") == 42
    for text in ("-1", str(2**64), "x", "1e3"):
        with pytest.raises(argparse.ArgumentTypeError):
            seed_arg(text)


def test_generators_never_wrap_a_negative_seed_silently():
    reference = torch.randn(3, generator=torch.Generator().manual_seed(7))
    assert torch.equal(torch.randn(3, generator=generator(7)), reference)
    assert [g.initial_seed() for g in make_generator_list(None, 5, 3)] == [5, 6, 7]
    with pytest.raises(LayergenError):
        make_generator_list(None, -1, 1)  # torch would have used 2**64 - 1
    with pytest.raises(LayergenError):
        make_generator_list(None, MAX_SEED, 2)
    with pytest.raises(LayoutError, match="box seed"):
        Box(0, 0, 4, 4, seed=-5)
    with pytest.raises(LayoutError, match="box seed"):
        Box(0, 0, 4, 4, seed=10**30)
