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

    out = run(pipe, layers=("body", "pants"), callback_on_step_end=cb)
    # every denoising step of every draw (a garment with no core is drawn again)
    assert len(calls) == 3 * sum(out.metadata["draws"]) and calls[0][2] == (1, 27, R, R)
    calls.clear()
    run(pipe, layers=("body", "pants"), callback_on_step_end=cb, compose=False)
    assert len(calls) == 6


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


def _analytic_layers(pipe, monkeypatch):
    """Replace the decoder by analytic fields: a tri-plane whose first value is j decodes as layer j.

    Layer 0: a sphere (r 0.4) plus a small floating blob at (0.8, 0.8, 0.8). Layer 1 (pants):
    the sphere plus a thicker shell on its lower half (y < -0.1) plus a detached blob at
    (-0.8, 0.8, -0.8); colours change only where the shell is."""
    def fake(triplane, points, dirs):
        j = int(round(float(triplane.flatten()[0])))
        p = points.float()
        r = p.norm(dim=-1)
        sig = 100.0 * (r < 0.4).float()
        rgb = torch.full((len(p), 3), 0.5)
        if j == 0:
            sig = sig + 100.0 * ((p - torch.tensor([0.8, 0.8, 0.8])).norm(dim=-1) < 0.1).float()
        else:
            shell = (r < 0.5) & (p[:, 1] < -0.1)
            sig = torch.maximum(sig, 100.0 * shell.float())
            rgb[shell] = torch.tensor([0.9, 0.1, 0.1])
            sig = sig + 100.0 * ((p - torch.tensor([-0.8, 0.8, -0.8])).norm(dim=-1) < 0.12).float()
        return sig, rgb

    monkeypatch.setattr(pipe, "_decode", fake)
    tps = torch.zeros(2, *pipe.plane_shape)
    tps[1].view(-1)[0] = 1.0
    return tps


def test_supports_keep_the_body_drop_floaters_and_compose_exactly(pipe, monkeypatch):
    tps = _analytic_layers(pipe, monkeypatch)
    sup = pipe.compute_supports(tps, names=("body", "pants"))
    assert sup.shape == (2, pipe.support_grid, pipe.support_grid, pipe.support_grid) and sup.dtype == torch.uint8
    pts = torch.tensor([[0.0, 0.0, 0.0],      # body centre
                        [0.0, 0.3, 0.0],      # upper body: the garment does not cover it
                        [0.0, -0.45, 0.0],    # in the lower shell (the garment)
                        [0.8, 0.8, 0.8],      # the body's floater
                        [-0.8, 0.8, -0.8]])   # the garment's detached blob
    dirs = torch.zeros_like(pts)
    dirs[:, 2] = -1.0
    m0, m1 = pipe._support_at(sup[0], pts), pipe._support_at(sup[1], pts)
    assert m0[0] == 1 and m0[3] == 0          # body kept, floater outside the body's support
    assert m1[2] == 1 and m1[1] == 0 and m1[4] == 0
    s0, c0 = pipe.compose_query(tps, sup, 0, pts, dirs)
    s1, c1 = pipe.compose_query(tps, sup, 1, pts, dirs)
    assert s0[3] == 0 and s1[4] == 0          # floaters are empty in the composed layers
    assert s1[2] == 100.0 and torch.allclose(c1[2], torch.tensor([0.9, 0.1, 0.1]))
    # outside the garment's support layer 1 is layer 0 bit for bit, everywhere on a grid
    g, gd = pipe._grid(24)
    outside = pipe._support_at(sup[1], g) == 0
    a0, b0 = pipe.compose_query(tps, sup, 0, g, gd)
    a1, b1 = pipe.compose_query(tps, sup, 1, g, gd)
    assert outside.float().mean() > 0.9
    assert torch.equal(a1[outside], a0[outside]) and torch.equal(b1[outside], b0[outside])
    assert (a1 >= a0).all()                   # a garment only adds


def test_composed_renders_unchanged_where_rays_miss_the_garment(pipe):
    out = run(pipe, layers=("body", "pants"))
    assert out.supports is not None and out.metadata["compose"] is True
    assert len(out.metadata["draws"]) == 2 and 1 <= out.metadata["draws"][1] <= pipe.garment_tries
    v0 = pipe.render_views(out, num_views=2, size=16, layer=0).astype(int)
    v1 = pipe.render_views(out, num_views=2, size=16, layer="pants").astype(int)
    assert np.array_equal(pipe.render_views(out, num_views=2, size=16), v1)       # default: the top layer
    # rays that never enter the garment's (dilated) support see exactly the same field
    from layergen.models.volume_renderer import get_rays, intrinsics, orbit_cameras, ray_box_intersect
    o, d = get_rays(orbit_cameras(2), intrinsics(16), 16, 16)
    t = torch.linspace(0, 1, 400)
    bmin, bmax = pipe.support_box(out.supports)
    near, far = ray_box_intersect(o.reshape(-1, 3), d.reshape(-1, 3), torch.tensor(bmin), torch.tensor(bmax))
    pts = o.reshape(-1, 1, 3) + d.reshape(-1, 1, 3) * (near[:, None] + (far - near).clamp_min(0)[:, None] * t)[..., None]
    big = torch.nn.functional.max_pool3d(out.supports[1].float()[None, None], 5, 1, 2)[0, 0]
    miss = (pipe._support_at(big, pts.reshape(-1, 3)).reshape(pts.shape[:2]) == 0).all(1).reshape(2, 16, 16)
    assert miss.any()
    assert np.array_equal(v0[miss.numpy()], v1[miss.numpy()])
    raw = run(pipe, layers=("body", "pants"), compose=False)
    assert raw.supports is None and raw.metadata["compose"] is False
    assert pipe.render_views(raw, num_views=1, size=8).shape == (1, 8, 8, 4)


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
        views = pipe.render_views(out, num_views=3, size=16, layer=i)
        assert np.array_equal(np.asarray(im), views[0])
        gif = Image.open(layer["gif"])
        assert gif.n_frames == 3
    tp = load_file(files["triplanes"])
    assert torch.equal(tp["triplanes"], out.triplanes) and torch.equal(tp["residuals"], out.residuals)
    assert torch.equal(tp["supports"], out.supports)
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["layers"] == ["body", "pants"] and summary["num_views"] == 3
    obj = export_human(pipe, out, tmp_path / "obj", num_views=1, size=8, mesh_resolution=16, mesh_format="obj",
                       progress=False)
    assert trimesh.load(obj["layers"][0]["mesh"], force="mesh").vertices.shape[0] > 0


def test_export_replaces_its_folder_whole_or_not_at_all(pipe, tmp_path, monkeypatch):
    """A smaller run into an earlier human's folder leaves none of the earlier files; a failed one leaves the
    earlier human as it was; a folder holding anything else is refused, not replaced."""
    folder = tmp_path / "human"
    export_human(pipe, run(pipe, layers=("body", "pants")), folder, num_views=2, size=8, mesh_resolution=16,
                 progress=False)
    assert (folder / "1_pants.glb").is_file() and (folder / "0_body" / "view_01.png").is_file()
    export_human(pipe, run(pipe, layers=("body",)), folder, num_views=1, size=8, mesh_resolution=16, progress=False)
    assert sorted(p.name for p in folder.iterdir()) == ["0_body", "0_body.gif", "0_body.glb", "summary.json",
                                                        "triplanes.safetensors"]
    assert sorted(p.name for p in (folder / "0_body").iterdir()) == ["view_00.png"]
    before = {p: p.read_bytes() for p in folder.rglob("*") if p.is_file()}

    def broken(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(pipe, "extract_mesh", broken)
    with pytest.raises(RuntimeError, match="disk full"):
        export_human(pipe, run(pipe, layers=("body", "pants")), folder, num_views=2, size=8, mesh_resolution=16,
                     progress=False)
    assert {p: p.read_bytes() for p in folder.rglob("*") if p.is_file()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["human"]  # no temporary folder left beside it
    monkeypatch.undo()
    (folder / "notes.txt").write_text("mine")
    with pytest.raises(LayergenError, match="also holds notes.txt"):
        export_human(pipe, run(pipe, layers=("body",)), folder, num_views=1, size=8, mesh_resolution=16,
                     progress=False)
    assert (folder / "notes.txt").read_text() == "mine"


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
                 ["--body", str(tmp_path / "cli" / "summary.json")], ["--steps", "0"], ["--size", "3000"],
                 ["--views", "361"], ["--mesh-resolution", "100000"]):
        rc = cli_main(["human", "--model", str(model), "-o", str(tmp_path / "bad"), *argv])
        err = capsys.readouterr().err
        assert rc == 2 and err.startswith("layergen: error:") and err.count("\n") == 1, (argv, err)
    assert not (tmp_path / "bad").exists()
    (tmp_path / "afile").write_text("x")  # refused before any sampling, not a traceback at export
    assert cli_main(["human", "--model", str(model), "--layers", "body", "-o", str(tmp_path / "afile")]) == 2
    assert "exists and is not a folder" in capsys.readouterr().err


def test_bundled_mini_model_is_the_default(tmp_path, capsys):
    """`layergen human` with no --model runs on assets/layergen-mini/human; its body (as the pipeline
    renders and meshes it: the composed layer, floaters outside the body's support dropped) is
    human-shaped."""
    from layergen.pipelines.pipeline_layered_human import default_model_path, load_pipeline

    path = default_model_path()
    assert (path / "model_index.json").is_file()
    assert sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) <= 8 * 2**20
    mini = load_pipeline()
    assert mini.plane_shape == (3, 9, 32, 32) and mini.decoder.config.use_shift
    out = mini(layers=("body",), num_inference_steps=25, generator=torch.Generator().manual_seed(0))
    lo, hi = mini.occupied_box(density=mini.layer_density_grid(out, 0, 48), pad=0.0)
    size = np.array(hi) - np.array(lo)
    assert 1.3 < size[1] < 2.0 and size[1] > 1.2 * max(size[0], size[2])  # upright, taller than wide/deep
    mesh = mini.extract_mesh(out, resolution=48, layer=0)
    ext = mesh.bounds[1] - mesh.bounds[0]
    assert 1.3 < ext[1] < 2.0 and ext[1] > 1.2 * max(ext[0], ext[2])

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


def test_any_scheduler_and_bad_arguments(pipe):
    from diffusers import UniPCMultistepScheduler

    orig = pipe.scheduler
    pipe.scheduler = UniPCMultistepScheduler.from_config(orig.config)  # its step() takes no generator
    try:
        out = pipe(layers=("body",), num_inference_steps=2, generator=torch.Generator().manual_seed(0))
    finally:
        pipe.scheduler = orig
    assert torch.isfinite(out.triplanes).all() and pipe.num_timesteps == 2
    for steps in (0, -1, 2.5, 1000):
        with pytest.raises(LayergenError, match="num_inference_steps must be an integer in"):
            pipe(layers=("body",), num_inference_steps=steps)
    with pytest.raises(LayergenError, match="NaN"):
        pipe(layers=("body",), body_triplane=torch.full(pipe.plane_shape, float("nan")))
    with pytest.raises(LayergenError, match="layer 5 is out of range for a human of 1 layers"):
        pipe.render_views(out, layer=5)
    with pytest.raises(LayergenError, match=r"num_views must be an integer in \[1, 360\]"):
        pipe.render_views(out, num_views=0)
    with pytest.raises(LayergenError, match="size must be an integer"):
        pipe.render_views(out, size=0)
