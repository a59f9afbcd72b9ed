import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def start(tmp_path_factory):
    from layergen.pipelines import MultiLayerPipeline
    from layergen.testing import tiny_layer_components

    d = tmp_path_factory.mktemp("start") / "pipe"
    MultiLayerPipeline(**tiny_layer_components()).save_pretrained(d)
    return d


def train(start, out, steps, *extra):
    cmd = [sys.executable, str(ROOT / "training" / "train_multilayer.py"), "--pretrained", str(start),
           "--output_dir", str(out), "--resolution", "32", "--num_samples", "12", "--num_replay", "4",
           "--train_batch_size", "3", "--max_train_steps", str(steps), "--checkpointing_steps", "2",
           "--validation_steps", "2", "--validation_inference_steps", "1", "--replay_prob", "0.5", "--use_ema",
           *extra]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    return res


def test_region_samples_match_the_pipeline_crop(start):
    from layergen.pipelines.pipeline_multilayer import region_crop

    sys.path.insert(0, str(ROOT / "training"))
    try:
        from train_multilayer import parse_args, region_sample
    finally:
        sys.path.pop(0)
    from layergen.data.scenes import make_scene

    args = parse_args(["--pretrained", "x", "--output_dir", "y", "--fill_min", "0.65", "--fill_max", "0.65",
                       "--min_region_size", "0"])
    shape, cond, target, caption = region_sample(5, 128, 8, args)
    scene = make_scene(5, 128, num_objects=(1, 4))
    assert caption in [o.caption for o in scene.objects]
    obj = next(o for o in scene.objects if o.caption == caption)
    x0, y0, x1, y1 = obj.box
    from layergen.layout import Box

    (cx, cy, cw, ch), _ = region_crop(Box(x0, y0, x1 - x0, y1 - y0), 128, 128, 8, "region", 0.65)
    assert shape == (ch, cw) and cond.shape == (ch, cw, 3) and target.shape == (ch, cw, 4)
    assert cw % 8 == 0 and ch % 8 == 0
    inside = obj.rgba[max(cy, 0):cy + ch, max(cx, 0):cx + cw]
    assert np.array_equal(target[max(0, -cy):max(0, -cy) + inside.shape[0],
                                 max(0, -cx):max(0, -cx) + inside.shape[1]], inside)
    assert target[..., 3].sum() == obj.rgba[..., 3].sum(), "the crop holds the whole object"
    args.min_region_size = 128  # the default: small crops are trained at the pipeline's working size
    shape, cond, target, _ = region_sample(5, 128, 8, args)
    assert max(shape) == 128 and cond.shape[:2] == target.shape[:2] == shape


@pytest.mark.slow  # two training subprocesses: about 100 s on the shared 2-core machine
def test_finetunes_saves_a_loadable_pipeline_and_resumes(start, tmp_path):
    out = tmp_path / "run"
    train(start, out, 2)
    assert (out / "checkpoint-2").is_dir() and (out / "validation-2.png").is_file()
    from layergen.pipelines import MultiLayerPipeline

    pipe = MultiLayerPipeline.from_pretrained(out / "pipeline")
    pipe.set_progress_bar_config(disable=True)
    stack = pipe("a red star on a sky", layout=[(2, 2, 12, 12)], num_inference_steps=1, seed=0, tta=False,
                 output_type="stack").stacks[0]
    assert len(stack) == 2 and stack[1].bbox == (2, 2, 14, 14)
    res = train(start, out, 4, "--resume_from_checkpoint", "latest")
    assert "resumed from" in res.stdout + res.stderr
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]
    pipe2 = MultiLayerPipeline.from_pretrained(out / "pipeline")
    assert not np.allclose(pipe.unet.conv_in.weight.detach().numpy(), pipe2.unet.conv_in.weight.detach().numpy())
