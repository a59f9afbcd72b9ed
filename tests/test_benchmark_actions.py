"""benchmarks/actions.py: the text_seen reference prompts and per-image scoring."""

import numpy as np
import pytest

from layergen.data.figures import HELDOUT_ACTIONS, SEEN_ACTIONS, make_figure


@pytest.fixture(scope="module")
def bench(load_benchmark):
    return load_benchmark("actions")


def test_seen_verb_caption_is_the_training_caption(bench):
    for k, action in enumerate(SEEN_ACTIONS):
        fig = make_figure(k, 32, action=action)
        assert bench.seen_verb_caption(fig.species, fig.colour, fig.background, action) == fig.caption(with_action=True)
    for action in HELDOUT_ACTIONS:  # their verbs were never in a training caption
        with pytest.raises(ValueError, match="not a seen action"):
            bench.seen_verb_caption("cat", "red", "snow", action)


class FakeJudge:
    def __init__(self, **out):
        self.out = out

    def predict(self, images):
        return self.out


def test_score_per_image_actions(bench):
    images = np.zeros((4, 8, 8, 3), np.float32)
    subjects = [("cat", "red", "snow"), ("bird", "blue", "beach"), ("frog", "green", "room"), ("robot", "red", "night")]
    pose = FakeJudge(action=["sit", "run", "run", "jump"])
    subj = FakeJudge(species=["cat", "bird", "cat", "robot"], colour=["red", "blue", "green", "red"])
    r = bench.score(images, subjects, {("robot", "red")}, ["sit", "run", "stand", "run"], pose, subj)
    assert r["action_acc"] == 0.5 and r["species_acc"] == 0.75 and r["subject_acc"] == 0.75 and r["leak"] == 0.25
    assert r["joint_acc"] == 0.5  # images 0 and 1: the wanted pose on the prompt's subject
    r = bench.score(images, subjects, set(), ["sit", "run", "run", "run"], pose, subj)
    # action 3/4 (not image 3), subject 3/4 (not image 2): both right in only 2 of 4 images
    assert (r["action_acc"], r["subject_acc"], r["joint_acc"]) == (0.75, 0.75, 0.5)
    assert bench.score(images, subjects, set(), "run", pose, subj)["action_acc"] == 0.5


def test_identifier_cache_key_follows_the_training_config(bench, tmp_path):
    trainer = bench.load_training_module()

    def parsed(*extra):
        return trainer.parse_args(["--name", "<jump-adi>", "--output_dir", ".", *extra])

    args = bench.parse_args(["--identifier_dir", str(tmp_path)])
    path = bench.identifier_cache_path(args, "jump", "adi", parsed("--steps", "300"))
    assert path.parent == tmp_path and path.name.startswith("jump-adi-")
    assert bench.identifier_cache_path(args, "jump", "adi", parsed("--steps", "300")) == path
    assert bench.identifier_cache_path(args, "jump", "adi", parsed("--steps", "600")) != path
    # where the outputs go is not part of the identifier
    moved = parsed("--steps", "300")
    moved.output_dir, moved.output = str(tmp_path / "elsewhere"), str(tmp_path / "x.safetensors")
    assert bench.identifier_cache_path(args, "jump", "adi", moved) == path
    same = bench.parse_args(["--identifier_dir", str(tmp_path), "--exemplar_species", "same"])
    assert bench.identifier_cache_path(same, "jump", "adi", parsed("--steps", "300")) != path
    assert bench.identifier_cache_path(bench.parse_args([]), "jump", "adi", parsed("--steps", "300")) is None
    new_default = parsed("--steps", "300")  # the training script's default changed, the benchmark's flags did not
    new_default.mask_momentum = 0.5
    assert bench.identifier_cache_path(args, "jump", "adi", new_default) != path
