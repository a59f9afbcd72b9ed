import numpy as np
import pytest
import torch
from diffusers import UNet2DConditionModel
from diffusers.models.attention_processor import AttnProcessor2_0

from layergen.errors import FormatError, LayergenError
from layergen.models.action_identifier import (ActionIdentifier, GradientInvarianceMasker, IdentifierAttnProcessor,
                                               cross_attention_layers, identifier_masks, install_identifier_processors,
                                               limit_row_norms, masked_step, quantile_keep_mask, substitute_identifiers,
                                               uninstall_identifier_processors)
from layergen.pipelines.pipeline_action import DEFAULT_IDENTIFIER_STEPS, ActionPipeline
from layergen.testing import tiny_scheduler, tiny_text_encoder, tiny_tokenizer, tiny_unet, tiny_vae


def sd15_like_unet():
    """SD 1.5's block layout (16 cross-attention layers) at toy width."""
    torch.manual_seed(0)
    return UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(8, 8, 16, 16),
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        cross_attention_dim=24, norm_num_groups=4, attention_head_dim=4)


def sdxl_like_unet():
    """SDXL's layout: no attention in the first block, several transformer blocks per attention."""
    torch.manual_seed(0)
    return UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(8, 16, 16),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 2, 2), cross_attention_dim=24, norm_num_groups=4, attention_head_dim=4,
        addition_embed_type="text_time", addition_time_embed_dim=8, projection_class_embeddings_input_dim=12 + 48)


def capture_key_inputs(unet):
    """Record what every cross-attention layer's to_k sees (= its text states after routing)."""
    seen = {}
    modules = dict(unet.named_modules())
    for name in cross_attention_layers(unet):
        modules[name].to_k.register_forward_pre_hook(
            lambda m, a, name=name: seen.__setitem__(name, a[0].detach().clone()))
    return seen


@pytest.mark.parametrize("make,expected", [(sd15_like_unet, 16), (sdxl_like_unet, 22),
                                           (lambda: tiny_unet(4, 24, None), 4)])
def test_every_cross_attention_layer_receives_its_own_token(make, expected):
    unet = make()
    layers = cross_attention_layers(unet)
    assert len(layers) == len(set(layers)) == expected
    ident = ActionIdentifier.for_unet(unet, "<jump>")
    with torch.no_grad():
        ident.embeddings.copy_(torch.randn(ident.embeddings.shape))
    router = install_identifier_processors(unet)
    procs = unet.attn_processors
    assert sum(isinstance(p, IdentifierAttnProcessor) for p in procs.values()) == len(layers)
    assert all(isinstance(p, AttnProcessor2_0) for k, p in procs.items() if ".attn1." in k)  # SDPA kept

    seen = capture_key_inputs(unet)
    states = torch.randn(2, 6, 24)
    mask = torch.zeros(2, 6, dtype=torch.bool)
    mask[1, 3] = True  # sample 0 plays the unconditional branch: no identifier there
    kwargs = {}
    if unet.config.addition_embed_type == "text_time":
        kwargs["added_cond_kwargs"] = {"text_embeds": torch.randn(2, 12), "time_ids": torch.zeros(2, 6)}
    with torch.no_grad(), router.bind(ident, mask):
        unet(torch.randn(2, 4, 8, 8), 10, encoder_hidden_states=states, **kwargs)
    assert set(seen) == set(layers)
    for name in layers:
        got = seen[name]
        assert torch.equal(got[1, 3], ident.embeddings[ident.row_of(name)]), name
        assert torch.equal(got[0], states[0]) and torch.equal(got[1, :3], states[1, :3])
        assert torch.equal(got[1, 4:], states[1, 4:])
    # every layer had a distinct vector, i.e. none was reused from a neighbour (the call-order bug)
    vecs = torch.stack([seen[n][1, 3] for n in layers])
    assert torch.unique(vecs, dim=0).shape[0] == len(layers)

    # without a binding the processors are transparent; uninstall restores the originals
    seen.clear()
    with torch.no_grad():
        unet(torch.randn(2, 4, 8, 8), 10, encoder_hidden_states=states, **kwargs)
    assert all(torch.equal(seen[n], states) for n in layers)
    uninstall_identifier_processors(unet)
    assert not any(isinstance(p, IdentifierAttnProcessor) for p in unet.attn_processors.values())


def test_shared_identifier_gives_every_layer_the_same_vector():
    unet = sd15_like_unet()
    ident = ActionIdentifier.for_unet(unet, "<jump>", kind="shared")
    assert ident.embeddings.shape == (1, 24)
    with torch.no_grad():
        ident.embeddings.normal_()
    router = install_identifier_processors(unet)
    seen = capture_key_inputs(unet)
    mask = torch.zeros(1, 5, dtype=torch.bool)
    mask[0, 2] = True
    with torch.no_grad(), router.bind(ident, mask):
        unet(torch.randn(1, 4, 8, 8), 10, encoder_hidden_states=torch.randn(1, 5, 24))
    assert all(torch.equal(v[0, 2], ident.embeddings[0]) for v in seen.values()) and len(seen) == 16


def test_per_sample_override_gives_per_sample_gradients():
    unet = tiny_unet(4, 24, None)
    ident = ActionIdentifier.for_unet(unet, "<jump>")
    router = install_identifier_processors(unet)
    override = torch.randn(3, ident.num_rows, 24, requires_grad=True)
    mask = torch.zeros(3, 5, dtype=torch.bool)
    mask[:, 1] = True
    x = torch.randn(3, 4, 8, 8)
    with router.bind(ident, mask, override):
        out = unet(x, 10, encoder_hidden_states=torch.randn(3, 5, 24)).sample
    out[0].pow(2).sum().backward()  # only sample 0's loss
    assert override.grad[0].abs().sum() > 0
    assert torch.count_nonzero(override.grad[1:]) == 0


def test_masked_adamw_step_does_not_move_masked_channels():
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(2, 8))
    opt = torch.optim.AdamW([p], lr=0.1, weight_decay=0.5)
    p.grad = torch.randn(2, 8)
    opt.step()  # builds momentum in every channel
    keep = torch.zeros(2, 8, dtype=torch.bool)
    keep[:, ::2] = True
    before = p.detach().clone()
    p.grad = torch.randn(2, 8)
    masked_step(opt, p, keep)
    assert torch.equal(p[~keep], before[~keep])  # bit-exact
    assert (p[keep] != before[keep]).all()

    # the pitfall it avoids: zeroing the gradient alone still moves them (momentum + decay)
    q = torch.nn.Parameter(before.clone())
    opt2 = torch.optim.AdamW([q], lr=0.1, weight_decay=0.5)
    q.grad = torch.randn(2, 8)
    opt2.step()
    frozen = q.detach().clone()
    q.grad = torch.randn(2, 8) * keep
    opt2.step()
    assert (q[~keep] != frozen[~keep]).all()


def test_row_norm_cap_rescales_only_kept_channels():
    torch.manual_seed(0)
    p = torch.randn(3, 8) * 4
    keep = torch.zeros(3, 8, dtype=torch.bool)
    keep[:, :5] = True
    before = p.clone()
    frozen_norm = before[:, 5:].norm(dim=-1)
    target = float(frozen_norm[1] + 0.5 * (before[1].norm() - frozen_norm[1]))
    # row 0 under its cap; row 2's frozen part exceeds it
    caps = torch.tensor([1e6, target, 0.5 * float(frozen_norm[2])])
    limit_row_norms(p, caps, keep)
    assert torch.equal(p[~keep], before[~keep])  # masked channels never move
    assert torch.equal(p[0], before[0])
    assert p[1].norm() == pytest.approx(target, rel=1e-5)
    assert torch.equal(p[2, :5], torch.zeros(5))  # kept part shrinks as far as it can
    q = before.clone()
    limit_row_norms(q, torch.full((3,), 2.0))  # no mask: plain rescale
    assert torch.allclose(q.norm(dim=-1), torch.full((3,), 2.0))


def test_gradient_invariance_mask_keeps_action_channels():
    torch.manual_seed(0)
    n, rows, dim = 4, 2, 8
    base = torch.randn(n, rows, dim)
    ctx = base.clone()
    ctx[..., :4] += 3 * torch.randn(n, rows, 4)  # channels 0-3 react to the subject/background
    act = base.clone()
    act[..., 4:] += 3 * torch.randn(n, rows, 4)  # channels 4-7 react to the action
    masker = GradientInvarianceMasker(rows, dim, quantile=0.5)
    keep = masker.update(base, ctx, act)
    assert keep.tolist() == [[False] * 4 + [True] * 4] * rows
    # context pairs alone still find the context-sensitive channels
    keep_ctx_only = GradientInvarianceMasker(rows, dim, quantile=0.5).update(base, ctx, None)
    assert keep_ctx_only[:, :4].sum() == 0 and keep_ctx_only[:, 4:].all()
    assert quantile_keep_mask(torch.randn(3, 10), 0.0).all()
    assert (~quantile_keep_mask(torch.randn(3, 10), 0.3)).sum(-1).tolist() == [3, 3, 3]
    with pytest.raises(LayergenError):
        GradientInvarianceMasker(1, 4, quantile=1.0)
    # momentum: a second, contradicting step only partly overrides the first
    m = GradientInvarianceMasker(rows, dim, quantile=0.5, momentum=0.9)
    m.update(base, ctx, act)
    keep2 = m.update(base, act, ctx)
    assert keep2.tolist() == keep.tolist()


def test_eigen_mask_freezes_the_context_direction_and_nothing_along_it_moves():
    """The eigen basis finds a context direction that is not a channel, and AdamW (momentum, decay) never moves
    the identifier along it; the other directions still move."""
    torch.manual_seed(0)
    n, rows, dim = 64, 2, 8
    ctx_dir = torch.nn.functional.normalize(torch.ones(dim), dim=0)  # spread over every channel
    act_dir = torch.nn.functional.normalize(torch.tensor([1.0, -1.0] * 4), dim=0)  # orthogonal to it
    base = torch.randn(n, rows, dim)
    ctx = base + 3 * torch.randn(n, rows, 1) * ctx_dir + 0.1 * torch.randn(n, rows, dim)
    act = base + 3 * torch.randn(n, rows, 1) * act_dir + 0.1 * torch.randn(n, rows, dim)
    masker = GradientInvarianceMasker(rows, dim, quantile=1 / dim, basis="eigen")
    freeze = masker.update(base, ctx, act)
    assert freeze.shape == (rows, dim, 1)
    assert (freeze[..., 0] @ ctx_dir).abs().min() > 0.99
    assert (freeze[..., 0] @ act_dir).abs().max() < 0.05

    p = torch.nn.Parameter(torch.randn(rows, dim))
    opt = torch.optim.AdamW([p], lr=0.1, weight_decay=0.5)
    p.grad = torch.randn(rows, dim)
    opt.step()  # momentum along every direction
    for _ in range(3):
        before = p.detach().clone()
        p.grad = torch.randn(rows, dim)
        masked_step(opt, p, freeze)
        moved = p.detach() - before
        assert torch.einsum("rdk,rd->rk", freeze, moved).abs().max() < 1e-6
        assert moved.norm(dim=-1).min() > 0.1
    with pytest.raises(LayergenError, match="basis"):
        GradientInvarianceMasker(1, 4, basis="rotated")


def test_prompt_substitution_and_masks():
    tok = tiny_tokenizer()
    unet = tiny_unet(4, 24, None)
    ident = ActionIdentifier.for_unet(unet, "<jump>", initializer="star")
    texts, spans = substitute_identifiers(["a red <jump>", "<jump> and a blue circle", "a green ring"],
                                          {"<jump>": ident})
    assert texts == ["a red star", "star and a blue circle", "a green ring"]
    masks = identifier_masks(tok, texts, spans, 16)["<jump>"]
    assert masks.shape == (3, 16)
    assert masks[0].nonzero().flatten().tolist() == [3] and masks[1].nonzero().flatten().tolist() == [1]
    assert not masks[2].any()
    with pytest.raises(LayergenError, match="<run>.*not loaded"):
        substitute_identifiers(["a cat <run>"], {"<jump>": ident})
    with pytest.raises(LayergenError, match="token limit"):
        identifier_masks(tok, ["a " * 20 + "star"], [[("<jump>", 40, 44)]], 16)


def tiny_pipe(unet=None):
    torch.manual_seed(0)
    pipe = ActionPipeline(vae=tiny_vae(), text_encoder=tiny_text_encoder(32), tokenizer=tiny_tokenizer(),
                          unet=unet or tiny_unet(4, 32, None), scheduler=tiny_scheduler())
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_pipeline_routes_identifier_in_conditional_branch_only(tmp_path):
    pipe = tiny_pipe()
    ident = ActionIdentifier.for_unet(pipe.unet, "<jump>", initializer="star")
    with torch.no_grad():
        ident.embeddings.normal_(0, 3)
    plain = pipe("a red star", num_inference_steps=2, seed=0, output_type="np").images
    path = ident.save(tmp_path / "jump.safetensors")
    pipe.load_action_identifier(path)
    seen = {}
    name = cross_attention_layers(pipe.unet)[0]

    def first_key_input(module, args):  # returns None: observe, never replace
        seen.setdefault("k", args[0].detach().clone())

    dict(pipe.unet.named_modules())[name].to_k.register_forward_pre_hook(first_key_input)
    out = pipe("a red <jump>", num_inference_steps=2, seed=0, output_type="np").images
    assert out.shape == (1, 32, 32, 3) and out.dtype == np.uint8
    # same text, same seed: only the identifier differs
    assert np.abs(out.astype(int) - plain.astype(int)).mean() > 0.5
    k = seen["k"]  # [unconditional, conditional]
    assert k.shape[0] == 2
    row = ident.embeddings[ident.row_of(name)]
    assert torch.allclose(k[1, 3], row) and not torch.allclose(k[0, 3], row)
    # an identifier in the negative prompt is routed in the unconditional half instead
    seen.clear()
    pipe("a red star", negative_prompt="<jump>", num_inference_steps=1, seed=0, output_type="np")
    assert torch.allclose(seen["k"][0, 1], row) and not torch.allclose(seen["k"][1, 1], row)
    with pytest.raises(LayergenError, match="<walk>"):
        pipe("a red <walk>", num_inference_steps=1)
    pipe.unload_action_identifier()
    again = pipe("a red star", num_inference_steps=2, seed=0, output_type="np").images
    assert np.array_equal(again, plain)


def test_identifier_survives_an_attention_backend_swap_after_loading():
    """`enable_xformers_memory_efficient_attention()` / `set_attn_processor(...)` after loading replaces every
    processor, wrappers included: the next call wraps the new ones again, so the identifier still acts, through
    the chosen backend, and unloading leaves that backend in place."""
    from diffusers.models.attention_processor import AttnProcessor

    pipe = tiny_pipe()
    ident = ActionIdentifier.for_unet(pipe.unet, "<jump>", initializer="star")
    with torch.no_grad():
        ident.embeddings.normal_(0, 3)
    pipe.load_action_identifier(ident)
    sdpa = pipe("a red <jump>", num_inference_steps=2, seed=0, output_type="latent").images
    pipe.unet.set_attn_processor(AttnProcessor())  # what the xformers switch does, with its own processor
    assert not any(isinstance(p, IdentifierAttnProcessor) for p in pipe.unet.attn_processors.values())
    swapped = pipe("a red <jump>", num_inference_steps=2, seed=0, output_type="latent").images
    torch.testing.assert_close(swapped, sdpa, atol=1e-4, rtol=1e-4)
    procs = pipe.unet.attn_processors
    wrapped = [p for p in procs.values() if isinstance(p, IdentifierAttnProcessor)]
    assert len(wrapped) == len(cross_attention_layers(pipe.unet))
    assert all(type(p.base) is AttnProcessor for p in wrapped)
    pipe.unload_action_identifier()
    assert all(type(p) is AttnProcessor for p in pipe.unet.attn_processors.values())
    plain = pipe("a red star", num_inference_steps=2, seed=0, output_type="latent").images
    assert (plain - swapped).abs().mean() > 1e-3  # the identifier did act on the swapped backend


def test_identifier_file_roundtrip_and_other_unet_fails_clearly(tmp_path):
    pipe = tiny_pipe()
    ident = ActionIdentifier.for_unet(pipe.unet, "<jump>", initializer="star", base_model="mini-action")
    with torch.no_grad():
        ident.embeddings.normal_()
    path = ident.save(tmp_path / "jump.safetensors")
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    assert meta["format"] == "layergen-action-identifier" and meta["base_model"] == "mini-action"
    assert meta["layer_names"].count("attn2") == 4 and meta["unet_fingerprint"] == ident.config.unet_fingerprint
    back = ActionIdentifier.load(path)
    assert torch.equal(back.embeddings, ident.embeddings) and back.token == "<jump>"
    assert back.config.layer_names == ident.config.layer_names

    other_arch = tiny_pipe(sd15_like_unet())
    with pytest.raises(LayergenError, match="made for another UNet.*16"):
        other_arch.load_action_identifier(path)
    torch.manual_seed(1)
    retrained = tiny_unet(4, 32, None)
    with torch.no_grad():
        retrained.conv_in.weight.add_(0.1)
    other_weights = tiny_pipe(retrained)
    with pytest.raises(LayergenError, match="learned on base model mini-action"):
        other_weights.load_action_identifier(path)
    other_weights.load_action_identifier(path, strict=False)  # same architecture: allowed on request
    renamed = pipe.load_action_identifier(path, token="<leap>")
    assert set(pipe.action_identifiers) == {"<leap>"} and renamed.token == "<leap>"

    (tmp_path / "bad.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(FormatError):
        ActionIdentifier.load(tmp_path / "bad.safetensors")
    from safetensors.torch import save_file

    save_file({"<cat>": torch.zeros(1, 32)}, str(tmp_path / "ti.safetensors"))
    with pytest.raises(FormatError, match="textual-inversion"):
        ActionIdentifier.load(tmp_path / "ti.safetensors")


def test_input_space_identifier_is_textual_inversion(tmp_path):
    pipe = tiny_pipe()
    ident = ActionIdentifier.for_unet(pipe.unet, "<jump>", kind="input", initializer="star", embedding_dim=32)
    with torch.no_grad():
        ident.embeddings.normal_(0, 2)
    path = ident.save(tmp_path / "ti.safetensors")
    plain = pipe("a red star", num_inference_steps=2, seed=0, output_type="np").images
    pipe.load_action_identifier(path)
    out = pipe("a red <jump>", num_inference_steps=2, seed=0, output_type="np").images
    assert np.abs(out.astype(int) - plain.astype(int)).mean() > 0.5
    # the same file is a valid diffusers textual-inversion embedding
    pipe2 = tiny_pipe()
    pipe2.load_textual_inversion(str(path), token="<jump>")
    ref = pipe2("a red <jump>", num_inference_steps=2, seed=0, output_type="np").images
    assert np.array_equal(ref, out)


@pytest.mark.parametrize("kind", ["layerwise", "input"])
def test_identifier_steps_ends_the_identifier_after_the_noisy_steps(kind):
    pipe = tiny_pipe()
    extra = {"embedding_dim": 32} if kind == "input" else {}
    ident = ActionIdentifier.for_unet(pipe.unet, "<jump>", kind=kind, initializer="star", **extra)
    with torch.no_grad():
        ident.embeddings.normal_(0, 3)
    pipe.load_action_identifier(ident)
    latents_at = {}

    def record(name):
        def callback(p, i, t, kwargs):
            latents_at[(name, i)] = kwargs["latents"].clone()
        return callback

    kw = dict(num_inference_steps=4, seed=0, output_type="np")
    full = pipe("a red <jump>", identifier_steps=1.0, callback_on_step_end=record("full"), **kw).images
    half = pipe("a red <jump>", identifier_steps=0.5, callback_on_step_end=record("half"), **kw).images
    plain = pipe("a red", callback_on_step_end=record("plain"), **kw).images
    none = pipe("a red <jump>", identifier_steps=0.0, **kw).images
    # 0: the prompt without the token, pixel for pixel; the default ends it after the noisiest 0.7 of the steps
    assert np.array_equal(none, plain)
    assert DEFAULT_IDENTIFIER_STEPS == 0.7
    kw10 = {**kw, "num_inference_steps": 10}
    default = pipe("a red <jump>", **kw10).images
    assert np.array_equal(default, pipe("a red <jump>", identifier_steps=0.7, **kw10).images)
    assert not np.array_equal(default, pipe("a red <jump>", identifier_steps=1.0, **kw10).images)
    # 0.5: the first two steps are the identifier's, then the plain prompt takes over
    for i in (0, 1):
        assert torch.equal(latents_at[("half", i)], latents_at[("full", i)])
    assert not torch.equal(latents_at[("half", 2)], latents_at[("full", 2)])
    last = {name: latents_at[(name, 3)] for name in ("full", "half", "plain")}
    scale = (last["full"] - last["plain"]).abs().mean()
    assert scale > 0.05
    # the noisy steps decide most: half ends near full, yet measurably off it
    assert 1e-3 * scale < (last["half"] - last["full"]).abs().mean() < (last["half"] - last["plain"]).abs().mean()
    assert not np.array_equal(half, full)
    # the routing was undone mid-call, and is back for the next call
    assert np.array_equal(pipe("a red <jump>", identifier_steps=1.0, **kw).images, full)
    with pytest.raises(LayergenError, match="identifier_steps"):
        pipe("a red <jump>", identifier_steps=1.5, **kw)
