import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from layergen.data.figures import exemplar_set
from layergen.models.action_identifier import ActionIdentifier, cross_attention_layers
from layergen.pipelines.pipeline_action import ActionPipeline
from layergen.testing import tiny_scheduler, tiny_text_encoder, tiny_tokenizer, tiny_unet, tiny_vae

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "training" / "train_action_identifier.py"


def tiny_pipe():
    torch.manual_seed(0)
    pipe = ActionPipeline(vae=tiny_vae(), text_encoder=tiny_text_encoder(32), tokenizer=tiny_tokenizer(),
                          unet=tiny_unet(4, 32, None), scheduler=tiny_scheduler())
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    d = tmp_path_factory.mktemp("action")
    tiny_pipe().save_pretrained(d / "pipe")
    ex = d / "exemplars"
    ex.mkdir()
    rows = []
    for k, s in enumerate(exemplar_set("jump", 3, size=32)):
        Image.fromarray(s.image).save(ex / f"{k}.png")
        rows.append(json.dumps({"file_name": f"{k}.png", **s.metadata()}))
    (ex / "metadata.jsonl").write_text("\n".join(rows) + "\n")
    return d


def script_args(parts, out, steps, *extra):
    return ["--pretrained_model_name_or_path", str(parts / "pipe"), "--exemplars", str(parts / "exemplars"),
            "--name", "jump", "--output_dir", str(out), "--initializer_token", "star", "--num_exemplars", "3",
            "--train_batch_size", "2", "--steps", str(steps), "--checkpointing_steps", "1",
            "--checkpoints_total_limit", "2", "--validation_steps", "2", "--num_validation_images", "1", *extra]


def test_adi_script_trains_saves_loads_and_resumes(parts, tmp_path, capsys):
    out = tmp_path / "run"
    mask = ("--mask_quantile", "0.5", "--contrast", "render", "--num_contrast", "2")
    res = subprocess.run([sys.executable, str(SCRIPT), *script_args(parts, out, 2, *mask)], capture_output=True,
                         text=True, timeout=300)  # as a script, the way accelerate launch runs it
    assert res.returncode == 0, res.stderr[-3000:]
    assert (out / "validation-2.png").is_file()
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-1", "checkpoint-2"]
    ident = ActionIdentifier.load(out / "jump.safetensors")
    pipe = ActionPipeline.from_pretrained(parts / "pipe")
    assert ident.kind == "layerwise" and ident.token == "<jump>"
    assert list(ident.config.layer_names) == cross_attention_layers(pipe.unet)
    assert ident.config.base_model and ident.extra_metadata["mask_quantile"] == "0.5"
    # the identifier moved from its initialisation (all rows start equal), differently per layer
    emb = ident.embeddings
    assert not torch.allclose(emb[0], emb[1])
    pipe.load_action_identifier(out / "jump.safetensors")
    img = pipe("a red <jump>", num_inference_steps=2, seed=0).images[0]
    assert img.mode == "RGB" and img.size == (32, 32)

    load_script().main(script_args(parts, out, 3, "--resume_from_checkpoint", "latest", *mask))
    assert "resumed from" in capsys.readouterr().out
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-3"]
    resumed = ActionIdentifier.load(out / "jump.safetensors")
    assert not torch.equal(resumed.embeddings, emb)


def load_script():
    spec = importlib.util.spec_from_file_location("train_action_identifier_under_test", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_triple_draws_pair_distinct_exemplars_and_contrast_comes_last():
    """Partners are always another exemplar, picks index the anchor's own contrast list, and drawing the
    contrast pick last keeps the rest of a step's draws identical with and without contrast images."""
    draw = load_script().draw_triples
    sizes = [1, 2, 5]
    with_ct = draw(torch.Generator().manual_seed(3), 64, 3, (4, 2, 2), 1000, "focal", sizes)
    plain = draw(torch.Generator().manual_seed(3), 64, 3, (4, 2, 2), 1000, "focal")
    assert plain.pick is None and len(with_ct.pick) == 64
    assert (with_ct.anchor != with_ct.partner).all()
    assert all(0 <= k < sizes[a] for a, k in zip(with_ct.anchor.tolist(), with_ct.pick))
    assert len({k for a, k in zip(with_ct.anchor.tolist(), with_ct.pick) if a == 2}) > 1
    for a, b in zip(with_ct[:4], plain[:4]):
        assert torch.equal(a, b)
    assert with_ct.noise.shape == (64, 4, 2, 2) and ((with_ct.t >= 0) & (with_ct.t < 1000)).all()


def test_restaged_copies_show_the_subject_in_other_places(parts, tmp_path):
    """Exemplars shot in one place: each gets copies of its own figure (exact matte) on other backgrounds, with
    captions naming the new place; none when off or when only an absent mask would use them; photos need
    backgrounds."""
    mod = load_script()
    base = ["--name", "jump", "--output_dir", str(tmp_path)]
    args = mod.parse_args([*base, "--restage", "mask", "--num_restaged", "2"])
    ex = exemplar_set("jump", 3, size=32, background="snow", matte=True)
    exemplars = [{"image": s.image, "caption": s.caption(), "matte": s.matte, **s.metadata()} for s in ex]
    restaged = mod.build_restaged(args, exemplars, 32)
    assert [len(c) for c in restaged] == [2, 2, 2]
    for e, copies in zip(exemplars, restaged):
        alpha = e["matte"][1]
        inside, outside = alpha > 0.999, alpha < 0.001
        assert len({c["caption"] for c in copies}) == 2
        for c in copies:
            assert f"{e['colour']} {e['species']}" in c["caption"] and "snow" not in c["caption"]
            assert np.array_equal(c["image"][inside], e["image"][inside])
            assert np.abs(c["image"][outside].astype(int) - e["image"][outside]).mean() > 20
    for flags in ([], ["--restage", "mask", "--mask_quantile", "0"]):
        assert mod.build_restaged(mod.parse_args([*base, *flags]), exemplars, 32) == [[], [], []]
    trained = mod.build_restaged(mod.parse_args([*base, "--restage", "train", "--mask_quantile", "0"]), exemplars, 32)
    assert [len(c) for c in trained] == [3, 3, 3]
    photos = [{"image": e["image"], "caption": "a photo"} for e in exemplars]
    with pytest.raises(mod.LayergenError, match="--restage_backgrounds"):
        mod.build_restaged(args, photos, 32)
    with pytest.raises(mod.LayergenError, match="no background images"):
        mod.build_restaged(mod.parse_args([*base, "--restage", "mask", "--restage_backgrounds", str(tmp_path)]),
                           photos, 32)
    places = tmp_path / "places"
    places.mkdir()
    Image.new("RGB", (40, 24), (200, 30, 30)).save(places / "red.png")
    with_places = mod.parse_args([*base, "--restage", "mask", "--restage_backgrounds", str(places)])
    [[copy]] = mod.build_restaged(with_places, photos[:1], 32)  # one place: one copy
    assert copy["caption"] == "a photo" and copy["image"].shape == (32, 32, 3)
    (places / "broken.jpg").write_bytes(b"not an image")
    with pytest.raises(mod.LayergenError, match="broken.jpg: cannot decode image"):
        mod.build_restaged(mod.parse_args([*base, "--restage", "mask", "--restage_backgrounds", str(places),
                                           "--num_restaged", "2"]), photos[:1], 32)


def test_contrast_dir_pairs_files_with_exemplars_by_name(tmp_path):
    """--contrast dir: `<stem>*.png` belong to that exemplar; none at all is a clear error, as is a corrupt file."""
    mod = load_script()
    folder = tmp_path / "contrast"
    folder.mkdir()
    for name, rgb in (("a-sit.png", (255, 0, 0)), ("a-run.png", (0, 255, 0)), ("b-sit.png", (0, 0, 255))):
        Image.new("RGB", (20, 20), rgb).save(folder / name)
    args = mod.parse_args(["--name", "jump", "--output_dir", str(tmp_path), "--contrast", "dir", "--contrast_dir",
                           str(folder)])
    exemplars = [{"stem": "a", "caption": "x"}, {"stem": "b"}, {"stem": "c"}]
    a, b, c = mod.build_contrast(args, exemplars, None, 8)
    assert [im["image"][0, 0].tolist() for im in a] == [[0, 255, 0], [255, 0, 0]] and a[0]["caption"] == "x"
    assert [im["image"][0, 0].tolist() for im in b] == [[0, 0, 255]] and c == [] and a[0]["image"].shape == (8, 8, 3)
    with pytest.raises(mod.LayergenError, match="no image named after an exemplar"):
        mod.build_contrast(args, [{"stem": "z"}], None, 8)
    (folder / "z.png").write_bytes(b"not an image")
    with pytest.raises(mod.LayergenError, match="z.png: cannot decode image"):
        mod.build_contrast(args, [{"stem": "z"}], None, 8)


def test_cut_out_finds_the_figure_in_a_photo_like_exemplar(capsys):
    """No matte (a user's photo): the automatic cut-out must find the subject, not the sky or the ground; and
    pymatting's retry notice (it prints one for the room robot) stays out of the CLI's output."""
    cut_out = load_script().cut_out
    sample = exemplar_set("jump", 1, background="night", matte=True)[0]
    _, alpha = cut_out(sample.image)
    truth, found = sample.matte[1] > 0.5, alpha > 0.5
    assert (truth & found).sum() / (truth | found).sum() > 0.8
    capsys.readouterr()
    for room in exemplar_set("jump", 2, background="room"):
        cut_out(room.image)
    assert "WARNING" not in capsys.readouterr().out


def _whole_image_matte_exemplars():
    """Exemplars whose 'matte' covers the whole image: their restaged copies are the exemplars themselves."""
    ex = exemplar_set("jump", 3, size=32, matte=True)
    return [{"image": s.image, **s.metadata(), "matte": (s.image / 255.0, np.ones((32, 32), np.float32))}
            for s in ex]


def _restage_args(mod, out, restage, *extra):
    return mod.parse_args(["--name", "jump", "--output_dir", str(out), "--initializer_token", "star", "--template",
                           "a {token}", "--num_exemplars", "3", "--steps", "2", "--restage", restage,
                           "--validation_steps", "0", "--checkpointing_steps", "100", "--train_batch_size", "2",
                           *extra])


def test_the_mask_compares_each_anchor_with_its_restaged_self(parts, tmp_path, monkeypatch):
    """With --restage mask the mask's context sample is the anchor's own copy. A matte that covers the whole image
    makes that copy the anchor itself, so the context difference the mask sees must be exactly zero (with exemplar
    partners it is not), while the update still moves the identifier."""
    mod = load_script()
    seen = []
    original = mod.GradientInvarianceMasker.update

    def spy(self, g_anchor, g_context, g_action=None):
        seen.append(float((g_anchor - g_context).abs().max()))
        return original(self, g_anchor, g_context, g_action)

    monkeypatch.setattr(mod.GradientInvarianceMasker, "update", spy)
    pipe = ActionPipeline.from_pretrained(parts / "pipe")
    pipe.set_progress_bar_config(disable=True)
    for restage in ("mask", "off"):
        args = _restage_args(mod, tmp_path / restage, restage, "--contrast", "render", "--num_contrast", "1")
        ident = mod.train(args, pipe=pipe, exemplars=_whole_image_matte_exemplars(), show_progress=False)
        assert not torch.allclose(ident.embeddings[0], ident.embeddings[1])
        assert ident.extra_metadata["restage"] == restage
    assert len(seen) == 4
    assert max(seen[:2]) < 1e-6 < min(seen[2:])


@pytest.mark.parametrize("restage", ["train", "mask", "off"])
def test_only_restage_train_adds_the_copies_to_the_update(parts, tmp_path, monkeypatch, restage):
    """The update is the mean gradient of anchors and exemplar partners, plus the restaged copies with `train`
    (here without a mask, so a `mask` run builds no copies at all)."""
    mod = load_script()
    grads, updates = [], []
    original_grads, original_step = mod.per_sample_grads, mod.masked_step

    def grads_spy(*a, **k):
        loss, grad = original_grads(*a, **k)
        grads.append(grad.clone())
        return loss, grad

    def step_spy(optimizer, param, keep):
        updates.append(param.grad.detach().clone())
        original_step(optimizer, param, keep)

    monkeypatch.setattr(mod, "per_sample_grads", grads_spy)
    monkeypatch.setattr(mod, "masked_step", step_spy)
    pipe = ActionPipeline.from_pretrained(parts / "pipe")
    pipe.set_progress_bar_config(disable=True)
    mod.train(_restage_args(mod, tmp_path, restage, "--mask_quantile", "0"), pipe=pipe,
              exemplars=_whole_image_matte_exemplars(), show_progress=False)
    for grad, update in zip(grads, updates):
        g = grad.view(-1, 2, *grad.shape[1:])
        assert len(g) == (3 if restage == "train" else 2)
        assert torch.allclose(update, g.mean(dim=(0, 1)), atol=1e-7)


def test_masked_channels_never_move_during_training(parts, tmp_path):
    """Quantile 0.5 with per-step masks: every step, the masked half of each row keeps its value."""
    mod = load_script()
    args = mod.parse_args(["--name", "jump", "--output_dir", str(tmp_path), "--initializer_token", "star",
                           "--num_exemplars", "3", "--steps", "3", "--mask_quantile", "0.5", "--contrast", "render",
                           "--num_contrast", "1", "--validation_steps", "0", "--checkpointing_steps", "100",
                           "--train_batch_size", "2"])
    pipe = ActionPipeline.from_pretrained(parts / "pipe")
    pipe.set_progress_bar_config(disable=True)
    exemplars = mod.read_exemplars(parts / "exemplars", 3, 32)
    history = []
    original = mod.masked_step

    def spy(optimizer, param, keep):
        before = param.detach().clone()
        original(optimizer, param, keep)
        history.append((before, param.detach().clone(), keep.clone()))

    mod.masked_step = spy
    ident = mod.train(args, pipe=pipe, exemplars=exemplars, show_progress=False)
    assert len(history) == 3
    for before, after, keep in history:
        assert (~keep).sum(-1).tolist() == [16] * ident.num_rows  # half of 32 channels per layer
        assert torch.equal(after[~keep], before[~keep])
        assert (after[keep] != before[keep]).float().mean() > 0.9
    assert (tmp_path / "jump.safetensors").is_file()


def test_eigen_mask_trains_and_freezes_its_directions(parts, tmp_path, monkeypatch):
    """--mask_basis eigen: each step freezes round(quantile * D) directions of every row, and the identifier does
    not move along them."""
    mod = load_script()
    args = mod.parse_args(["--name", "jump", "--output_dir", str(tmp_path), "--initializer_token", "star",
                           "--num_exemplars", "3", "--steps", "2", "--mask_quantile", "0.1", "--mask_basis", "eigen",
                           "--contrast", "render", "--num_contrast", "1", "--validation_steps", "0",
                           "--checkpointing_steps", "100", "--train_batch_size", "2"])
    pipe = ActionPipeline.from_pretrained(parts / "pipe")
    pipe.set_progress_bar_config(disable=True)
    exemplars = mod.read_exemplars(parts / "exemplars", 3, 32)
    history, original = [], mod.masked_step

    def spy(optimizer, param, freeze):
        before = param.detach().clone()
        original(optimizer, param, freeze)
        history.append((before, param.detach().clone(), freeze.clone()))

    monkeypatch.setattr(mod, "masked_step", spy)
    ident = mod.train(args, pipe=pipe, exemplars=exemplars, show_progress=False)
    assert len(history) == 2
    assert mod.parse_args(["--name", "j", "--output_dir", ".", "--mask_basis", "eigen"]).mask_quantile == 0.02
    with pytest.raises(SystemExit):  # a norm cap rescales whole channels: it would move frozen directions
        mod.parse_args(["--name", "j", "--output_dir", ".", "--mask_basis", "eigen", "--max_norm_ratio", "2"])
    for before, after, freeze in history:
        assert freeze.shape == (ident.num_rows, 32, 3)  # round(0.1 * 32) directions per layer
        assert torch.einsum("rdk,rd->rk", freeze, after - before).abs().max() < 1e-5
        assert (after - before).norm(dim=-1).min() > 0


def test_textual_inversion_and_shared_token_variants(parts, tmp_path):
    mod = load_script()
    pipe = ActionPipeline.from_pretrained(parts / "pipe")
    pipe.set_progress_bar_config(disable=True)
    exemplars = mod.read_exemplars(parts / "exemplars", 3, 32)
    common = ["--output_dir", str(tmp_path), "--initializer_token", "star", "--num_exemplars", "3", "--steps", "2",
              "--validation_steps", "0", "--checkpointing_steps", "100", "--train_batch_size", "2"]
    ti = mod.train(mod.parse_args(["--name", "ti", "--method", "textual_inversion", *common]), pipe=pipe,
                   exemplars=exemplars, show_progress=False)
    assert ti.kind == "input" and ti.embeddings.shape == (1, 32)
    star = pipe.tokenizer("star", add_special_tokens=False).input_ids[0]
    assert not torch.allclose(ti.embeddings[0], pipe.text_encoder.get_input_embeddings().weight[star])
    shared = mod.train(mod.parse_args(["--name", "one", "--shared_token", "--mask_quantile", "0", *common]),
                       pipe=pipe, exemplars=exemplars, show_progress=False)
    assert shared.kind == "shared" and shared.embeddings.shape == (1, 32)
    for name in ("ti", "one"):
        pipe.load_action_identifier(tmp_path / f"{name}.safetensors")
    out = pipe(["a red <ti>", "a red <one>"], num_inference_steps=2, seed=0, output_type="np").images
    assert out.shape == (2, 32, 32, 3) and np.abs(out[0].astype(int) - out[1].astype(int)).mean() > 0
    with pytest.raises(SystemExit):
        mod.parse_args(["--name", "x", "--output_dir", "o", "--method", "textual_inversion", "--shared_token"])


@pytest.mark.parametrize("template", ["a {token}", "{caption} {token}"])
def test_textual_inversion_shared_prompt_encoding_keeps_the_mean_gradient(parts, template):
    """Without a mask, TI encodes each distinct prompt once: same losses, same mean gradient."""
    mod = load_script()
    pipe = ActionPipeline.from_pretrained(parts / "pipe")
    args = mod.parse_args(["--name", "ti", "--output_dir", "unused", "--method", "textual_inversion",
                           "--initializer_token", "star", "--template", template])
    ident = ActionIdentifier.for_unet(pipe.unet, "<ti>", kind="input", initializer="star",
                                      embedding_dim=pipe.text_encoder.get_input_embeddings().embedding_dim)
    states = mod.TextStates(pipe, ident)
    with torch.no_grad():
        ident.embeddings.copy_(states.initial_vector(["a <ti>"])[None] + 0.1)
    exemplars = mod.read_exemplars(parts / "exemplars", 3, 32)
    prompts = [mod.prompt_for(args.template, e.get("caption"), "<ti>") for e in exemplars] * 2
    latents = mod.encode_images(pipe, [e["image"] for e in exemplars] * 2)
    torch.manual_seed(1)
    noise, t = torch.randn_like(latents), torch.tensor([100, 400, 700, 900, 50, 999])
    from diffusers import DDPMScheduler

    sched = DDPMScheduler.from_config(pipe.scheduler.config)
    loss_a, g_a = mod.per_sample_grads(pipe, ident, states, latents, prompts, noise, t, sched, 32, per_sample=True)
    loss_b, g_b = mod.per_sample_grads(pipe, ident, states, latents, prompts, noise, t, sched, 32, per_sample=False)
    torch.testing.assert_close(loss_b, loss_a, rtol=1e-5, atol=1e-7)
    assert g_a.abs().mean() > 0
    torch.testing.assert_close(g_b.mean(0), g_a.mean(0), rtol=1e-4, atol=1e-8)
    if template == "a {token}":  # one distinct prompt: the whole gradient sits in its first sample
        assert torch.count_nonzero(g_b[1:]) == 0


def test_focal_timesteps_favour_the_noisy_steps_as_the_default():
    """p(t) ~ 1 - 0.5 cos(pi t / T): mean T (1/2 + 1/pi^2) ~ 0.60 T, the noisiest tenth drawn ~2.9x the cleanest."""
    mod = load_script()
    assert mod.parse_args(["--name", "j", "--output_dir", "o"]).timestep_sampling == "focal"
    n, T = 40000, 1000
    focal = mod.sample_timesteps(n, T, "focal", torch.Generator().manual_seed(0)).float()
    uniform = mod.sample_timesteps(n, T, "uniform", torch.Generator().manual_seed(0)).float()
    assert 0 <= focal.min() and focal.max() < T
    assert abs(focal.mean() / T - (0.5 + 1 / np.pi ** 2)) < 0.01 and abs(uniform.mean() / T - 0.5) < 0.01
    ratio = (focal >= 0.9 * T).float().mean() / (focal < 0.1 * T).float().mean()
    assert 2.6 < ratio < 3.3
