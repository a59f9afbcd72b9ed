"""benchmarks/finetune.py end to end on a tiny random pipeline (2 LoRA steps, 2 denoising steps), plus its data."""
import json

import numpy as np
import pytest

from layergen.data.scenes import EXTRA_SHAPES, HELDOUT_COMBINATIONS, HELDOUT_SEED_START, SHAPES
from layergen.pipelines import TransparentLayerPipeline
from layergen.testing import tiny_layer_components


@pytest.fixture(scope="module")
def bench(load_benchmark):
    return load_benchmark("finetune")


def test_training_data_and_eval_prompts(bench, tmp_path):
    rows = bench.write_training_data(tmp_path / "d", ["hexagon"], 24, 32, replay=4)
    assert len(rows) == 28 and sum(r["shape"] == "hexagon" for r in rows) == 24
    assert {r["text"].split()[1] for r in rows[:24]} >= {"red", "blue", "teal", "grey"}   # colours cycle
    assert all("hexagon" in r["text"] for r in rows[:24]) and all(r["shape"] in SHAPES for r in rows[24:])
    assert len((tmp_path / "d" / "metadata.jsonl").read_text().splitlines()) == 28
    specs = bench.eval_specs(["hexagon"], 2, 3)
    assert specs == bench.eval_specs(["hexagon"], 2, 3)
    new = [s for s in specs if s["group"] == "new"]
    assert len(new) == 24 and {s["prompt"] for s in new} >= {"a red hexagon", "an orange hexagon"}
    orig = [s for s in specs if s["group"] == "original"]
    assert len(orig) == 24 and {s["shape"] for s in orig} == set(SHAPES)
    assert not any((s["shape"], s["colour"]) in HELDOUT_COMBINATIONS for s in orig)
    assert all(s["seed"] >= HELDOUT_SEED_START for s in specs) and len({s["seed"] for s in specs}) == len(specs)
    assert "hexagon" in EXTRA_SHAPES


def test_reference_layers_separate_hexagons_from_circles(bench):
    """The strict margin is calibrated on the renderer: every true hexagon passes it, no true circle does."""
    specs = [s for s in bench.eval_specs(["hexagon"], 1, 3) if s["shape"] in ("hexagon", "circle")]
    rows = bench.reference_rows(specs, 128, ["hexagon"])
    hexes = [r for r in rows if r["shape"] == "hexagon"]
    circles = [r for r in rows if r["shape"] == "circle"]
    assert all(r["pred_shape"] == "hexagon" and r["new_shape_margin"] >= bench.STRICT_MARGIN for r in hexes)
    assert all(r["pred_shape"] == "circle" and r["new_shape_margin"] < 0 for r in circles)


def test_end_to_end_on_a_tiny_model(bench, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("TQDM_DISABLE", "1")
    model = tmp_path / "tiny"
    TransparentLayerPipeline(**tiny_layer_components()).save_pretrained(model)
    out = tmp_path / "finetune.json"
    result = bench.main(["--model", str(model), "--num_images", "4", "--size", "32", "--steps", "2",
                         "--batch_size", "2", "--learning_rate", "0.05", "--replay", "2", "--eval_seeds", "1",
                         "--orig_colours", "1", "--num_inference_steps", "2",
                         "--work_dir", str(tmp_path / "work"), "--output", str(out)])
    text = capsys.readouterr().out
    assert "hexagon rate" in text and "original-shape accuracy drop" in text and "done bar" in text
    saved = json.loads(out.read_text())
    assert saved["summary"] == json.loads(json.dumps(result["summary"]))
    assert (tmp_path / "work" / "lora" / "pytorch_lora_weights.safetensors").is_file()
    s = saved["summary"]
    assert s["before"]["n_new"] == 12 and s["before"]["n_original"] == 8 and s["before"]["n_circle"] == 1
    assert s["reference"]["new_shape_rate"] >= 0.9   # rendered hexagons (at 32 px one of 12 reads otherwise)
    assert s["original_accuracy_drop_points"] == pytest.approx(
        100 * (s["before"]["original_shape_accuracy"] - s["after"]["original_shape_accuracy"]), abs=0.01)
    assert saved["settings"]["eval_seed_start"] == bench.EVAL_SEED_START and saved["settings"]["steps"] == 2
    before = [(r["pred_shape"], r["new_shape_margin"]) for r in saved["rows"]["before"]]
    after = [(r["pred_shape"], r["new_shape_margin"]) for r in saved["rows"]["after"]]
    assert len(before) == len(after) == 20 and before != after     # the LoRA changed what the model draws
    assert all(isinstance(m, float) or m is None for _, m in before) and np.isfinite(s["before"]["new_shape_rate"])
    from PIL import Image

    figure = np.asarray(Image.open(tmp_path / "finetune.png"))
    assert figure.shape == (2 * 32, 12 * 32, 3)                    # before row over after row, one per colour
    assert not np.array_equal(figure[:32], figure[32:])
    # the first tile is the first new-shape prompt before fine-tuning, as the pipeline draws it, over a checkerboard
    import torch

    from layergen.training_utils import rgba_preview

    spec = bench.eval_specs(["hexagon"], 1, 1)[0]
    pipe = TransparentLayerPipeline.from_pretrained(model)
    pipe.set_progress_bar_config(disable=True)
    first = pipe([spec["prompt"]], generator=[torch.Generator().manual_seed(spec["seed"])], num_inference_steps=2,
                 guidance_scale=5.0, height=32, width=32).images[0]
    assert np.array_equal(figure[:32, :32], rgba_preview(np.asarray(first, np.float32) / 255.0))
