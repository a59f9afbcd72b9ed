import numpy as np
import pytest
import torch

from layergen.models.figure_classifier import FigureClassifier


def test_global_pooling_ignores_where_the_subject_is():
    """`pooling="global"` sees a figure the same wherever it stands (up to the border); flatten does not."""
    torch.manual_seed(0)
    heads = {"species": ["cat", "bird"]}
    glob = FigureClassifier(heads=heads, input_size=64, channels=(8, 8), dropout=0.0, pooling="global").eval()
    flat = FigureClassifier(heads=heads, input_size=64, channels=(8, 8), dropout=0.0).eval()
    img = torch.full((1, 3, 64, 64), 0.5)
    moved = img.clone()
    img[..., 20:32, 16:24] = torch.tensor([0.9, 0.1, 0.1])[:, None, None]
    moved[..., 20:32, 36:44] = torch.tensor([0.9, 0.1, 0.1])[:, None, None]  # shifted by 20 px (5 strides)
    with torch.no_grad():
        g0, g1 = glob(img)["species"], glob(moved)["species"]
        f0, f1 = flat(img)["species"], flat(moved)["species"]
    torch.testing.assert_close(g0, g1, rtol=1e-5, atol=1e-6)
    assert (f0 - f1).abs().max() > 1e-3
    assert glob.head_layers["species"].in_features == 16 and flat.head_layers["species"].in_features == 8 * 16 * 16
    pred = glob.predict([np.zeros((32, 32, 3), np.uint8)] * 3)
    assert len(pred["species"]) == 3 and set(pred["species"]) <= {"cat", "bird"}


def test_unknown_pooling_is_refused():
    with pytest.raises(ValueError, match="pooling"):
        FigureClassifier(pooling="avg")
