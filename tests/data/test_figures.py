import numpy as np
import pytest

from layergen.data.figures import (ACTION_VERBS, ACTIONS, FIGURE_BACKGROUNDS, FIGURE_COLOURS, HELDOUT_ACTIONS,
                                   SEEN_ACTIONS, SPECIES, contrast_set, exemplar_set, make_figure, pose_joints,
                                   render_background, render_figure, training_caption)


def test_domain_size():
    assert len(SPECIES) >= 4 and len(FIGURE_COLOURS) >= 4 and len(FIGURE_BACKGROUNDS) >= 4
    assert len(ACTIONS) >= 10 and set(HELDOUT_ACTIONS) <= set(ACTIONS)
    assert not set(HELDOUT_ACTIONS) & set(SEEN_ACTIONS)


def test_deterministic_by_seed():
    a, b, c = make_figure(5), make_figure(5), make_figure(6)
    assert np.array_equal(a.image, b.image) and a.metadata() == b.metadata()
    assert not np.array_equal(a.image, c.image)
    assert a.image.shape == (128, 128, 3) and a.image.dtype == np.uint8


def test_every_species_and_action_renders_inside_the_canvas():
    rng = np.random.default_rng(0)
    for species in SPECIES:
        for action in ACTIONS:
            s = render_figure(species, "blue", "snow", action, 96, rng)
            assert s.image.shape == (96, 96, 3)
            xy = np.array(list(s.joints.values()))
            assert (xy >= 0).all() and (xy < 96).all(), (species, action)
            # the figure is drawn: plenty of body-coloured pixels
            body = np.abs(s.image.astype(int) - np.array(FIGURE_COLOURS["blue"])).sum(-1) < 60
            assert body.sum() > 150, (species, action)


def test_actions_are_different_poses_and_subjects_look_different():
    base = dict(species="cat", colour="red", background="meadow")
    imgs = {a: render_figure(action=a, rng=np.random.default_rng(1), jitter=0, **base).image.astype(int)
            for a in ACTIONS}
    for i, a in enumerate(ACTIONS):
        for b in ACTIONS[i + 1:]:
            assert np.abs(imgs[a] - imgs[b]).mean() > 1.0, (a, b)
    # jump is airborne: its feet are clearly above a standing figure's
    stand = render_figure("cat", "red", "meadow", "stand", rng=np.random.default_rng(3), jitter=0)
    jump = render_figure("cat", "red", "meadow", "jump", rng=np.random.default_rng(3), jitter=0)
    assert max(jump.joints["foot_n"][1], jump.joints["foot_f"][1]) < max(stand.joints["foot_n"][1],
                                                                          stand.joints["foot_f"][1]) - 8
    # bow bends the torso towards horizontal
    j = pose_joints("bow", "cat", 100)
    assert j["spine_angle"] > 60 and abs(pose_joints("stand", "cat", 100)["spine_angle"]) < 1
    sp = [render_figure(s, "red", "meadow", "stand", rng=np.random.default_rng(2), jitter=0).image.astype(int)
          for s in SPECIES]
    assert min(np.abs(sp[i] - sp[k]).mean() for i in range(4) for k in range(i + 1, 4)) > 1.0
    with pytest.raises(ValueError, match="unknown action"):
        render_figure("cat", "red", "meadow", "fly")


def test_heldout_actions_are_never_named_in_captions():
    rng = np.random.default_rng(0)
    heldout_words = {ACTION_VERBS[a] for a in HELDOUT_ACTIONS} | set(HELDOUT_ACTIONS)
    named_seen = 0
    for seed in range(300):
        s = make_figure(seed, 32)
        for cap in (training_caption(s, rng, 0.5), s.caption(True), s.caption(False)):
            assert not set(cap.split()) & heldout_words, cap
            assert s.species in cap and s.colour in cap and FIGURE_BACKGROUNDS[s.background] in cap
        named_seen += ACTION_VERBS[s.action] in s.caption(True)
    assert named_seen > 100  # seen actions do get named


def test_exemplars_and_contrast_sets():
    ex = exemplar_set("kick", 4)
    assert len(ex) == 4 and all(e.action == "kick" for e in ex)
    assert len({e.species for e in ex}) == 4 and len({e.subject for e in ex}) == 4
    assert [e.image.tobytes() for e in ex] == [e.image.tobytes() for e in exemplar_set("kick", 4)]
    cats = exemplar_set("kick", 4, species="cat")
    assert {e.species for e in cats} == {"cat"} and len({e.colour for e in cats}) == 4
    with pytest.raises(ValueError, match="unknown species"):
        exemplar_set("kick", 4, species="dog")
    snowy = exemplar_set("kick", 4, background="snow")
    assert {e.background for e in snowy} == {"snow"} and len({e.background for e in ex}) > 1
    # only the place changes: the same subjects as without it
    assert [e.subject for e in snowy] == [e.subject for e in ex]
    with pytest.raises(ValueError, match="unknown background"):
        exemplar_set("kick", 4, background="moon")
    c = contrast_set(ex[0].species, ex[0].colour, ex[0].background, "kick", num=3)
    assert len(c) == 3 and len({s.action for s in c}) == 3
    assert all(s.subject == ex[0].subject and s.background == ex[0].background and s.action in SEEN_ACTIONS
               for s in c)
    other = next(sp for sp in SPECIES if sp != ex[0].species)
    twins = contrast_set(ex[0].species, ex[0].colour, ex[0].background, "kick", num=3, draw_as=other)
    assert [t.action for t in twins] == [s.action for s in c] and {t.species for t in twins} == {other}
    for s, t in zip(c, twins):  # same background and draws: only the figure differs
        assert t.colour == s.colour and 0.5 < (t.image == s.image).all(-1).mean() < 1.0


def test_matte_puts_the_very_same_figure_on_another_background():
    """The matte is exact: over the render's own background it gives back the image pixel for pixel, and over
    another background every figure pixel stays while the place changes."""
    sample = render_figure("bird", "blue", "snow", "wave", rng=np.random.default_rng(5), matte=True)
    plain = render_figure("bird", "blue", "snow", "wave", rng=np.random.default_rng(5))
    assert np.array_equal(sample.image, plain.image) and plain.matte is None  # asking for it changes nothing
    own, _ = render_background("snow", 128, np.random.default_rng(5))  # the draws the render started with
    figure, alpha = sample.matte
    again = np.floor(np.clip(figure + (1 - alpha)[..., None] * own, 0, 1) * 255 + 0.5)
    assert np.array_equal(again.astype(np.uint8), sample.image)
    inside, outside = alpha > 0.999, alpha < 0.001
    assert 0.03 < inside.mean() < 0.4 and outside.mean() > 0.5
    night, _ = render_background("night", 128, np.random.default_rng(1))
    moved = np.floor(np.clip(figure + (1 - alpha)[..., None] * night, 0, 1) * 255 + 0.5)
    assert np.array_equal(moved[inside], sample.image[inside])
    assert np.abs(moved[outside] - sample.image[outside]).mean() > 60
