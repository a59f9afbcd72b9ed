"""Action identifiers (ADI): learned tokens that carry an *action* into a text-to-image UNet.

After "Learning Disentangled Identifiers for Action-Customized Text-to-Image Generation"
(Huang et al., CVPR 2024, arXiv 2311.15841) and P+ (Voynov et al., 2023). Written from the
papers' descriptions; the design choices they leave open are ours and are stated here.

Three kinds of identifier, one file format (`.safetensors`, see `ActionIdentifier.save`):

* ``layerwise`` (ADI): one embedding per cross-attention layer of the UNet. It *replaces* the
  text encoder's output at the identifier's token position(s), so each layer attends to
  its own vector. Routing is by the attention processor's layer name
  (`down_blocks.0.attentions.0.transformer_blocks.0.attn2`, ...), never by call order: a
  processor that counted calls would silently mis-route as soon as a block is skipped or
  the UNet is traversed differently.
* ``shared``: the same, but one vector for every layer (the "no layer-wise tokens" ablation).
* ``input``: classic Textual Inversion — one vector in the text encoder's *input* embedding
  space, contextualised by the encoder like any word.

A prompt names the identifier by its token, e.g. ``"a blue cat <jump>"``. Before encoding,
the token is replaced by the identifier's initializer word (so the rest of the prompt is
contextualised by a plain word and no tokenizer is modified) and the word's token
positions become the *identifier mask*; the embeddings are written there. The negative
prompt of classifier-free guidance goes through the same substitution, so the
unconditional branch is routed per layer too (it carries no identifier unless the negative
prompt names one).

Gradient-invariance mask (ADI's second idea): from triples — an anchor exemplar, a
*context-different* partner (same action, other subject/background) and an
*action-different* partner (same subject/background, other action), all with the same
noise and timestep — per-sample gradients with respect to the identifier are compared
channel by channel. A channel whose gradient changes little across the context pair but a
lot across the action pair is action-relevant; the others are action-agnostic and are
*masked*: their update is dropped. See `GradientInvarianceMasker`; the masked AdamW step
(`masked_step`) restores masked channels after the step, so neither momentum nor decoupled
weight decay can move them.
"""
from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import re
from pathlib import Path

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import nn

from ..errors import FormatError, LayergenError

IDENTIFIER_FORMAT = "layergen-action-identifier"
IDENTIFIER_VERSION = "1"
KINDS = ("layerwise", "shared", "input")
TOKEN_PATTERN = re.compile(r"<[^<>\s]+>")


# ---------------------------------------------------------------------------------------------
# the UNet side


def cross_attention_layers(unet) -> list[str]:
    """Names of every cross-attention `Attention` module of `unet`, in module order.

    SD 1.x/2.x UNets have 16, SDXL's 70 (one per transformer block), the mini UNet a handful.
    """
    from diffusers.models.attention_processor import Attention

    names = [n for n, m in unet.named_modules() if isinstance(m, Attention) and m.is_cross_attention]
    if not names:
        raise LayergenError(f"{type(unet).__name__} has no cross-attention layers: it cannot take an identifier")
    return names


def unet_fingerprint(unet) -> str:
    """A short id of a UNet's architecture *and* weights, so an identifier refuses another base model.

    Hashes the config (without paths) plus two small weight tensors; cheap even for SDXL.
    """
    h = hashlib.sha256()
    cfg = {k: v for k, v in dict(unet.config).items() if not k.startswith("_")}
    h.update(json.dumps(cfg, sort_keys=True, default=str).encode())
    first = dict(unet.named_modules())[cross_attention_layers(unet)[0]]
    for t in (unet.conv_in.weight, first.to_k.weight):
        h.update(t.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


class ActionIdentifier(ModelMixin, ConfigMixin):
    """The learned embeddings of one identifier token (see the module docstring for `kind`)."""

    @register_to_config
    def __init__(self, token: str = "<action>", layer_names: list | tuple = (), embedding_dim: int = 768,
                 kind: str = "layerwise", initializer: str = "pose", base_model: str = "",
                 unet_fingerprint: str = ""):
        super().__init__()
        if kind not in KINDS:
            raise LayergenError(f"identifier kind must be one of {KINDS}, got {kind!r}")
        if not TOKEN_PATTERN.fullmatch(token):
            raise LayergenError(f"identifier token must look like '<name>' (no spaces), got {token!r}")
        if kind != "input" and not layer_names:
            raise LayergenError("an output-space identifier needs the UNet's cross-attention layer names")
        rows = len(layer_names) if kind == "layerwise" else 1
        self.embeddings = nn.Parameter(torch.zeros(rows, int(embedding_dim)))
        self._row = {name: (i if kind == "layerwise" else 0) for i, name in enumerate(layer_names)}

    @property
    def token(self) -> str:
        return self.config.token

    @property
    def kind(self) -> str:
        return self.config.kind

    @property
    def num_rows(self) -> int:
        return self.embeddings.shape[0]

    @classmethod
    def for_unet(cls, unet, token: str, kind: str = "layerwise", initializer: str = "pose",
                 embedding_dim: int | None = None, base_model: str | None = None) -> "ActionIdentifier":
        """An identifier shaped for `unet` (its layer names, fingerprint and width), zero-initialised."""
        layers = cross_attention_layers(unet)
        dim = embedding_dim if embedding_dim is not None else int(unet.config.cross_attention_dim)
        name = base_model if base_model is not None else str(getattr(unet.config, "_name_or_path", "") or "")
        return cls(token=token, layer_names=list(layers), embedding_dim=dim, kind=kind, initializer=initializer,
                   base_model=name, unet_fingerprint=unet_fingerprint(unet))

    def renamed(self, token: str) -> "ActionIdentifier":
        """A copy answering to another token (e.g. to load two identifiers saved under the same name)."""
        if not TOKEN_PATTERN.fullmatch(token):
            raise LayergenError(f"identifier token must look like '<name>' (no spaces), got {token!r}")
        clone = copy.deepcopy(self)
        clone.register_to_config(token=token)
        return clone

    def row_of(self, layer_name: str) -> int:
        try:
            return self._row[layer_name]
        except KeyError:
            raise LayergenError(f"identifier {self.token} has no embedding for layer {layer_name!r}") from None

    def embedding_for(self, layer_name: str | None, override: torch.Tensor | None = None) -> torch.Tensor:
        """This layer's vector: (D,), or (B, D) when a per-sample `override` (B x rows x D) is bound."""
        row = 0 if layer_name is None else self.row_of(layer_name)
        return self.embeddings[row] if override is None else override[:, row]

    # -- compatibility -------------------------------------------------------------------------
    def check_compatible(self, unet, strict: bool = True) -> None:
        """Raise a clear error if this identifier was learned for another UNet."""
        if self.kind == "input":
            dims = None
        else:
            layers = cross_attention_layers(unet)
            if list(layers) != list(self.config.layer_names):
                missing = sorted(set(self.config.layer_names) - set(layers))[:3]
                raise LayergenError(
                    f"identifier {self.token} was made for another UNet ({self.config.base_model or 'unknown'}): "
                    f"it has {len(self.config.layer_names)} cross-attention layers, this UNet has {len(layers)}"
                    + (f" (e.g. no {missing[0]})" if missing else ""))
            dims = int(unet.config.cross_attention_dim)
            if dims != self.config.embedding_dim:
                raise LayergenError(
                    f"identifier {self.token} has {self.config.embedding_dim}-d embeddings but this UNet's "
                    f"cross-attention takes {dims}-d text states: it was made for another base model "
                    f"({self.config.base_model or 'unknown'})")
        if strict and self.config.unet_fingerprint:
            fp = unet_fingerprint(unet)
            if fp != self.config.unet_fingerprint:
                raise LayergenError(
                    f"identifier {self.token} was learned on base model {self.config.base_model or '?'} "
                    f"(UNet {self.config.unet_fingerprint}), not on this UNet ({fp}); relearn it for this model "
                    "or load with strict=False (CLI: --no_strict) to try it anyway")

    # -- file format -----------------------------------------------------------------------------
    def save(self, path) -> Path:
        """One `.safetensors` file: tensor `embeddings` (rows x D) + metadata (layer names, base model, ...).

        A single tensor, so a ``kind="input"`` file also loads with diffusers'
        `pipe.load_textual_inversion(path, token="<name>")`.
        """
        from safetensors.torch import save_file

        from ..atomic import atomic_path

        meta = {"format": IDENTIFIER_FORMAT, "version": IDENTIFIER_VERSION}
        for k, v in self.config.items():
            if not k.startswith("_"):
                meta[k] = v if isinstance(v, str) else json.dumps(list(v) if isinstance(v, tuple) else v)
        meta.update(getattr(self, "extra_metadata", {}) or {})
        path = Path(path)
        with atomic_path(path) as tmp:
            save_file({"embeddings": self.embeddings.detach().to("cpu", torch.float32).contiguous()}, str(tmp),
                      metadata=meta)
        return path

    @classmethod
    def load(cls, path) -> "ActionIdentifier":
        from safetensors import safe_open

        path = Path(path)
        if not path.is_file():
            raise LayergenError(f"{path}: no such identifier file")
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
                emb = f.get_tensor("embeddings") if "embeddings" in f.keys() else None
        except Exception as exc:  # safetensors raises its own error types
            raise FormatError(f"{path}: not a safetensors identifier file ({exc})") from None
        if meta.get("format") != IDENTIFIER_FORMAT or emb is None:
            raise FormatError(f"{path}: not a layergen action identifier (a plain textual-inversion file? "
                              "load it with pipe.load_textual_inversion)")
        known = ("token", "layer_names", "embedding_dim", "kind", "initializer", "base_model", "unet_fingerprint")
        try:
            kwargs = {k: (json.loads(meta[k]) if k in ("layer_names", "embedding_dim") else meta[k])
                      for k in known if k in meta}
        except json.JSONDecodeError:
            raise FormatError(f"{path}: corrupt identifier metadata") from None
        ident = cls(**kwargs)
        if tuple(emb.shape) != tuple(ident.embeddings.shape):
            raise FormatError(f"{path}: embeddings have shape {tuple(emb.shape)}, metadata says "
                              f"{tuple(ident.embeddings.shape)}")
        if not torch.isfinite(emb).all():  # NaN/inf would turn every image black without a word
            raise FormatError(f"{path}: embeddings contain NaN or infinite values (a diverged training run?)")
        with torch.no_grad():
            ident.embeddings.copy_(emb)
        ident.extra_metadata = {k: v for k, v in meta.items() if k not in known}
        return ident.eval().requires_grad_(False)


# ---------------------------------------------------------------------------------------------
# routing: which identifier goes where in the current forward


class IdentifierRouter:
    """Shared by every identifier processor of one UNet: what is bound to the current forward.

    A binding is (identifier, mask, override): `mask` (B x S bool) marks the identifier's
    token positions in the encoder states of this forward (the CFG batch included);
    `override` (B x rows x D) gives per-sample embeddings, which training uses to get
    per-sample gradients from one backward pass.
    """

    def __init__(self):
        self.bindings: list[tuple[ActionIdentifier, torch.Tensor, torch.Tensor | None]] = []

    @contextlib.contextmanager
    def bind(self, identifier: ActionIdentifier, mask: torch.Tensor, override: torch.Tensor | None = None):
        entry = (identifier, mask, override)
        self.bindings.append(entry)
        try:
            yield
        finally:
            self.bindings.remove(entry)

    def route(self, layer_name: str, states: torch.Tensor) -> torch.Tensor:
        for ident, mask, override in self.bindings:
            if ident.kind == "input":
                continue
            if mask.shape != states.shape[:2]:
                raise LayergenError(f"identifier mask {tuple(mask.shape)} does not match the encoder states "
                                    f"{tuple(states.shape[:2])} of layer {layer_name}")
            emb = ident.embedding_for(layer_name, override).to(states.dtype)
            emb = emb[:, None, :] if emb.dim() == 2 else emb[None, None, :]
            states = torch.where(mask[..., None].to(states.device), emb.to(states.device), states)
        return states


class IdentifierAttnProcessor:
    """Wraps a cross-attention layer's processor: writes that layer's identifier vector into the
    text states, then runs the wrapped processor (SDPA by default) unchanged."""

    def __init__(self, layer_name: str, router: IdentifierRouter, base):
        self.layer_name, self.router, self.base = layer_name, router, base

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None,
                 *args, **kwargs):
        if encoder_hidden_states is not None and self.router.bindings:
            encoder_hidden_states = self.router.route(self.layer_name, encoder_hidden_states)
        return self.base(attn, hidden_states, encoder_hidden_states, attention_mask, temb, *args, **kwargs)


def install_identifier_processors(unet) -> IdentifierRouter:
    """Wrap every cross-attention processor of `unet` (idempotent); returns the shared router.

    Self-attention processors are left exactly as they were.
    """
    procs = unet.attn_processors
    existing = [p for p in procs.values() if isinstance(p, IdentifierAttnProcessor)]
    if existing:
        return existing[0].router
    router = IdentifierRouter()
    cross = set(cross_attention_layers(unet))
    new = {}
    for key, proc in procs.items():
        layer = key[: -len(".processor")] if key.endswith(".processor") else key
        new[key] = IdentifierAttnProcessor(layer, router, proc) if layer in cross else proc
    unet.set_attn_processor(new)
    return router


def uninstall_identifier_processors(unet) -> None:
    """Put the wrapped processors back."""
    procs = unet.attn_processors
    if any(isinstance(p, IdentifierAttnProcessor) for p in procs.values()):
        unet.set_attn_processor({k: (p.base if isinstance(p, IdentifierAttnProcessor) else p)
                                 for k, p in procs.items()})


@contextlib.contextmanager
def input_embedding_override(text_encoder, identifier: ActionIdentifier, mask: torch.Tensor,
                             override: torch.Tensor | None = None):
    """While active, the text encoder's input embeddings at `mask` are the identifier's vector (TI)."""
    module = text_encoder.get_input_embeddings()

    def hook(_module, _inputs, output):
        if output.shape[:2] != mask.shape:
            raise LayergenError(f"identifier mask {tuple(mask.shape)} does not match the token batch "
                                f"{tuple(output.shape[:2])}")
        emb = identifier.embedding_for(None, override).to(output.dtype)
        emb = emb[:, None, :] if emb.dim() == 2 else emb[None, None, :]
        return torch.where(mask[..., None].to(output.device), emb.to(output.device), output)

    handle = module.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


# ---------------------------------------------------------------------------------------------
# prompts


def substitute_identifiers(prompts: list[str], identifiers: dict, passthrough=()) -> tuple[list[str], list]:
    """Replace each identifier token by its initializer word.

    Returns the new texts and, per prompt, (token, start, end) character spans of the
    substituted words. Unknown `<tokens>` are an error (a typo would otherwise be encoded
    as literal text and silently ignored), except those in `passthrough` (tokens the
    tokenizer itself knows, e.g. from `load_textual_inversion`).
    """
    texts, spans = [], []
    for prompt in prompts:
        out, pos, found = [], 0, []
        for m in TOKEN_PATTERN.finditer(prompt):
            token = m.group(0)
            if token in passthrough and token not in identifiers:
                continue
            if token not in identifiers:
                loaded = ", ".join(identifiers) or "none"
                raise LayergenError(f"prompt names identifier {token} but it is not loaded (loaded: {loaded}); "
                                    "load it with pipe.load_action_identifier(path)")
            out.append(prompt[pos:m.start()])
            start = sum(len(s) for s in out)
            word = identifiers[token].config.initializer
            out.append(word)
            found.append((token, start, start + len(word)))
            pos = m.end()
        out.append(prompt[pos:])
        texts.append("".join(out))
        spans.append(found)
    return texts, spans


def identifier_masks(tokenizer, texts: list[str], spans: list[list[tuple]], max_length: int) -> dict:
    """token -> B x max_length bool mask of the positions each identifier's word occupies."""
    tokens = sorted({t for s in spans for t, _, _ in s})
    masks = {t: torch.zeros(len(texts), max_length, dtype=torch.bool) for t in tokens}
    if not tokens:
        return masks
    try:
        enc = tokenizer(texts, padding="max_length", max_length=max_length, truncation=True,
                        return_offsets_mapping=True)
        offsets = enc["offset_mapping"]
    except (NotImplementedError, TypeError, ValueError):
        offsets = None
    for b, (text, found) in enumerate(zip(texts, spans)):
        for token, start, end in found:
            if offsets is not None:
                idx = [i for i, (s, e) in enumerate(offsets[b]) if e > s and s < end and e > start]
            else:  # slow tokenizers: count the tokens before the word
                n_before = len(tokenizer(text[:start], add_special_tokens=False).input_ids)
                n_word = len(tokenizer(text[start:end], add_special_tokens=False).input_ids)
                first = n_before + 1  # after the BOS/CLS token
                idx = [i for i in range(first, first + n_word) if i < max_length - 1]
            if not idx:
                raise LayergenError(f"identifier {token} falls beyond the text encoder's {max_length}-token limit; "
                                    "shorten the prompt")
            masks[token][b, idx] = True
    return masks


# ---------------------------------------------------------------------------------------------
# gradient-invariance mask


class GradientInvarianceMasker(nn.Module):
    """Decides, per identifier channel, whether the update is allowed (ADI's gradient mask).

    Statistics (per row = layer, per channel), averaged over the triples of a step:
      d_ctx = |g_anchor - g_context|  (large: the channel reacts to subject/background)
      d_act = |g_anchor - g_action|   (large: the channel reacts to the action)
    each divided by its row mean so layers of different gradient scale compare. The score
    ``d_act - d_ctx`` ranks channels; the lowest `quantile` fraction of each row (rounded,
    ties broken by index) is action-agnostic and masked. Without action-different samples
    the score is ``-d_ctx`` (context invariance alone). `momentum` > 0 smooths the statistics
    over steps with an EMA (0 = ADI's per-step mask).

    ``basis="eigen"`` ranks *directions* instead of channels: the same two differences give two
    covariances per row (each over its trace), and the `quantile` fraction of eigenvectors of
    (action - context) with the lowest eigenvalues is frozen. Where pose and context share
    channels (the mini model), a few such directions keep context out without the action;
    it keeps rows x D x D statistics twice (75 MB for SD 1.5's 16 x 768, 2.3 GB for SDXL).
    """

    def __init__(self, rows: int, dim: int, quantile: float = 0.5, momentum: float = 0.0, basis: str = "channel"):
        super().__init__()
        if not 0.0 <= quantile < 1.0:
            raise LayergenError(f"mask quantile must be in [0, 1), got {quantile}")
        if not 0.0 <= momentum < 1.0:
            raise LayergenError(f"mask momentum must be in [0, 1), got {momentum}")
        if basis not in ("channel", "eigen"):
            raise LayergenError(f"mask basis must be 'channel' or 'eigen', got {basis!r}")
        self.quantile, self.momentum, self.basis = float(quantile), float(momentum), basis
        shape = (rows, dim) if basis == "channel" else (rows, dim, dim)
        self.register_buffer("d_ctx", torch.zeros(shape))
        self.register_buffer("d_act", torch.zeros(shape))
        self.register_buffer("steps", torch.zeros((), dtype=torch.long))

    def _statistic(self, d: torch.Tensor) -> torch.Tensor:
        """Channel: mean |difference| per channel over the row mean (rows x D). Eigen: covariance of the
        differences over its trace (rows x D x D). Either way layers of different gradient scale compare."""
        d = d.float()
        if self.basis == "eigen":
            c = torch.einsum("nrd,nre->rde", d, d) / d.shape[0]
            return c / c.diagonal(dim1=-2, dim2=-1).sum(-1)[:, None, None].clamp_min(1e-30)
        d = d.abs().mean(0)
        return d / d.mean(dim=-1, keepdim=True).clamp_min(1e-12)

    @torch.no_grad()
    def update(self, g_anchor: torch.Tensor, g_context: torch.Tensor, g_action: torch.Tensor | None = None):
        """Per-sample gradients, N x rows x D each; returns the keep-mask (rows x D bool), or with the eigen
        basis the directions to freeze (rows x D x k)."""
        d_ctx = self._statistic(g_anchor - g_context)
        d_act = self._statistic(g_anchor - g_action) if g_action is not None else torch.zeros_like(d_ctx)
        m = self.momentum if int(self.steps) > 0 else 0.0
        self.d_ctx.mul_(m).add_(d_ctx.to(self.d_ctx), alpha=1 - m)
        self.d_act.mul_(m).add_(d_act.to(self.d_act), alpha=1 - m)
        self.steps += 1
        return self.keep_mask(has_action=g_action is not None)

    def keep_mask(self, has_action: bool = True) -> torch.Tensor:
        """The channels to keep (rows x D bool) or, with the eigen basis, the directions to freeze: the
        eigenvectors of the score with the lowest eigenvalues (rows x D x k)."""
        score = (self.d_act if has_action else 0.0) - self.d_ctx
        if self.basis == "eigen":
            k = int(round(self.quantile * score.shape[-1]))
            return torch.linalg.eigh(score.double())[1][..., :k].to(score.dtype)
        return quantile_keep_mask(score, self.quantile)


def quantile_keep_mask(score: torch.Tensor, quantile: float) -> torch.Tensor:
    """True for all but the round(quantile * D) lowest-scoring channels of each row."""
    rows, dim = score.shape
    k = int(round(quantile * dim))
    keep = torch.ones(rows, dim, dtype=torch.bool, device=score.device)
    if k > 0:
        order = torch.argsort(score, dim=-1, stable=True)[:, :k]
        keep.scatter_(1, order, False)
    return keep


def masked_step(optimizer, param: torch.Tensor, keep: torch.Tensor | None) -> None:
    """`optimizer.step()` under which channels with keep=False do not move at all.

    Zeroing their gradient is not enough under AdamW: momentum from earlier steps and
    decoupled weight decay would still move them. So their gradient is zeroed (keeping
    the moment estimates clean) *and* their values are restored after the step. `keep` may
    also be directions to freeze (rows x D x k floats, the eigen mask): the same two halves,
    as projections.
    """
    if keep is not None and keep.dtype != torch.bool:  # directions to freeze, rows x D x k
        freeze = keep.to(param)

        def drop(x):
            return x - torch.einsum("rdk,rk->rd", freeze, torch.einsum("rdk,rd->rk", freeze, x))

        frozen = param.detach().clone()
        if param.grad is not None:
            param.grad.copy_(drop(param.grad))
        optimizer.step()
        with torch.no_grad():
            param.copy_(frozen + drop(param - frozen))
        return
    if keep is None or bool(keep.all()):
        optimizer.step()
        return
    keep = keep.to(param.device)
    frozen = param.detach().clone()
    if param.grad is not None:
        param.grad.mul_(keep.to(param.grad.dtype))
    optimizer.step()
    with torch.no_grad():
        param.copy_(torch.where(keep, param, frozen))


@torch.no_grad()
def limit_row_norms(param: torch.Tensor, max_norms: torch.Tensor, keep: torch.Tensor | None = None) -> None:
    """Shrink each row of `param` (rows x D) to at most `max_norms[row]` by rescaling only its
    *kept* channels, so channels masked this step still do not move at all.

    A layer-wise output-space token that grows far beyond the norm of ordinary text states
    wins every cross-attention softmax and drowns the prompt's subject words; capping the
    norm keeps it one token among others.
    """
    keep = torch.ones_like(param, dtype=torch.bool) if keep is None else keep.to(param.device)
    kept = torch.where(keep, param, torch.zeros_like(param))
    fixed_sq = (param - kept).pow(2).sum(-1)
    kept_sq = kept.pow(2).sum(-1)
    target_sq = max_norms.to(param).pow(2)
    over = fixed_sq + kept_sq > target_sq
    scale = torch.sqrt(((target_sq - fixed_sq).clamp_min(0) / kept_sq.clamp_min(1e-12))).clamp(max=1.0)
    scale = torch.where(over, scale, torch.ones_like(scale))
    param.copy_(torch.where(keep, param * scale[:, None], param))
