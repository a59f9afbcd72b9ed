"""Decomposition: a flat image -> a clean background + ordered RGBA instance layers with their effects.

    pipe = DecompositionPipeline()                            # classical, no weights
    out = pipe(image, boxes=[(10, 20, 40, 40)])               # or masks=, points=, nothing = automatic
    out.stack.composite()  # == the 8-bit input, bit for bit (out.psnr: 100 dB, the cap)

    pipe = load_decomposition_pipeline()       # the learned mini decomposer (layergen.decompose.learned)

Each instance is peeled top-first (LayerD-style): propose -> matte the body ->
complete the background under body and effects -> *unblend* the layer from
input and background, so shadows and glows stay in the object's layer and the
stack re-composites to the input (`absorb_rounding` takes up what 8-bit
rounding leaves). `recursive=True` re-runs the proposal on the revealed image
after every peel, up to `num_layers` layers.

Components are plain objects (see `layergen.decompose`): `proposer`,
`matting`, `completion`, `extraction`. Learned modules (optional):
`matte` (`LayerMatteNet`: composite + instance box -> the layer's amodal and
visible alpha and its colour, in one pass) replaces the matting prior, the
glass alpha and the occlusion order, and completes what other layers hide;
`decomposer` (a latent diffusion model conditioned on composite + instance
mask, predicting the background latent and the RGBA-layer latent jointly)
replaces the matting prior and the completion inside the hole.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Optional

import numpy as np
import torch
from diffusers import DiffusionPipeline
from diffusers.utils import BaseOutput

from ..decompose.completion import BackgroundCompleter, StructureFill
from ..decompose.matting import AlphaMatting, ClosedFormMatting, ForegroundExtraction, Unblend
from ..decompose.metrics import psnr
from ..decompose.proposals import (AutomaticProposer, BoxProposer, InstanceProposal, InstanceProposer, MaskProposer,
                                   PointProposer, dilate, erode, layered_fill, order_top_first)
from ..errors import LayergenError
from ..layers import Layer, LayerStack

MAX_PIXELS = 4096 * 4096
MIN_SIDE = 8


@dataclass
class DecompositionPipelineOutput(BaseOutput):
    """`stack`: background + instance layers (bottom -> top); `psnr`: re-composite vs input (dB, capped at 100)."""

    stack: LayerStack
    psnr: float
    seconds: float = 0.0
    proposals: list = field(default_factory=list)


def load_image(image) -> np.ndarray:
    """Path / PIL / array -> float32 H x W x 3 in [0, 1], with clear errors for what we cannot take.

    Grayscale becomes RGB, 16-bit is scaled to 8-bit precision, an opaque alpha
    channel is dropped; a transparent image is flattened over white (its alpha
    is not a layer structure we could respect). A layered document (.psd, .ora,
    .zip) is read with `layergen.layers.formats` and its composite decomposed:
    PIL reads a PSD's merged image, which psd-tools writes fully transparent.
    """
    from PIL import Image

    from ..layers.formats import FORMATS, load

    if isinstance(image, (str, bytes)) or hasattr(image, "__fspath__"):
        from pathlib import Path

        path = Path(image)
        if not path.is_file():
            raise LayergenError(f"{path}: no such image file")
        if any(f.layered and path.suffix.lower() in f.extensions for f in FORMATS.values()):
            image = load(path)
        else:
            try:
                with Image.open(path) as im:
                    if im.width * im.height > MAX_PIXELS:  # before decoding: a huge file must not fill memory
                        raise LayergenError(f"{path} is {im.width}x{im.height}; the limit is "
                                            f"{MAX_PIXELS // 1_000_000} megapixels — downscale it first")
                    im.load()
                    image = im.copy()
            except Image.DecompressionBombError:  # Pillow's guard (178 MP) trips before ours can read the size
                raise LayergenError(f"{path} is larger than {2 * Image.MAX_IMAGE_PIXELS // 10**6} megapixels; the "
                                    f"limit is {MAX_PIXELS // 1_000_000} megapixels — downscale it first") from None
            except OSError as exc:
                raise LayergenError(f"{path}: cannot read image ({exc})") from None
    if isinstance(image, LayerStack):
        image = image.composite()
    if isinstance(image, Image.Image):
        if image.width * image.height > MAX_PIXELS:
            raise LayergenError(f"image is {image.width}x{image.height}; the limit is {MAX_PIXELS // 1_000_000} "
                                "megapixels — downscale it first")
        if image.mode in ("I;16", "I;16B", "I;16L", "I"):
            # 16-bit samples (Pillow opens 16-bit PNG greys as I;16 or I): full scale is 65535 whatever the
            # content, or a dark 16-bit image would be read 257 times too bright; wider 32-bit ints by their max
            arr = np.asarray(image, np.float64)
            image = np.clip(arr / max(65535.0, float(arr.max())), 0, 1)
        elif image.mode == "F":
            image = np.asarray(image, np.float32)
        elif image.mode == "P":
            image = np.asarray(image.convert("RGBA"))
        else:
            image = np.asarray(image if image.mode in ("L", "LA", "RGB", "RGBA") else image.convert("RGB"))
    if torch.is_tensor(image):
        image = image.detach().cpu().numpy()
        if image.ndim == 3 and image.shape[0] in (1, 3, 4) and image.shape[-1] not in (1, 3, 4):
            image = image.transpose(1, 2, 0)
    arr = np.asarray(image)
    if arr.size == 0 or arr.ndim < 2:
        raise LayergenError(f"image is empty (shape {arr.shape})")
    if arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[..., 0]
    if arr.ndim == 2:
        arr = np.stack([arr] * 3, -1)
    elif arr.ndim == 3 and arr.shape[2] == 2:
        arr = np.concatenate([np.stack([arr[..., 0]] * 3, -1), arr[..., 1:]], -1)
    if arr.ndim != 3 or arr.shape[2] not in (3, 4):
        raise LayergenError(f"image must be H x W (gray), H x W x 3 (RGB) or H x W x 4 (RGBA), got {arr.shape}")
    h, w = arr.shape[:2]
    if h * w > MAX_PIXELS:
        raise LayergenError(f"image is {w}x{h}; the limit is {MAX_PIXELS // 1_000_000} megapixels — downscale it first")
    if h < MIN_SIDE or w < MIN_SIDE:
        raise LayergenError(f"image is {w}x{h}; decomposition needs at least {MIN_SIDE}x{MIN_SIDE} pixels")
    if arr.dtype == np.uint8:
        f = arr.astype(np.float32) / 255.0
    elif arr.dtype == np.uint16:
        f = arr.astype(np.float32) / 65535.0
    elif arr.dtype == bool:
        f = arr.astype(np.float32)
    elif np.issubdtype(arr.dtype, np.floating):
        if not np.isfinite(arr).all() or arr.min() < 0 or arr.max() > 1:
            raise LayergenError("float images must hold finite values in [0, 1]")
        f = arr.astype(np.float32)
    else:
        raise LayergenError(f"unsupported pixel type {arr.dtype}; use 8- or 16-bit integers or floats in [0, 1]")
    if f.shape[2] == 4:
        a = f[..., 3:4]
        f = f[..., :3] * a + (1.0 - a)  # flatten over white (no-op when opaque)
    # quantise to 8 bits: layers are 8-bit, and exact re-compositing is defined on 8-bit pixels
    return np.floor(np.clip(f, 0, 1) * 255.0 + 0.5).astype(np.float32) / 255.0


def estimate_translucency(image, background, body, min_background_std: float = 0.03):
    """Alpha of a see-through body from how it tracks the background: `I = (1 - a) B + k + g y`.

    Why: glass shows the background through, so over a varying background the
    body colour follows it with slope `1 - a`. The per-channel `g y` term
    absorbs vertical shading, which must not pass for transparency. Returns
    `(a, k + g y map)` or None when the background under the body varies too
    little (beyond shading) to tell; the body is then taken as opaque.
    """
    core = erode(body, 2)
    n = int(core.sum())
    if n < 20:
        return None
    ys, xs = np.nonzero(core)
    I, B = image[core].astype(np.float64), background[core].astype(np.float64)
    y = (ys - ys.mean()) / max(1.0, ys.std())
    X = np.stack([np.ones(n), y], 1)  # per-channel intercept and shading slope
    proj = X @ np.linalg.lstsq(X, B, rcond=None)[0]
    Br = B - proj  # background variation the shading model cannot explain
    if (Br ** 2).mean() < min_background_std ** 2:
        return None
    coef_i = np.linalg.lstsq(X, I, rcond=None)[0]
    Ir = I - X @ coef_i
    s = float((Ir * Br).sum() / (Br ** 2).sum())
    if not 0.2 <= s <= 0.8:
        return None
    glass_res = float(np.abs(Ir - s * Br).mean())
    solid_res = float(np.abs(Ir).mean())
    if solid_res < 0.015 or glass_res > 0.5 * solid_res:
        return None
    # k + g y as a full map over the body's rows
    coef = np.linalg.lstsq(X, I - s * B, rcond=None)[0]
    yy = (np.arange(image.shape[0], dtype=np.float64) - ys.mean()) / max(1.0, ys.std())
    offset = coef[0][None, None, :] + yy[:, None, None] * coef[1][None, None, :]
    return 1.0 - s, np.broadcast_to(offset, image.shape).astype(np.float32)


class DecompositionPipeline(DiffusionPipeline):
    """Image (+ optional boxes / masks / points) -> `LayerStack` of background + RGBA instances.

    Registered (optional) modules, for the learned path: `matte`
    (`layergen.decompose.matte_net.LayerMatteNet`), `decomposer`
    (`layergen.decompose.learned.LayerDecomposer`), `vae` (AutoencoderKL),
    `codec` (TransparentDecoder for the RGBA latent), `scheduler`.
    Plain components (not saved with `save_pretrained`): `proposer`,
    `matting`, `completion`, `extraction`.
    """

    model_cpu_offload_seq = "matte->vae->decomposer->codec"
    _optional_components = ["matte", "decomposer", "vae", "codec", "scheduler"]
    _callback_tensor_inputs = ["background"]

    def __init__(self, decomposer=None, vae=None, codec=None, scheduler=None, matte=None,
                 proposer: InstanceProposer | None = None, matting: AlphaMatting | None = None,
                 completion: BackgroundCompleter | None = None, extraction: ForegroundExtraction | None = None):
        super().__init__()
        self.register_modules(decomposer=decomposer, vae=vae, codec=codec, scheduler=scheduler, matte=matte)
        self.proposer = proposer
        self.matting = matting if matting is not None else ClosedFormMatting()
        self.completion = completion if completion is not None else StructureFill()
        self.extraction = extraction if extraction is not None else Unblend()
        self.background_mode = "residual"  # learned path: see layergen.decompose.learned.BACKGROUND_MODES

    @property
    def learned(self) -> bool:
        """A latent-diffusion decomposer is loaded (see `learned_step`)."""
        return getattr(self, "decomposer", None) is not None and getattr(self, "vae", None) is not None

    def predict_layers(self, image: np.ndarray, proposals: list[InstanceProposal]) -> None:
        """Run the layer matte once per proposal (its box, the others' boxes as context); the result
        travels with the proposal (`metadata["matte"]`) through ordering and peeling."""
        from ..decompose.matte_net import box_mask, predict_layer

        h, w = image.shape[:2]
        boxes = [p.metadata.get("box", p.box) for p in proposals]
        for k, p in enumerate(proposals):
            others = box_mask([b for j, b in enumerate(boxes) if j != k], h, w)
            p.metadata["matte"] = predict_layer(self.matte, image, box_mask([boxes[k]], h, w), others)

    def order(self, image: np.ndarray, proposals: list[InstanceProposal]) -> list[InstanceProposal]:
        """Topmost first: by the layer matte's visibility when it is loaded, else by body shape."""
        if getattr(self, "matte", None) is None or not proposals:
            return order_top_first(proposals)
        from ..decompose.matte_net import visibility_order

        self.predict_layers(image, proposals)
        return order_top_first(proposals, visibility_order([p.metadata["matte"] for p in proposals], image))

    # ------------------------------------------------------------------ inputs
    def check_inputs(self, image, boxes, masks, points, num_layers):
        given = [g for g in (boxes, masks, points) if g is not None]
        if len(given) > 1:
            raise LayergenError("give at most one kind of guidance: boxes, masks or points")
        for name, g in (("boxes", boxes), ("masks", masks), ("points", points)):
            if g is not None and len(g) == 0:
                raise LayergenError(f"{name} is empty; pass None for automatic proposals")
        if num_layers is not None and int(num_layers) < 1:
            raise LayergenError(f"num_layers must be >= 1, got {num_layers}")

    def make_proposer(self, boxes=None, masks=None, points=None) -> InstanceProposer:
        completer = self.completion if isinstance(self.completion, StructureFill) else StructureFill()
        if boxes is not None:
            return BoxProposer(boxes, completer=completer)
        if masks is not None:
            return MaskProposer(masks, completer=completer)
        if points is not None:
            return PointProposer(points, completer=completer)
        return self.proposer if self.proposer is not None else AutomaticProposer(completer=completer)

    # ------------------------------------------------------------------ one peel
    def peel(self, image: np.ndarray, proposal: InstanceProposal, generator=None, num_inference_steps: int = 20,
             others: np.ndarray | None = None, below: list | None = None):
        """Remove one instance from `image`. Returns `(rgb, alpha, background)` (float32).

        `others`: pixels of instances still in the image; the completion does not learn from them.
        `below`: body masks of those instances; hole pixels on them (a shadow cast onto a lower
        object) are completed from that object's own colour, not from the background.
        """
        body = proposal.mask
        prior = self.matting(image, body)
        hole = proposal.region | dilate(prior > 0.01, 1) | dilate(body, 1)
        learned_bg = learned_alpha = None
        if self.learned:
            learned_bg, learned_alpha = self.learned_step(image, proposal, hole, generator, num_inference_steps, others)
            # what the model puts in the layer near the instance joins the hole (effects the proposal missed)
            hole = hole | (dilate(learned_alpha > 0.1, 1) & dilate(hole, max(2, min(image.shape[:2]) // 32)))
        if hole.all():
            hole = hole & ~_frame(hole.shape)
        ignore = None if others is None else others & ~hole
        background = self.completion(image, hole, ignore=ignore)
        if learned_bg is not None:
            background = np.where(hole[..., None], learned_bg, background)
        if below:
            on_lower = layered_fill(image, hole, below)
            if on_lower is not None:
                lower = hole & np.any(below, axis=0)
                background = np.where(lower[..., None], on_lower, background)
        fixed = None
        see_through = body & (prior >= 0.98)
        glass = self.translucency(image, background, see_through, learned_alpha)
        if glass is not None:
            a, k = glass
            prior = np.where(see_through, a, prior).astype(np.float32)
            fixed = see_through
            # the background is visible through glass: recover it instead of inventing it
            recovered = np.clip((image - k) / max(1.0 - a, 1e-3), 0, 1)
            background = np.where(erode(see_through, 1)[..., None], recovered, background)
        rgb, alpha = self.extraction(image, background, hole, prior, fixed=fixed)
        background = np.where(alpha[..., None] > 0, background, image)  # nothing explained by the layer is lost
        return rgb, alpha, background

    def peel_with_matte(self, image: np.ndarray, proposal: InstanceProposal, others: np.ndarray,
                        lower: list[dict], revealed: np.ndarray):
        """One peel guided by the layer matte. Returns `(rgb, alpha, background)` like `peel`.

        The layer's alpha is the matte's: visible alpha, and amodal alpha where layers above were
        peeled (`revealed`: there the image already shows this layer completed). Those pixels and the
        proposal's region outside other instances form the hole; in the region, unblending raises the
        alpha the matte missed (faint shadow tails: 0.56 -> 0.84 of the shadow alpha in its layer on 40
        dev scenes). The image under it is the completion, learnt only from pixels no instance
        covers (`others`), with the remaining instances' predicted layers (`lower`, topmost first)
        composited over it — so a shadow on a lower object is unblended against that object, and
        what this layer hides of them comes back completed. Unblending then only recovers the colour
        (and raises alpha where that colour would leave [0, 1]), so the stack re-composites exactly.
        """
        pred = proposal.metadata["matte"]
        alpha = np.where(revealed, pred["amodal"], pred["visible"]).astype(np.float32)
        hole = (alpha > 0.01) | (proposal.region & ~others)  # + faint effect tails the proposer saw
        if not hole.any():
            return np.zeros_like(image), np.zeros(alpha.shape, np.float32), image
        if hole.all():
            hole = hole & ~_frame(hole.shape)
        under = self.completion(image, hole, ignore=others & ~hole)
        for below in reversed(lower):  # bottom first
            a = below["amodal"][..., None]
            under = below["colour"] * a + under * (1 - a)
        background = np.where(hole[..., None], under, image).astype(np.float32)
        rgb, alpha = self.extraction(image, background, hole, alpha, fixed=hole)
        background = np.where(alpha[..., None] > 0, background, image)
        return rgb, alpha, background

    def translucency(self, image, background, body, learned_alpha=None):
        """`(alpha, colour offset)` of a see-through body, or None when it is opaque.

        Learned: the model's alpha over the body core. Classical: `estimate_translucency`.
        """
        if learned_alpha is None:
            return estimate_translucency(image, background, body)
        core = erode(body, 2)
        if core.sum() < 20:
            return None
        a = float(np.median(learned_alpha[core]))
        if not 0.15 <= a <= 0.8:
            return None
        colour = np.clip(np.median((image[core] - (1 - a) * background[core]) / a, 0), 0, 1)
        return a, np.broadcast_to((a * colour).astype(np.float32), image.shape)

    def learned_step(self, image, proposal, hole, generator=None, num_inference_steps: int = 20, others=None):
        from ..decompose.learned import run_decomposer

        return run_decomposer(self, image, proposal, hole, generator=generator,
                              num_inference_steps=num_inference_steps, completion=self.completion, others=others)

    # ------------------------------------------------------------------ call
    @torch.no_grad()
    def __call__(self, image, boxes=None, masks=None, points=None, num_layers: Optional[int] = None,
                 recursive: bool = False, num_inference_steps: int = 20, generator: torch.Generator | None = None,
                 callback_on_step_end: Optional[Callable] = None, return_dict: bool = True):
        """Decompose `image`.

        Args:
            image: path, PIL image, uint8/uint16/float array (gray, RGB or RGBA) or a LayerStack.
            boxes: `(x, y, w, h)` per instance; `masks`: H x W arrays; `points`: `(x, y)` clicks.
                None of them: automatic proposals.
            num_layers: at most this many instance layers (default: all proposals).
            recursive: re-propose on the revealed image after each peel (LayerD-style); automatic only.
            callback_on_step_end: `fn(pipe, i, t, {"background": ..., "layer": Layer})` after each peel.
        """
        start = time.perf_counter()
        self.check_inputs(image, boxes, masks, points, num_layers)
        img = load_image(image)
        h, w = img.shape[:2]
        proposer = self.make_proposer(boxes, masks, points)
        proposals = self.order(img, proposer(img))
        limit = num_layers if num_layers is not None else (len(proposals) if not recursive else 8)
        if not recursive:
            proposals = proposals[:limit]
        current = img
        revealed = np.zeros((h, w), bool)  # where peeled layers were: lower layers show there completed
        peeled: list[Layer] = []
        used = []
        notes = []  # guidance that gave no layer: the user asked for one per box / mask / point
        total = limit if recursive else len(proposals)
        with self.progress_bar(total=max(total, 1)) as bar:
            i = 0
            while i < total:
                if recursive and i > 0:
                    automatic = boxes is None and masks is None and points is None
                    found = self.order(current, proposer(current)) if automatic else []
                    if not found:
                        break
                    proposals = found
                if i >= len(proposals) and not recursive:
                    break
                p = proposals[0] if recursive else proposals[i]
                rest = proposals[1:] if recursive else proposals[i + 1:]
                others = np.zeros((h, w), bool)
                if "matte" in p.metadata:
                    for q in rest:
                        others |= q.metadata["matte"]["amodal"] > 0.01
                    rgb, alpha, current = self.peel_with_matte(current, p, others,
                                                               [q.metadata["matte"] for q in rest], revealed)
                else:
                    for q in rest:
                        others |= q.region
                    rgb, alpha, current = self.peel(current, p, generator, num_inference_steps, others=others,
                                                    below=[q.mask for q in rest])
                revealed |= alpha > 0
                if alpha.max() <= 0:
                    if p.source in ("box", "mask", "point"):
                        where = ",".join(map(str, p.metadata.get("box", p.box)))
                        notes.append(f"{p.source} at {where}: nothing there differs from the background, so it "
                                     "has no layer")
                    i += 1
                    bar.update(1)
                    continue
                rgba = np.concatenate([rgb, alpha[..., None]], -1)
                u8 = np.floor(np.clip(rgba, 0, 1) * 255.0 + 0.5).astype(np.uint8)
                u8[u8[..., 3] == 0, :3] = 0
                x, y, bw, bh = p.box
                layer = Layer(u8, name=f"instance {len(peeled) + 1}",
                              metadata={"kind": "instance", "source": p.source, "box": [x, y, bw, bh],
                                        "decomposer": "learned" if self.learned or "matte" in p.metadata
                                        else "classical"})
                peeled.append(layer)
                used.append(p)
                if callback_on_step_end is not None:
                    callback_on_step_end(self, i, i, {"background": current, "layer": layer})
                i += 1
                bar.update(1)
                if recursive and not (boxes is None and masks is None and points is None):
                    break
        stack = LayerStack(w, h, metadata={"pipeline": type(self).__name__, **({"notes": notes} if notes else {})})
        bg_u8 = np.floor(np.clip(current, 0, 1) * 255 + 0.5).astype(np.uint8)
        stack.add(Layer(bg_u8, name="background", metadata={"kind": "background"}))
        for k, layer in enumerate(reversed(peeled)):  # peeled top-first; the stack is bottom -> top
            layer.name = f"instance {k + 1}"
            stack.add(layer)
        absorb_rounding(stack, img)
        value = psnr(stack.composite()[..., :3], img, cap=100.0)
        stack.metadata["recomposite_psnr"] = value
        self.maybe_free_model_hooks()
        out = DecompositionPipelineOutput(stack=stack, psnr=value, seconds=time.perf_counter() - start,
                                          proposals=list(reversed(used)))
        return out if return_dict else (stack, value)


def absorb_rounding(stack: LayerStack, image: np.ndarray) -> None:
    """Edit the colours of the stack's layers in place so that `stack.composite()` equals `image` (float
    H x W x 3 on the 8-bit grid) wherever rounding made it miss. The stack is the pipeline's own: full-canvas,
    normal-blend layers over an opaque background.

    The peels solve the compositing equation in floats; rounding every layer's alpha and colour to
    8 bits leaves the re-composite up to a level or two off. Per wrong pixel and channel (found by the
    stack's own compositor), the layer whose colour counts most there (weight = its alpha times the
    transparency of everything above) takes the error: its colour moves by error / weight (a level or two)
    to whichever 8-bit neighbour leaves the smallest error; if that would leave [0, 1], the next layer by
    weight tries. Only the wrong samples are gathered, so a large stack costs no float copy per layer.
    """
    target = np.floor(np.asarray(image, np.float64) * 255.0 + 0.5)
    ys, xs, ch = np.nonzero(stack.composite()[..., :3] != target)
    if not len(ys):
        return
    layers = [layer.pixels for layer in stack.layers]  # bottom -> top
    target = target[ys, xs, ch]
    cols = np.stack([px[ys, xs, ch] for px in layers]).astype(np.float64)  # layers x samples
    alphas = [np.ones(len(ys))] + [px[ys, xs, 3] / 255.0 for px in layers[1:]]
    weights, above = [], np.ones(len(ys))
    for a in reversed(alphas):
        weights.insert(0, a * above)
        above = above * (1.0 - a)
    weights = np.stack(weights)
    value = (weights * cols).sum(0)
    ranked = np.argsort(-weights, axis=0)
    samples = np.arange(len(ys))
    wrong = np.ones(len(ys), bool)
    for rank in range(min(2, len(layers))):
        k = ranked[rank]
        w, c = weights[k, samples], cols[k, samples]
        err = target - value
        todo = wrong & (w > 0)
        best, best_err = c.copy(), np.abs(err)
        ideal = c + err / np.maximum(w, 1e-12)
        for cand in (np.floor(ideal), np.ceil(ideal)):
            cand_err = np.abs(err - w * (cand - c))
            ok = todo & (cand >= 0) & (cand <= 255) & (cand_err < best_err)
            best, best_err = np.where(ok, cand, best), np.where(ok, cand_err, best_err)
        value = value + w * (best - c)
        cols[k, samples] = best
        wrong = np.floor(value + 0.5) != target
    for px, c in zip(layers, cols):
        px[ys, xs, ch] = c.astype(np.uint8)


def _frame(shape):
    m = np.zeros(shape, bool)
    m[0, :] = m[-1, :] = True
    m[:, 0] = m[:, -1] = True
    return m


def naive_pipeline(**kwargs) -> DecompositionPipeline:
    """The naive baseline: hard mask cut (no effects) + OpenCV Telea fill, no unblending."""
    from ..decompose.completion import OpenCVInpainting
    from ..decompose.matting import HardCut, HardMatting

    return DecompositionPipeline(matting=HardMatting(), completion=OpenCVInpainting("telea"),
                                 extraction=HardCut(), **kwargs)
