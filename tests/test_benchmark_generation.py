"""benchmarks/generation.py end to end on a tiny random pipeline (--n 2), plus its prompt set."""
import json

import pytest

from layergen.data.scenes import HELDOUT_COMBINATIONS, HELDOUT_SEED_START
from layergen.pipelines import TransparentLayerPipeline
from layergen.testing import tiny_layer_components


@pytest.fixture(scope="module")
def bench(load_benchmark):
    return load_benchmark("generation")


def test_prompt_set_is_held_out_deterministic_and_covers_unseen_pairs(bench):
    specs = bench.build_prompts(100)
    assert specs == bench.build_prompts(100)
    assert len({s["prompt"] for s in specs}) == 100
    assert all(s["seed"] >= HELDOUT_SEED_START for s in specs)
    unseen = [s for s in specs if s["unseen"]]
    assert {(s["shape"], s["colour"]) for s in unseen} == set(HELDOUT_COMBINATIONS)
    assert 25 <= len(unseen) <= 40
    assert {s["material"] for s in specs} == {"solid", "glass"} and {s["effect"] for s in specs} == {
        "none", "shadow", "glow"}
    for s in specs[:5]:  # captions are the training grammar and name what is scored
        assert s["colour"] in s["prompt"] and s["shape"] in s["prompt"]
    assert [s["unseen"] for s in bench.build_prompts(2)] == [False, True]


def test_runs_end_to_end_on_a_tiny_model_and_writes_json(bench, tmp_path, capsys):
    model = tmp_path / "tiny"
    TransparentLayerPipeline(**tiny_layer_components()).save_pretrained(model)
    out = tmp_path / "generation.json"
    bench.main(["--model", str(model), "--n", "2", "--size", "32", "--steps", "2", "--no-tta", "--warmup", "0",
                "--output", str(out)])
    table = capsys.readouterr().out
    for row in ("overall", "seen", "unseen", "reference", "done bar"):
        assert row in table
    result = json.loads(out.read_text())
    assert set(result) >= {"settings", "summary", "prompts", "rows", "reference_rows", "done_bar"}
    settings = result["settings"]
    assert (settings["model"], settings["n"], settings["size"], settings["steps"], settings["seed_start"]) == (
        str(model), 2, 32, 2, HELDOUT_SEED_START)
    assert len(result["prompts"]) == 2 and [r["prompt"] for r in result["rows"]] == result["prompts"]
    summary = result["summary"]
    assert summary["seen"]["n"] == 1 and summary["unseen"]["n"] == 1
    for key in ("shape_accuracy", "colour_accuracy", "alpha_cleanliness", "fringe_black", "fringe_white",
                "seconds_per_image"):
        assert key in summary["overall"]
    assert summary["overall"]["seconds_per_image"] > 0
    # the analyser recognises the renderer's own layers: the reference row is perfect
    assert summary["reference"]["shape_accuracy"] == 1.0 and summary["reference"]["colour_accuracy"] == 1.0
    assert set(result["done_bar"]["pass"]) == {"shape_accuracy>=0.80", "colour_accuracy>=0.90",
                                               "seconds_per_image<=5"}
