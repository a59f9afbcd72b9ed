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


def _bundled_judge(name: str) -> FigureClassifier:
    from layergen.mini import mini_path

    return FigureClassifier.from_pretrained(mini_path("action") / "classifiers" / name,
                                            torch_dtype=torch.float32).eval()


@torch.no_grad()
def _held_out_renders(first_seed: int, n: int, **factors):
    """n held-out renders with `factors` fixed: (figures, uint8 images, the same through the action VAE — what
    generated images look like to a judge)."""
    from diffusers import AutoencoderKL

    from layergen.data.figures import HELDOUT_SEED_START, make_figure
    from layergen.mini import mini_path

    figs = [make_figure(HELDOUT_SEED_START + first_seed + k, 128, **factors) for k in range(n)]
    images = np.stack([np.asarray(f.image)[..., :3] for f in figs])
    vae = AutoencoderKL.from_pretrained(mini_path("action") / "vae", torch_dtype=torch.float32).eval()
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1
    y = vae.decode(vae.encode(x).latent_dist.mean).sample.clamp(-1, 1)
    return figs, images, ((y + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()


def test_bundled_judges_read_species_in_every_pose():
    """The action benchmark compares methods that draw different poses, so the subject judge must not depend
    on the pose: on held-out renders, clean and through the action VAE (what generated images look like), it
    reads the species right in every action. The first bundled judge did not: 83 % on clean sit and bow
    renders, 48-65 % on VAE round trips of bow and kick against 92 % for stand, penalising exactly the
    methods that draw the action."""
    from layergen.data.figures import ACTIONS

    subject, pose = _bundled_judge("subject"), _bundled_judge("pose")
    for action in ACTIONS:
        figs, images, round_trip = _held_out_renders(900_000, 12, action=action)
        for batch, bar in ((images, 0.9), (round_trip, 0.85)):
            species = subject.predict(batch)["species"]
            assert np.mean([s == f.species for s, f in zip(species, figs)]) >= bar, action
        assert np.mean([p == action for p in pose.predict(images)["action"]]) >= 0.9, action


def test_bundled_scene_judge_reads_every_background():
    """The action benchmark's background judge: on held-out renders of every background, in several poses,
    clean and through the action VAE, it names the background."""
    from layergen.data.figures import FIGURE_BACKGROUNDS

    scene = _bundled_judge("scene")
    for background in FIGURE_BACKGROUNDS:
        _, images, round_trip = _held_out_renders(950_000, 8, background=background)
        for batch in (images, round_trip):
            assert np.mean([b == background for b in scene.predict(batch)["background"]]) >= 0.95, background
