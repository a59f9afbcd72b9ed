"""LayeredHumanPipeline with tiny random components: the chain, fixed body, re-sampling, export, CLI."""
import json
import math

import numpy as np
import pytest
import torch
import trimesh
from diffusers import DDIMScheduler
from PIL import Image
from safetensors.torch import load_file

from layergen.cli import main as cli_main
from layergen.errors import LayergenError
from layergen.models.triplane import TriplaneDecoder
from layergen.models.triplane_unet import LayeredTriplaneUNet
from layergen.pipelines.pipeline_layered_human import (SURFACE_DENSITY, LayeredHumanPipeline, export_human,
                                                       generate_human)

R = 8
LAYERS = ("body", "pants", "shirt", "shoes")


@pytest.fixture(scope="module")
def pipe():
    torch.manual_seed(0)
    dec = TriplaneDecoder(plane_resolution=R, hidden_dim=16, color_hidden_dim=8)
    unet = LayeredTriplaneUNet(plane_resolution=R, block_out_channels=(8, 16), norm_num_groups=4,
                               attention_head_dim=4, sample_scales=(2.0, 0.5, 0.5, 0.5, 0.5), cond_scale=1.0)
    with torch.no_grad():  # let the (otherwise zero) side encoder matter, as after training
        for z in unet.side_zero:
            z.weight.normal_(0, 0.2)
    p = LayeredHumanPipeline(unet=unet, decoder=dec,
                             scheduler=DDIMScheduler(num_train_timesteps=100, clip_sample=False))
    p.set_progress_bar_config(disable=True)
    # centre the random decoder's density on the mesh iso-level so marching cubes finds a surface
    body = p(layers=("body",), num_inference_steps=2, generator=torch.Generator().manual_seed(0)).triplanes[0]
    med = dec.density_grid(body, 16).median() / dec.config.density_scale
    with torch.no_grad():
        target = math.log(math.expm1(SURFACE_DENSITY / dec.config.density_scale))
        dec.density_head.bias += target - math.log(math.expm1(float(med)))
    return p


def run(p, seed=0, **kw):
    kw.setdefault("layers", LAYERS)
    kw.setdefault("num_inference_steps", 3)
    return p(generator=torch.Generator().manual_seed(seed), **kw)


def test_chain_shapes_cumulative_and_deterministic(pipe):
    out = run(pipe)
    assert out.layers == list(LAYERS)
    assert out.triplanes.shape == out.residuals.shape == (4, 3, 9, R, R)
    assert torch.equal(out.triplanes[0], out.residuals[0])
    for k in range(1, 4):
        assert torch.equal(out.triplanes[k], out.triplanes[k - 1] + out.residuals[k])
    assert torch.equal(run(pipe).triplanes, out.triplanes)
    assert not torch.allclose(run(pipe, seed=1).triplanes, out.triplanes)
    assert torch.isfinite(out.triplanes).all()


def test_fixed_body_is_kept_exactly(pipe):
    body = torch.randn(3, 9, R, R, generator=torch.Generator().manual_seed(5)) * 0.3
    for keep in (True, False):
        out = run(pipe, body_triplane=body, keep_uncovered=keep)
        assert torch.equal(out.triplanes[0], body)
        assert out.metadata["given_body"] is True
    assert not torch.equal(out.triplanes[1], body)
    with pytest.raises(LayergenError):
        run(pipe, body_triplane=torch.zeros(3, 9, R + 1, R + 1))


def test_resample_one_layer_keeps_the_others(pipe):
    out = run(pipe)
    new = pipe.resample_layer(out, "shirt", generator=torch.Generator().manual_seed(9), num_inference_steps=3)
    j = LAYERS.index("shirt")
    for i in range(4):
        if i != j:
            assert torch.equal(new.residuals[i], out.residuals[i])
    assert torch.equal(new.triplanes[:j], out.triplanes[:j])
    assert not torch.equal(new.residuals[j], out.residuals[j])
    assert torch.equal(new.triplanes[3], new.triplanes[2] + out.residuals[3])
    with pytest.raises(LayergenError):
        pipe.resample_layer(out, "hat")


def test_keep_uncovered_only_zeroes_texels(pipe):
    out = run(pipe, keep_uncovered=False)
    prev, res = out.triplanes[0], out.residuals[1]
    zero, frac = pipe.keep_uncovered(prev, torch.zeros_like(res))
    assert torch.equal(zero, torch.zeros_like(res)) and frac == 0.0
    masked, frac = pipe.keep_uncovered(prev, res)
    kept = masked != 0
    assert torch.equal(masked[kept], res[kept])        # a texel is either kept as is or zeroed
    assert 0.0 <= frac <= 1.0
    # a whole texel column is kept or dropped together (the mask is per texel, shared by channels)
    assert ((masked == 0).all(1) | (masked == res).all(1)).all()


def test_callback_on_step_end(pipe):
    calls = []

    def cb(p, i, t, kw):
        calls.append((i, int(t), kw["latents"].shape))
        return kw

    run(pipe, layers=("body", "pants"), callback_on_step_end=cb)
    assert len(calls) == 6 and calls[0][2] == (1, 27, R, R)


def test_clean_density_drops_fog_and_floaters():
    clean = LayeredHumanPipeline.clean_density
    d = torch.zeros(16, 16, 16)
    d[4:12, 4:12, 4:12] = 50.0              # the subject: 512 voxels
    d[0, 0, 0] = 50.0                       # floaters: 1 and 2 voxels (< 2 % of the occupied volume)
    d[14, 14, 14:16] = 50.0
    d[2, 8, :] = 3.0                        # faint fog, under the floor
    expected = torch.zeros_like(d)
    expected[4:12, 4:12, 4:12] = 50.0
    assert torch.equal(clean(d, floor=5.0, min_component_fraction=0.02), expected)
    big = d.clone()
    big[0:3, 0:3, 0:3] = 50.0               # 27 voxels: over 2 %, a real part, kept
    assert torch.equal(clean(big, floor=5.0, min_component_fraction=0.02)[0:3, 0:3, 0:3], big[0:3, 0:3, 0:3])
    assert torch.equal(clean(d, floor=0.0, min_component_fraction=0.0), d)


def test_export_writes_valid_glb_pngs_gif_and_triplanes(pipe, tmp_path):
    out = run(pipe, layers=("body", "pants"))
    files = export_human(pipe, out, tmp_path, num_views=3, size=16, mesh_resolution=16, progress=False)
    assert len(files["layers"]) == 2
    for i, layer in enumerate(files["layers"]):
        mesh = trimesh.load(layer["mesh"], force="mesh")
        assert len(mesh.vertices) > 0 and len(mesh.faces) > 0
        colours = np.asarray(mesh.visual.vertex_colors)
        assert colours.shape == (len(mesh.vertices), 4)
        assert np.abs(mesh.vertices).max() <= 1.0 + 1e-5             # world units, inside the scene box
        assert len(layer["views"]) == 3
        im = Image.open(layer["views"][0])
        assert im.mode == "RGBA" and im.size == (16, 16)
        views = pipe.render_views(out.triplanes[i], num_views=3, size=16)
        assert np.array_equal(np.asarray(im), views[0])
        gif = Image.open(layer["gif"])
        assert gif.n_frames == 3
    tp = load_file(files["triplanes"])
    assert torch.equal(tp["triplanes"], out.triplanes) and torch.equal(tp["residuals"], out.residuals)
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["layers"] == ["body", "pants"] and summary["num_views"] == 3
    obj = export_human(pipe, out, tmp_path / "obj", num_views=1, size=8, mesh_resolution=16, mesh_format="obj",
                       progress=False)
    assert trimesh.load(obj["layers"][0]["mesh"], force="mesh").vertices.shape[0] > 0


def test_roundtrip_generate_human_and_cli(pipe, tmp_path, capsys):
    model = tmp_path / "model"
    pipe.save_pretrained(model)
    again = LayeredHumanPipeline.from_pretrained(model)
    again.set_progress_bar_config(disable=True)
    assert torch.allclose(run(again).triplanes, run(pipe).triplanes, atol=1e-4)

    files = generate_human("body,pants", seed=3, output_dir=tmp_path / "gen", model_path=model,
                           num_inference_steps=2, num_views=2, size=12, mesh_resolution=16)
    assert [l["name"] for l in files["layers"]] == ["body", "pants"]
    assert all((tmp_path / "gen" / f"{i}_{n}.glb").is_file() for i, n in enumerate(("body", "pants")))

    out_dir = tmp_path / "cli"
    rc = cli_main(["human", "--model", str(model), "--layers", "body,pants,shoes", "--seed", "3", "-o", str(out_dir),
                   "--steps", "2", "--views", "2", "--size", "12", "--mesh-resolution", "16"])
    assert rc == 0
    summary = json.loads((out_dir / "summary.json").read_text())
    assert summary["layers"] == ["body", "pants", "shoes"] and summary["seed"] == 3
    assert (out_dir / "2_shoes.gif").is_file() and (out_dir / "0_body" / "view_01.png").is_file()
    # dress the body of the first run: layer 0 identical
    rc = cli_main(["human", "--model", str(model), "--layers", "body,shirt", "--seed", "4", "-o", str(tmp_path / "d"),
                   "--steps", "2", "--views", "1", "--size", "8", "--mesh-resolution", "8",
                   "--body", str(out_dir / "triplanes.safetensors")])
    assert rc == 0
    a, b = load_file(str(out_dir / "triplanes.safetensors")), load_file(str(tmp_path / "d" / "triplanes.safetensors"))
    assert torch.equal(a["triplanes"][0], b["triplanes"][0])

    capsys.readouterr()
    for argv in (["--layers", "pants,body"], ["--layers", "body,cape"], ["--model", str(tmp_path / "nope")],
                 ["--body", str(tmp_path / "cli" / "summary.json")], ["--steps", "0"]):
        rc = cli_main(["human", "--model", str(model), "-o", str(tmp_path / "bad"), *argv])
        err = capsys.readouterr().err
        assert rc == 2 and err.startswith("layergen: error:") and err.count("\n") == 1, (argv, err)
    assert not (tmp_path / "bad").exists()


@pytest.mark.xfail(reason="open on #9: the shipped stage-2 mini samples a horizontal floater at arm height "
                          "(occupied box 2.0 wide for seed 0); needs more stage-2 training", strict=False)
def test_bundled_mini_model_is_the_default(tmp_path, capsys):
    """`layergen human` with no --model runs on assets/layergen-mini/human; its body is human-shaped."""
    from layergen.pipelines.pipeline_layered_human import default_model_path, load_pipeline

    path = default_model_path()
    assert (path / "model_index.json").is_file()
    assert sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) <= 8 * 2**20
    mini = load_pipeline()
    assert mini.plane_shape == (3, 9, 32, 32) and mini.decoder.config.use_shift
    body = mini(layers=("body",), num_inference_steps=25, generator=torch.Generator().manual_seed(0)).triplanes[0]
    lo, hi = mini.occupied_box(body, pad=0.0)
    size = np.array(hi) - np.array(lo)
    assert 1.3 < size[1] < 2.0 and size[1] > 1.2 * max(size[0], size[2])  # upright, taller than wide/deep

    rc = cli_main(["human", "--layers", "body,pants", "--seed", "3", "-o", str(tmp_path / "h"), "--steps", "2",
                   "--views", "1", "--size", "16", "--mesh-resolution", "16"])
    assert rc == 0
    summary = json.loads((tmp_path / "h" / "summary.json").read_text())
    assert summary["layers"] == ["body", "pants"] and summary["model"] == str(path)


def test_missing_bundled_model_says_what_to_pass(tmp_path, monkeypatch, capsys):
    import layergen.mini

    monkeypatch.setattr(layergen.mini, "MINI_PATH", tmp_path / "no-assets")
    rc = cli_main(["human", "-o", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert rc == 2 and "pass --model PATH" in err and err.count("\n") == 1
    assert not (tmp_path / "out").exists()
