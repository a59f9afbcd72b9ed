"""benchmarks/actions.py: the text_seen reference prompts and per-image scoring."""

import json

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


def test_unseen_subjects_can_avoid_the_exemplars_background(bench):
    exemplars = [{"species": "cat", "colour": "red"}, {"species": "bird", "colour": "blue"}]
    subjects = bench.unseen_subjects(exemplars, 40, seed=3)
    assert {s[2] for s in subjects} == set(bench.FIGURE_BACKGROUNDS)
    away = bench.unseen_subjects(exemplars, 40, seed=3, avoid_background="snow")
    assert "snow" not in {s[2] for s in away} and len({s[2] for s in away}) == 4
    assert [s[:2] for s in away] == [s[:2] for s in subjects]  # the same subjects, only the place moves
    assert not {s[:2] for s in away} & {("cat", "red"), ("bird", "blue")}


def test_identifier_cache_key_follows_the_training_config(bench, tmp_path):
    trainer = bench.training_script()

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
    one_place = bench.parse_args(["--identifier_dir", str(tmp_path), "--exemplar_background", "same"])
    assert bench.identifier_cache_path(one_place, "jump", "adi", parsed("--steps", "300")) not in (path, None)
    cut = bench.parse_args(["--identifier_dir", str(tmp_path), "--restage_matte", "cut_out"])
    assert bench.identifier_cache_path(cut, "jump", "adi", parsed("--steps", "300")) == path  # no restaging
    restaged = parsed("--steps", "300", "--restage", "train")
    assert bench.identifier_cache_path(cut, "jump", "adi", restaged) != bench.identifier_cache_path(args, "jump", "adi",
                                                                                                     restaged)
    assert bench.identifier_cache_path(bench.parse_args([]), "jump", "adi", parsed("--steps", "300")) is None
    new_default = parsed("--steps", "300")  # the training script's default changed, the benchmark's flags did not
    new_default.mask_momentum = 0.5
    assert bench.identifier_cache_path(args, "jump", "adi", new_default) != path
    # a trainer flag added later keeps the keys of files learned before it existed, at its default only
    before_flag = parsed("--steps", "300")
    for name in bench.TRAINER_ADDED:
        delattr(before_flag, name)
    assert bench.identifier_cache_path(args, "jump", "adi", before_flag) == path
    assert bench.identifier_cache_path(args, "jump", "adi", parsed("--steps", "300", "--restage", "mask")) != path


def test_an_actions_exemplars_do_not_depend_on_the_other_actions_run(bench):
    """`--actions kick` draws the exemplars and subjects the full run drew for kick (the cache is keyed by name)."""
    for flags in ([], ["--exemplar_background", "same"], ["--exemplar_species", "same"]):
        full, alone = bench.parse_args(flags), bench.parse_args([*flags, "--actions", "kick"])
        ex_full, subjects_full = bench.action_setup(full, 3, "kick", full.actions.index("kick"), 32)
        ex_alone, subjects_alone = bench.action_setup(alone, 3, "kick", 0, 32)
        assert subjects_alone == subjects_full and all(e["matte"] is not None for e in ex_full)
        assert all(np.array_equal(a["image"], b["image"]) for a, b in zip(ex_alone, ex_full))
    one_place = bench.parse_args(["--exemplar_background", "same"])
    places = {bench.action_setup(one_place, 3, a, 0, 32)[0][0]["background"] for a in HELDOUT_ACTIONS}
    assert len(places) == len(HELDOUT_ACTIONS)  # one background per action, whatever the position


def test_apart_reference_moves_the_one_place_figures_only(bench, tmp_path):
    """`adi_no_mask_apart` learns from the one-place exemplars' very figures, each in its own place, and is scored on
    the same prompts: only the backgrounds differ, so it is a paired reference for what the shared place adds."""
    args = bench.parse_args(["--exemplar_background", "same", "--methods", "adi_eigen", "adi_no_mask_apart"])
    for action in ("jump", "kick"):
        one, subjects = bench.action_setup(args, 3, action, 0, 32)
        apart, subjects_apart = bench.action_setup(args, 3, action, 0, 32, apart=True)
        assert subjects_apart == subjects
        assert len({e["background"] for e in one}) == 1 and len({e["background"] for e in apart}) == 4
        assert np.array_equal(apart[0]["image"], one[0]["image"])
        for a, b in zip(one[1:], apart[1:]):
            alpha = a["matte"][1]
            assert not np.array_equal(a["image"], b["image"])
            assert np.array_equal(a["image"][alpha > 0.999], b["image"][alpha > 0.999])  # the same figure
            assert (a["species"], a["colour"]) == (b["species"], b["colour"]) and b["background"] in b["caption"]
    trainer_args = bench.training_script().parse_args(["--name", "<kick>", "--output_dir", "."])
    args.identifier_dir = str(tmp_path)
    assert bench.identifier_cache_path(args, "kick", "adi_no_mask_apart", trainer_args) != \
        bench.identifier_cache_path(args, "kick", "adi_no_mask", trainer_args)
    assert "adi_no_mask_apart" not in bench.parse_args([]).methods
    with pytest.raises(SystemExit):
        bench.parse_args(["--methods", "adi_no_mask_apart"])


def _cell(action_ok, subject_ok, poses):
    n = len(action_ok)
    joint = [int(a and b) for a, b in zip(action_ok, subject_ok)]
    return {"action_acc": sum(action_ok) / n, "subject_acc": sum(subject_ok) / n, "joint_acc": sum(joint) / n,
            "species_acc": sum(subject_ok) / n, "colour_acc": 1.0, "leak": 0.0, "poses": poses, "seconds": 1.0,
            "correct": {"action": list(action_ok), "subject": list(subject_ok), "joint": joint}}



def test_scene_judge_scores_the_prompts_background(bench):
    images = np.zeros((4, 8, 8, 3), np.float32)
    subjects = [("cat", "red", "snow"), ("bird", "blue", "beach"), ("frog", "green", "room"), ("robot", "red", "night")]
    pose = FakeJudge(action=["jump"] * 4)
    subj = FakeJudge(species=["cat", "bird", "frog", "robot"], colour=["red", "blue", "green", "red"])
    scene = FakeJudge(background=["snow", "meadow", "room", "snow"])
    r = bench.score(images, subjects, set(), "jump", pose, subj, scene)
    assert r["background_acc"] == 0.5 and r["correct"]["background"] == [1, 0, 1, 0]
    assert "background_acc" not in bench.score(images, subjects, set(), "jump", pose, subj)
    # pooled and paired only where every cell has it: runs scored without a scene judge still pool
    cell = bench.score(images, subjects, set(), "jump", pose, subj, scene) | {"seconds": 1.0}
    other = bench.score(images, subjects, set(), "jump", pose, subj, FakeJudge(background=["snow"] * 4))
    per_seed = {0: {"adi": {"jump": cell}, "ti": {"jump": other | {"seconds": 1.0}}}}
    summary, _ = bench.pool(per_seed, ["adi", "ti"], ["jump"])
    assert summary["adi"]["background_acc"] == 0.5 and summary["ti"]["background_acc"] == 0.25
    pairs = bench.paired(per_seed, "adi", "ti", ["jump"])["background"]
    assert (pairs["only_adi"], pairs["only_ti"]) == (1, 0)  # image 2 (room) only adi; image 0 (snow) both
    plain = {k: v for k, v in cell.items() if k not in ("background_acc", "in_place_acc")}
    plain["correct"] = {k: v for k, v in cell["correct"].items() if k not in ("background", "in_place")}
    mixed = {0: {"adi": {"jump": plain}, "ti": {"jump": other | {"seconds": 1.0}}}}
    assert "background_acc" not in bench.pool(mixed, ["adi", "ti"], ["jump"])[0]["adi"]
    assert "background" not in bench.paired(mixed, "adi", "ti", ["jump"])

def test_action_in_the_prompts_place_counts_both_in_one_image(bench):
    images = np.zeros((4, 8, 8, 3), np.float32)
    subjects = [("cat", "red", "snow"), ("bird", "blue", "beach"), ("frog", "green", "room"), ("robot", "red", "night")]
    pose = FakeJudge(action=["jump", "jump", "sit", "jump"])
    subj = FakeJudge(species=["cat", "bird", "frog", "robot"], colour=["red", "blue", "green", "red"])
    scene = FakeJudge(background=["snow", "meadow", "room", "night"])
    r = bench.score(images, subjects, set(), "jump", pose, subj, scene)
    assert r["correct"]["in_place"] == [1, 0, 0, 1] and r["in_place_acc"] == 0.5
    # a cell stored before the score existed gets it when merged (derived from its per-image results)
    old = {k: v for k, v in r.items() if k != "in_place_acc"} | {"seconds": 1.0}
    old["correct"] = {k: v for k, v in r["correct"].items() if k != "in_place"}
    assert bench.add_in_place(old)["correct"]["in_place"] == [1, 0, 0, 1] and old["in_place_acc"] == 0.5
    none = bench.score(images, subjects, set(), "jump", pose, subj)
    assert "in_place" not in bench.add_in_place(none)["correct"]  # no scene judge, no place


def test_seeds_pool_image_by_image_and_pair_the_methods(bench):
    per_seed = {
        0: {"adi": {"jump": _cell([1, 1, 0, 0], [1, 1, 1, 0], {"jump": 2, "sit": 2})},
            "ti": {"jump": _cell([0, 0, 0, 0], [1, 1, 1, 1], {"sit": 4})}},
        1: {"adi": {"jump": _cell([1, 1, 1, 1], [1, 0, 1, 1], {"jump": 4})},
            "ti": {"jump": _cell([1, 0, 0, 0], [1, 1, 1, 1], {"jump": 1, "run": 3})}},
    }
    summary, per_action = bench.pool(per_seed, ["adi", "ti"], ["jump"])
    assert summary["adi"]["action_acc"] == 6 / 8 and summary["ti"]["subject_acc"] == 1.0
    assert summary["adi"]["joint_acc"] == 5 / 8
    assert per_action["adi"]["jump"]["poses"] == {"jump": 6, "sit": 2} and per_action["adi"]["jump"]["seconds"] == 2.0
    pairs = bench.paired(per_seed, "adi", "ti", ["jump"])
    assert pairs["action"]["only_adi"] == 5 and pairs["action"]["only_ti"] == 0 and pairs["action"]["images"] == 8
    assert pairs["subject"]["only_adi"] == 0 and pairs["subject"]["only_ti"] == 2
    assert pairs["action"]["p"] == 0.0625  # 5 of 5 discordant pairs one way: 2 / 2^5
    assert pairs["subject"]["p"] == 0.5  # 2 of 2: 2 / 2^2
    split = bench.subject_by_action(per_seed, "adi", ["jump"])  # adi: action 1 1 0 0 1 1 1 1, subject 1 1 1 0 1 0 1 1
    assert split == {"with_action": 5 / 6, "images_with_action": 6, "without_action": 0.5, "images_without_action": 2}
    assert bench.subject_by_action(per_seed, "ti", ["jump"])["images_with_action"] == 1


def test_sign_test_p_values(bench):
    assert bench.sign_test_p(0, 0) == 1.0
    assert bench.sign_test_p(3, 3) == 1.0
    assert bench.sign_test_p(10, 0) == 2 / 2 ** 10
    assert abs(bench.sign_test_p(2, 7) - 2 * (1 + 9 + 36) / 512) < 1e-12
    assert bench.sign_test_p(7, 2) == bench.sign_test_p(2, 7)


def test_several_seeds_parse(bench):
    assert bench.parse_args([]).seed == [0]
    assert bench.parse_args(["--seed", "0", "1", "2"]).seed == [0, 1, 2]


def test_paired_difference_interval(bench):
    # 4 images: a right where b is wrong twice, never the reverse -> +50 points
    per_seed = {0: {"a": {"jump": _cell([1, 1, 1, 0], [1] * 4, {})}, "b": {"jump": _cell([1, 0, 0, 0], [1] * 4, {})}}}
    act = bench.paired(per_seed, "a", "b", ["jump"])["action"]
    assert act["difference_points"] == 50.0
    half = 1.96 * np.sqrt((2 / 4 - 0.25) / 4)  # Wald, paired proportions
    assert act["ci95_points"] == [round(100 * (0.5 - half), 2), round(100 * (0.5 + half), 2)]
    subj = bench.paired(per_seed, "a", "b", ["jump"])["subject"]  # identical: a zero-width interval at 0
    assert subj["difference_points"] == 0.0 and subj["ci95_points"] == [0.0, 0.0]


def _report(bench, seeds, methods=("adi", "ti"), **config):
    per_seed = {s: {"adi": {"jump": _cell([1, s % 2, 0, 1], [1, 1, 0, 1], {"jump": 2})},
                    "ti": {"jump": _cell([0, 0, 1, 0], [1, 1, 1, 1], {"sit": 4})},
                    "base": {"jump": _cell([0, 0, 0, 0], [1, 1, 1, 1], {"sit": 4})}} for s in seeds}
    per_seed = {s: {m: r[m] for m in methods} for s, r in per_seed.items()}
    cfg = {"methods": list(methods), "actions": ["jump"], "num_exemplars": 4, "steps": 600, "num_images": 4,
           "seed": list(seeds), "identifier_steps": 0.7, "identifier_dir": "runs/x", **config}
    return json.loads(json.dumps(bench.build_report(cfg, {"learning_rate": 0.05}, {}, per_seed)))  # as on disk


def test_merged_seeds_score_like_one_run(bench):
    one_run = _report(bench, [0, 1, 2])
    merged = bench.merge_reports([_report(bench, [0, 1], methods=("adi", "ti", "base"), identifier_dir="a"),
                                  _report(bench, [2], identifier_dir="b")])
    assert merged["config"]["seed"] == [0, 1, 2] and merged["config"]["methods"] == ["adi", "ti"]
    for key in ("summary", "verdict", "paired", "subject_by_action", "per_action", "per_seed"):
        assert merged[key] == one_run[key], key
    assert merged["paired"]["adi_vs_ti"]["action"]["images"] == 12
    interval = merged["paired"]["adi_vs_ti"]["subject"]["ci95_points"]
    assert merged["verdict"]["adi_minus_ti_subject_ci95_points"] == interval
    # other methods on the same seeds join them
    split = bench.merge_reports([_report(bench, [0, 1, 2], methods=("adi",)),
                                 _report(bench, [0, 1, 2], methods=("ti",))])
    for key in ("summary", "verdict", "paired", "per_seed"):
        assert split[key] == one_run[key], key


def test_merge_refuses_other_configs_and_repeated_seeds(bench):
    with pytest.raises(ValueError, match="differ in config.*identifier_steps"):
        bench.merge_reports([_report(bench, [0]), _report(bench, [1], identifier_steps=1.0)])
    with pytest.raises(ValueError, match="seed 0 of adi is in more than one run"):
        bench.merge_reports([_report(bench, [0]), _report(bench, [0, 1])])
    with pytest.raises(ValueError, match="differ in config.*exemplar_background"):
        bench.merge_reports([_report(bench, [0]), _report(bench, [1], exemplar_background="same")])
    # runs saved before the flag existed had distinct backgrounds
    assert bench.merge_reports([_report(bench, [0]), _report(bench, [1], exemplar_background="distinct")])
    other = _report(bench, [1])
    other["identifier_training"]["learning_rate"] = 0.02
    with pytest.raises(ValueError, match="differ in identifier_training"):
        bench.merge_reports([_report(bench, [0]), other])
    # trainer settings added later: absent means their default, another value is another config
    newer = _report(bench, [1])
    newer["identifier_training"].update(bench.TRAINER_ADDED)
    assert bench.merge_reports([_report(bench, [0]), newer])
    newer["identifier_training"]["restage"] = "mask"
    with pytest.raises(ValueError, match="differ in identifier_training.*restage"):
        bench.merge_reports([_report(bench, [0]), newer])



def test_merge_keeps_the_judges_every_run_had(bench):
    """A run scored with the (later) scene judge merges with one scored without it: the shared judges must match,
    and the merged report has only their scores, exactly as if no run had had the scene judge."""
    judges = {"pose": {"heldout_accuracy": {"action": 0.99}}, "subject": {"heldout_accuracy": {"species": 0.99}}}

    def run(seeds, scene=None, pose=0.99):
        per_seed = {s: {"adi": {"jump": _cell([1, s % 2, 0, 1], [1, 1, 0, 1], {"jump": 2})},
                        "ti": {"jump": _cell([0, 0, 1, 0], [1, 1, 1, 1], {"sit": 4})}} for s in seeds}
        clf = json.loads(json.dumps(judges))
        clf["pose"]["heldout_accuracy"]["action"] = pose
        if scene is not None:
            clf["scene"] = {"heldout_accuracy": {"background": 1.0}}
            for cells in per_seed.values():
                for by_action in cells.values():
                    by_action["jump"]["background_acc"] = sum(scene) / len(scene)
                    by_action["jump"]["correct"]["background"] = list(scene)
        cfg = {"methods": ["adi", "ti"], "actions": ["jump"], "num_exemplars": 4, "steps": 600, "num_images": 4,
               "seed": list(seeds), "identifier_steps": 0.7}
        return json.loads(json.dumps(bench.build_report(cfg, {"learning_rate": 0.05}, clf, per_seed)))

    with_scene = run([1], scene=[1, 0, 1, 1])
    assert with_scene["summary"]["adi"]["background_acc"] == 0.75 and "background" in with_scene["paired"]["adi_vs_ti"]
    merged = bench.merge_reports([run([0]), with_scene])
    plain = bench.merge_reports([run([0]), run([1])])
    assert merged["classifiers"] == judges == plain["classifiers"]
    for key in ("summary", "verdict", "paired"):
        assert merged[key] == plain[key], key
    assert "background_acc" not in merged["summary"]["adi"]
    with pytest.raises(ValueError, match="differ in classifiers"):  # a shared judge that changed still refuses
        bench.merge_reports([run([0]), run([1], scene=[1, 1, 1, 1], pose=0.9)])

def test_merge_cli_writes_the_pooled_report(bench, tmp_path):
    for name, seeds in (("a.json", [0, 1]), ("b.json", [2])):
        (tmp_path / name).write_text(json.dumps(_report(bench, seeds)))
    out = tmp_path / "all.json"
    report = bench.main(["--merge", str(tmp_path / "a.json"), str(tmp_path / "b.json"), "--out", str(out)])
    on_disk = json.loads(out.read_text())
    assert on_disk["config"]["seed"] == [0, 1, 2] and on_disk["summary"] == report["summary"]
    assert on_disk["config"]["merged_from"][1].endswith("b.json")


def test_merge_cli_rejects_unusable_files(bench, tmp_path, capsys):
    good = tmp_path / "a.json"
    good.write_text(json.dumps(_report(bench, [0])))
    (tmp_path / "other.json").write_text(json.dumps({"benchmark": "codec"}))
    (tmp_path / "broken.json").write_text("{not json")
    (tmp_path / "steps.json").write_text(json.dumps(_report(bench, [1], steps=300)))
    for name, message in (("other.json", "not an actions benchmark report"), ("broken.json", "cannot read"),
                          ("missing.json", "cannot read"), ("steps.json", "differ in config")):
        with pytest.raises(SystemExit) as exit_info:
            bench.main(["--merge", str(good), str(tmp_path / name), "--out", str(tmp_path / "out.json")])
        assert exit_info.value.code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "out.json").exists()


def test_cut_out_exemplars_carry_no_matte(bench):
    """--restage_matte cut_out: the trainer must cut the figures out itself, as from a user's photos."""
    args = bench.parse_args(["--restage_matte", "cut_out", "--exemplar_background", "same"])
    exemplars, _ = bench.action_setup(args, 0, "wave", 1, 32)
    assert all(e["matte"] is None for e in exemplars) and {e["background"] for e in exemplars} == {"beach"}
