"""Instance proposals: where are the objects to peel off?

A proposer is a callable `proposer(image) -> list[InstanceProposal]` (image:
float32 `H x W x 3` in [0, 1]). Each proposal carries the object's *body*
mask (what matting refines) and its *region*: body plus the shadow/glow that
belongs to it, i.e. everything the background completion has to replace.

* `AutomaticProposer` — no guidance. Flat designs (a background explained by a
  smooth or 1-D model): pixels the background model cannot explain, split into
  connected components and then by colour. Photos (no such model): GrabCut
  started from a central rectangle — the salient subject.
* `BoxProposer`, `MaskProposer`, `PointProposer` — user guidance.

Boxes are `(x, y, w, h)` in pixels everywhere in the public API (as on the CLI).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ..errors import LayergenError
from .completion import BackgroundCompleter, StructureFill


@dataclass
class InstanceProposal:
    """One instance to peel: `mask` = body (bool H x W), `region` = body + its effects (bool H x W)."""

    mask: np.ndarray
    region: np.ndarray
    score: float = 1.0
    source: str = "automatic"
    metadata: dict = field(default_factory=dict)

    @property
    def box(self) -> tuple[int, int, int, int]:
        """(x, y, w, h) of the body."""
        ys, xs = np.nonzero(self.mask)
        if len(xs) == 0:
            return 0, 0, 0, 0
        return int(xs.min()), int(ys.min()), int(xs.max() - xs.min() + 1), int(ys.max() - ys.min() + 1)

    @property
    def area(self) -> int:
        return int(self.mask.sum())


# ------------------------------------------------------------------------------------------- helpers
def _disk(radius: int):
    import cv2

    radius = max(0, int(radius))
    return cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * radius + 1, 2 * radius + 1))


def dilate(mask: np.ndarray, radius: int) -> np.ndarray:
    import cv2

    if radius <= 0:
        return mask.astype(bool)
    return cv2.dilate(mask.astype(np.uint8), _disk(radius)) > 0


def erode(mask: np.ndarray, radius: int) -> np.ndarray:
    import cv2

    if radius <= 0:
        return mask.astype(bool)
    return cv2.erode(mask.astype(np.uint8), _disk(radius)) > 0


def residual(image: np.ndarray, background: np.ndarray) -> np.ndarray:
    """Per-pixel max-channel |I - B|, lightly smoothed so single noisy pixels do not count."""
    import cv2

    r = np.abs(image - background).max(-1).astype(np.float32)
    return cv2.blur(r, (3, 3))


@dataclass
class BackgroundModel:
    """What a robust fit says about an image: the background, which pixels it explains, its noise."""

    background: np.ndarray
    foreground: np.ndarray  # bool: pixels the background does not explain
    noise: float  # robust std of the pixel noise on explained pixels
    flat: bool  # True when the model explains the image's border (a design), False for photos
    error: float = 0.0  # mean error of the completion on held-out background blocks

    def effect_threshold(self, threshold: float) -> float:
        """Residual that counts as an effect (shadow/glow): above noise and above what completion gets wrong."""
        return max(0.5 * threshold, 4 * self.noise, 2.5 * min(self.error, 1.0))


def initial_foreground(image: np.ndarray, threshold: float) -> np.ndarray:
    """A first guess of what is not background, before any background fit.

    1-D backgrounds (gradients, stripes, horizons): a robust per-iso-line
    median profile of the whole image. Otherwise: closed strong edges — design
    objects have crisp outlines, smooth backgrounds do not — filled in.
    """
    import cv2
    from scipy import ndimage

    h, w = image.shape[:2]
    model = StructureFill(min_coherence=0.0, max_error=np.inf).model(image, np.zeros((h, w), bool))
    res = residual(image, model)
    from .completion import _structure_direction

    _, coherence = _structure_direction(image, np.ones((h, w), bool))
    blur = cv2.GaussianBlur(image, (0, 0), 1.0)
    gx = np.abs(cv2.Sobel(blur, cv2.CV_32F, 1, 0, ksize=3)).max(-1)
    gy = np.abs(cv2.Sobel(blur, cv2.CV_32F, 0, 1, ksize=3)).max(-1)
    edges = np.hypot(gx, gy) > 4 * threshold
    edges = dilate(edges, 1)
    filled = ndimage.binary_fill_holes(edges)
    # a 1-D background (strongly oriented, or explaining most pixels): objects are what it misses. Its
    # profile is a median, so a large object pulls it and only the object's rim stands out; closed outlines
    # clear of the frame add the interior (stripes' outlines run into the frame and stay out). An object
    # pixel left out here is "background" the first fill copies into the object's own hole.
    if (coherence >= 0.3 and (res > threshold).mean() < 0.6) or (res < 0.03).mean() >= 0.6:
        lab, _ = ndimage.label(filled)
        frame = np.unique(np.concatenate([lab[0], lab[-1], lab[:, 0], lab[:, -1]]))
        return dilate(res > threshold, 1) | (filled & ~np.isin(lab, frame))
    return filled


def fit_background(image: np.ndarray, completer: BackgroundCompleter | None = None, threshold: float = 0.08,
                   iterations: int = 4, min_border_fit: float = 0.85, init: np.ndarray | None = None,
                   max_holdout_error: float = 0.04) -> BackgroundModel:
    """Iteratively fit a background that ignores objects: fill the outliers, re-detect, repeat.

    Why iterate: the first fit is pulled towards the objects; each round
    removes what it cannot explain and refits from the rest. `init` is a
    first foreground guess (e.g. the user's boxes); by default
    `initial_foreground`.
    """
    from .completion import PyramidFill

    completer = completer or StructureFill()
    fast = StructureFill(fallback=PyramidFill())  # the iterations only need a rough fill, fast
    h, w = image.shape[:2]
    fg = initial_foreground(image, threshold) if init is None else init.astype(bool)
    for it in range(iterations):
        if fg.all() or not fg.any():
            break
        bg = (fast if it < iterations - 1 else completer)(image, fg)
        new_fg = dilate(residual(image, bg) > threshold, 1)
        if init is not None and it == 0:
            new_fg &= fg  # the user said where the objects are
        if np.array_equal(new_fg, fg):
            break
        fg = new_fg
    bg = completer(image, fg) if fg.any() and not fg.all() else image.copy()
    import cv2

    hp = np.abs(image - cv2.GaussianBlur(image, (0, 0), 1.0)).max(-1)
    noise = float(1.4826 * np.median(hp[~fg])) if (~fg).any() else 1.0
    border = np.zeros((h, w), bool)
    b = max(1, min(h, w) // 25)
    border[:b], border[-b:], border[:, :b], border[:, -b:] = True, True, True, True
    if init is not None and (border & ~init).sum() >= 0.25 * border.sum():
        border &= ~init  # objects the user boxed may touch the frame: judge the rest of it
    flat = bool((~fg[border]).mean() >= min_border_fit and (~fg).mean() >= 0.3)
    error, fill_noise = holdout_stats(image, fg, fast) if flat else (float("inf"), float("inf"))
    flat = flat and error <= max_holdout_error
    # the high-pass counts every edge of a striped or horizon background as noise (4x that hid faint
    # shadows); what the completion gets wrong on held-out background is the noise effects must beat
    noise = min(noise, fill_noise)
    return BackgroundModel(bg, fg, noise, flat, error)


def holdout_stats(image: np.ndarray, fg: np.ndarray, completer: BackgroundCompleter,
                  blocks: int = 8) -> tuple[float, float]:
    """How well the background model predicts background it has not seen: hide a few blocks, fill, compare.

    Why: designs have backgrounds a model can continue (gradients, stripes,
    smooth textures); photos do not. Returns the median over blocks of the
    mean error, and the robust std (1.4826 MAD) of the per-pixel residual
    (`residual`, as effect detection sees it) over all held-out pixels.
    """
    h, w = fg.shape
    size = max(3, min(h, w) // 10)
    rng = np.random.default_rng(0)
    away = ~dilate(fg, size)
    ys, xs = np.nonzero(away[: h - size, : w - size]) if h > size and w > size else (np.array([]), np.array([]))
    if len(ys) == 0:
        return np.inf, np.inf
    errs, res = [], []
    for k in rng.choice(len(ys), size=min(blocks, len(ys)), replace=False):
        hole = np.zeros((h, w), bool)
        hole[ys[k]:ys[k] + size, xs[k]:xs[k] + size] = True
        filled = completer(image, hole, ignore=fg)
        errs.append(float(np.abs(filled - image)[hole].mean()))
        res.append(residual(image, filled)[erode(hole, 1)])
    return float(np.median(errs)), float(1.4826 * np.median(np.concatenate(res)))


def holdout_error(image: np.ndarray, fg: np.ndarray, completer: BackgroundCompleter, blocks: int = 8) -> float:
    """Median over held-out blocks of the completion's mean error (see `holdout_stats`)."""
    return holdout_stats(image, fg, completer, blocks)[0]


def _split_by_colour(image: np.ndarray, component: np.ndarray, body: np.ndarray, min_area: int) -> list[np.ndarray]:
    """Split one connected foreground blob into bodies of distinct flat colours (overlapping objects)."""
    from scipy import ndimage

    from .matting import dominant_colours

    pixels = image[body]
    colours = dominant_colours(pixels, max_colours=4, radius=0.1, min_share=0.08)
    if len(colours) <= 1:
        return [body]
    d = np.abs(image[..., None, :] - colours[None, None]).max(-1)  # H x W x K
    label = d.argmin(-1)
    parts = []
    for k in range(len(colours)):
        sel = body & (label == k) & (d[..., k] < 0.15)
        lab, n = ndimage.label(sel)
        if n == 0:
            continue
        sizes = ndimage.sum(sel, lab, index=np.arange(1, n + 1))
        for i in np.nonzero(sizes >= min_area)[0]:
            parts.append(lab == i + 1)
    parts = _merge_halos(parts, radius=max(2, int(round(0.1 * min(body.shape)))))
    if len(parts) <= 1:
        return [body]
    # give every remaining body pixel to the nearest part
    dist = np.stack([ndimage.distance_transform_edt(~p) for p in parts], -1)
    owner = dist.argmin(-1)
    return [body & (owner == i) for i in range(len(parts))]


def _merge_halos(parts: list[np.ndarray], radius: int) -> list[np.ndarray]:
    """Fold a part that wraps closely around another (a glow, an outline) into it."""
    import cv2

    changed = True
    while changed and len(parts) > 1:
        changed = False
        for i, a in enumerate(parts):
            pts = cv2.findNonZero(a.astype(np.uint8))
            hull = np.zeros(a.shape, np.uint8)
            cv2.fillConvexPoly(hull, cv2.convexHull(pts), 1)
            for j, b in enumerate(parts):
                if i == j:
                    continue
                near = (a & dilate(b, radius)).sum() / a.sum()
                wraps = (hull.astype(bool) & b).sum() / b.sum()
                if near > 0.9 and wraps > 0.8:
                    parts[j] = a | b
                    del parts[i]
                    changed = True
                    break
            if changed:
                break
    return parts


def _assign_regions(bodies: list[np.ndarray], component: np.ndarray) -> list[np.ndarray]:
    """Give every pixel of a blob (effects included) to the nearest body."""
    from scipy import ndimage

    if len(bodies) == 1:
        return [component | bodies[0]]
    dist = np.stack([ndimage.distance_transform_edt(~b) for b in bodies], -1)
    owner = dist.argmin(-1)
    return [(component & (owner == i)) | b for i, b in enumerate(bodies)]


def shadow_like(image: np.ndarray, background: np.ndarray, tol: float = 0.04) -> np.ndarray:
    """Pixels explained as a darkened background (I = s B, s < 0.97): shadows, not bodies."""
    num = (image * background).sum(-1)
    den = np.maximum((background * background).sum(-1), 1e-6)
    s = num / den
    # s >= 0.25: a shadow dims the background, it does not blacken it (black objects are bodies)
    return (s < 0.97) & (s >= 0.25) & (np.abs(image - s[..., None] * background).max(-1) < tol)


def cast_shadows(image: np.ndarray, props: list[InstanceProposal], max_scale: float = 0.85, tol: float = 0.04,
                 min_pixels: int = 4) -> None:
    """Give each proposal the shadow it casts onto *another* object (in place).

    Why: a shadow falling on a lower object is not a darkened background, so
    `shadow_like` misses it and the pixels end up in the lower object's body.
    Pixels of body k that are its own colour darkened (`I = s C_k`,
    0.25 <= s <= `max_scale`; objects' own shading stays above that) and that
    touch another proposal's body or region join that proposal's region. They
    stay in body k too: the pipeline completes them from k's own colour
    (`layered_fill`), so unblending recovers the shadow's alpha over k.
    """
    from scipy import ndimage

    from .matting import dominant_colours

    if len(props) < 2:
        return
    for k, pk in enumerate(props):
        if pk.mask.sum() < 4 * min_pixels:
            continue
        cols = dominant_colours(image[pk.mask], max_colours=2, radius=0.08, min_share=0.25)
        if not len(cols):
            continue
        best = np.zeros(pk.mask.shape, bool)
        for c in cols:
            if c.max() < 0.08:  # a black object cannot be darkened visibly
                continue
            sc = (image * c).sum(-1) / max(float((c * c).sum()), 1e-6)
            fit = np.abs(image - sc[..., None] * c).max(-1) < tol
            best |= fit & (sc >= 0.25) & (sc <= max_scale)
        cand = best & pk.mask
        if cand.sum() < min_pixels:
            continue
        lab, n = ndimage.label(cand)
        for j, pj in enumerate(props):
            if j == k:
                continue
            touch = dilate(pj.mask | (pj.region & ~pk.mask), 1)
            keep = np.unique(lab[touch & cand])
            keep = keep[keep > 0]
            if len(keep):
                shadow = np.isin(lab, keep)
                pj.region = pj.region | shadow
                pj.metadata.setdefault("cast_on", []).append(k)


def layered_fill(image: np.ndarray, hole: np.ndarray, below: list[np.ndarray]) -> np.ndarray | None:
    """Completion of `hole` pixels that lie on a lower object: push-pull from that object's own visible pixels.

    Returns the filled image (only hole & body pixels changed) or None when no hole pixel is on a lower body.
    """
    from .completion import PyramidFill

    out = None
    for body in below:
        part = hole & body
        known = body & ~hole
        if not part.any() or known.sum() < 4:
            continue
        out = image.copy() if out is None else out
        filled = PyramidFill().fill(image, ~known)
        out[part] = np.clip(filled[part], 0, 1)
    return out


def flat_proposals(image: np.ndarray, model: BackgroundModel, min_area_fraction: float = 0.002,
                   body_threshold: float = 0.15) -> list[InstanceProposal]:
    """Connected blobs the background model cannot explain, split into single-colour bodies."""
    from scipy import ndimage

    h, w = image.shape[:2]
    min_area = max(4, int(min_area_fraction * h * w))
    res = residual(image, model.background)
    # the smoothing in `residual` spreads a body one pixel onto the background around it; a pixel the
    # background explains by itself is not body (else that rim splits off as a background-coloured "object")
    raw = np.abs(image - model.background).max(-1)
    strong = (res > body_threshold) & (raw > 0.5 * body_threshold) & ~shadow_like(image, model.background)
    lab, n = ndimage.label(model.foreground)
    proposals = []
    for i in range(1, n + 1):
        comp = lab == i
        body = comp & strong
        if body.sum() < min_area:
            if comp.sum() >= 4 * min_area:  # a pale object: the blob itself is the body
                body = comp & (res > 0.5 * body_threshold)
            if body.sum() < min_area:
                continue
        bodies = _split_by_colour(image, comp, body, min_area)
        for b, region in zip(bodies, _assign_regions(bodies, comp)):
            proposals.append(InstanceProposal(b, region, score=float(res[b].mean()), source="automatic"))
    return _merge_same_colour(image, proposals, gap=max(2, int(round(0.08 * min(h, w)))))


def _merge_same_colour(image, proposals, gap: int):
    """Join nearby pieces of one colour: an object crossing a background of its own colour falls apart."""
    merged = True
    while merged and len(proposals) > 1:
        merged = False
        for i in range(len(proposals)):
            for j in range(i + 1, len(proposals)):
                a, b = proposals[i], proposals[j]
                if not (dilate(a.mask, gap) & b.mask).any():
                    continue
                ca, cb = np.median(image[a.mask], 0), np.median(image[b.mask], 0)
                if np.abs(ca - cb).max() < 0.08:
                    proposals[i] = InstanceProposal(a.mask | b.mask, a.region | b.region,
                                                    max(a.score, b.score), a.source)
                    del proposals[j]
                    merged = True
                    break
            if merged:
                break
    return proposals


def grabcut(image: np.ndarray, rect=None, init_mask: np.ndarray | None = None, iterations: int = 5,
            max_side: int = 320) -> np.ndarray:
    """OpenCV GrabCut at a working resolution; returns a bool mask at full resolution."""
    import cv2

    h, w = image.shape[:2]
    scale = min(1.0, max_side / max(h, w))
    sw, sh = max(8, int(round(w * scale))), max(8, int(round(h * scale)))
    sx, sy = sw / w, sh / h
    small = cv2.resize(np.floor(image * 255 + 0.5).astype(np.uint8), (sw, sh), interpolation=cv2.INTER_AREA)
    bgd, fgd = np.zeros((1, 65), np.float64), np.zeros((1, 65), np.float64)
    if init_mask is not None:
        mask = cv2.resize(init_mask.astype(np.uint8), (sw, sh), interpolation=cv2.INTER_NEAREST)
        mode = cv2.GC_INIT_WITH_MASK
        r = None
    else:
        x, y, bw, bh = rect
        r = (int(x * sx), int(y * sy), max(2, int(bw * sx)), max(2, int(bh * sy)))
        r = (min(r[0], sw - 2), min(r[1], sh - 2), min(r[2], sw - min(r[0], sw - 2)), min(r[3], sh - min(r[1], sh - 2)))
        mask = np.zeros((sh, sw), np.uint8)
        mode = cv2.GC_INIT_WITH_RECT
    try:
        cv2.grabCut(small, mask, r, bgd, fgd, iterations, mode)
    except cv2.error:  # degenerate input (e.g. a single colour): keep the initial guess
        if init_mask is None:
            x, y, bw, bh = r
            mask[y:y + bh, x:x + bw] = cv2.GC_PR_FGD
    fg = np.isin(mask, (cv2.GC_FGD, cv2.GC_PR_FGD)).astype(np.uint8)
    # keep the largest blob: GrabCut leaves specks
    n, lab, stats, _ = cv2.connectedComponentsWithStats(fg, connectivity=8)
    if n > 2:
        keep = 1 + int(np.argmax(stats[1:, cv2.CC_STAT_AREA]))
        fg = (lab == keep).astype(np.uint8)
    return cv2.resize(fg, (w, h), interpolation=cv2.INTER_LINEAR) > 0


def effects_around(image: np.ndarray, body: np.ndarray, completer: BackgroundCompleter, radius: int,
                   threshold: float, limit: np.ndarray | None = None) -> np.ndarray:
    """Body + the changed pixels around it (shadow, glow) that connect to it."""
    from scipy import ndimage

    search = dilate(body, radius)
    if limit is not None:
        search &= limit | body
    if search.all():
        return body.copy()
    bg = completer(image, search)
    changed = (residual(image, bg) > threshold) & search
    lab, _ = ndimage.label(changed | body)
    keep = np.unique(lab[body])
    keep = keep[keep > 0]
    return np.isin(lab, keep) | body


# ------------------------------------------------------------------------------------------- proposers
class InstanceProposer:
    """Base class: `proposer(image) -> list[InstanceProposal]`."""

    name = "proposer"

    #: proposals are computed at most this large (longest side), then scaled back: fitting a
    #: background model to a 12-megapixel photo buys nothing but minutes
    work_size = 384

    def __init__(self, completer: BackgroundCompleter | None = None, threshold: float = 0.08,
                 effect_radius: float = 0.12):
        self.completer = completer or StructureFill()
        self.threshold, self.effect_radius = float(threshold), float(effect_radius)

    def __call__(self, image: np.ndarray) -> list[InstanceProposal]:
        import cv2

        image = np.asarray(image, np.float32)
        h, w = image.shape[:2]
        scale = self.work_size / max(h, w)
        self._check_guidance(h, w)
        if scale >= 1.0:
            return self.propose(image)
        sw, sh = max(8, int(round(w * scale))), max(8, int(round(h * scale)))
        small = cv2.resize(image, (sw, sh), interpolation=cv2.INTER_AREA)
        props = self._scaled(sw / w, sh / h).propose(small)

        def up(m):
            return cv2.resize(m.astype(np.uint8) * 255, (w, h), interpolation=cv2.INTER_LINEAR) >= 128

        for p in props:
            p.mask, p.region = up(p.mask), up(p.region) | up(p.mask)
        return props

    def _check_guidance(self, h, w):
        """Validate user guidance against the full-size image (before any scaling)."""

    def _scaled(self, sx: float, sy: float) -> "InstanceProposer":
        return self

    def propose(self, image):  # pragma: no cover - abstract
        raise NotImplementedError

    def _radius(self, image) -> int:
        return max(2, int(round(self.effect_radius * min(image.shape[:2]))))

    def _with_effects(self, image, body, model: BackgroundModel, source: str) -> InstanceProposal:
        if model.flat:
            region = effects_around(image, body, self.completer, self._radius(image),
                                    model.effect_threshold(self.threshold))
        else:
            region = dilate(body, max(1, min(image.shape[:2]) // 100))
        return InstanceProposal(body, region, source=source)

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class AutomaticProposer(InstanceProposer):
    """No guidance: background-model residual blobs on designs, GrabCut saliency on photos."""

    name = "automatic"

    def __init__(self, completer=None, threshold: float = 0.08, effect_radius: float = 0.12,
                  max_instances: int = 16, photo_margin: float = 0.1, max_flat_instances: int = 8,
                 min_object_fraction: float = 0.015):
        super().__init__(completer, threshold, effect_radius)
        self.max_instances, self.photo_margin = int(max_instances), float(photo_margin)
        self.max_flat_instances, self.min_object_fraction = int(max_flat_instances), float(min_object_fraction)

    def propose(self, image):
        model = fit_background(image, self.completer, self.threshold)
        props = flat_proposals(image, model) if model.flat else []
        h, w = image.shape[:2]
        if props and (len(props) > self.max_flat_instances
                      or max(p.area for p in props) < self.min_object_fraction * h * w):
            props = []  # many small blobs: texture of a photo, not objects of a design
        if props:
            for p in props:  # make sure faint effect tails that the global fit missed are included
                p.region = p.region | effects_around(image, p.mask, self.completer, self._radius(image),
                                                     model.effect_threshold(self.threshold),
                                                     limit=~_others(props, p))
            cast_shadows(image, props)
            props.sort(key=lambda p: -p.area)
            return props[: self.max_instances]
        m = self.photo_margin
        rect = (int(m * w), int(m * h), max(2, int((1 - 2 * m) * w)), max(2, int((1 - 2 * m) * h)))
        body = grabcut(image, rect=rect)
        if body.sum() < 16 or body.all():
            return []
        model.flat = False
        return [self._with_effects(image, body, model, "saliency")]


def _others(props, p):
    out = np.zeros_like(p.mask)
    for q in props:
        if q is not p:
            out |= q.mask
    return out


def _box_mask(box, h, w) -> np.ndarray:
    x, y, bw, bh = box
    m = np.zeros((h, w), bool)
    m[max(0, y):max(0, y + bh), max(0, x):max(0, x + bw)] = True
    return m


def check_box(box, h: int, w: int) -> tuple[int, int, int, int]:
    """Validate an (x, y, w, h) box against an image; clip it to the canvas."""
    try:
        x, y, bw, bh = (int(round(float(v))) for v in box)
    except (TypeError, ValueError):
        raise LayergenError(f"a box must be four numbers x,y,w,h, got {box!r}") from None
    if bw <= 0 or bh <= 0:
        raise LayergenError(f"box {x},{y},{bw},{bh} has no area (width and height must be > 0)")
    if x >= w or y >= h or x + bw <= 0 or y + bh <= 0:
        raise LayergenError(f"box {x},{y},{bw},{bh} lies outside the {w}x{h} image")
    x0, y0 = max(0, x), max(0, y)
    return x0, y0, min(w, x + bw) - x0, min(h, y + bh) - y0


class BoxProposer(InstanceProposer):
    """User boxes `(x, y, w, h)`: on designs, the pixels in the box the background cannot explain
    (plus the effects around them); on photos, GrabCut inside the box.

    The background is fitted with the boxes (grown by the effect radius) as the
    first foreground guess. Pixels claimed by several boxes (overlaps) go to
    the box whose own, unshared pixels have the closest colour.
    """

    name = "box"

    def __init__(self, boxes, completer=None, threshold: float = 0.08, effect_radius: float = 0.12):
        super().__init__(completer, threshold, effect_radius)
        self.boxes = [tuple(b) for b in boxes]
        if not self.boxes:
            raise LayergenError("BoxProposer needs at least one box")

    def _check_guidance(self, h, w):
        for b in self.boxes:
            check_box(b, h, w)

    def _scaled(self, sx, sy):
        boxes = [(b[0] * sx, b[1] * sy, max(1.0, b[2] * sx), max(1.0, b[3] * sy)) for b in self.boxes]
        return BoxProposer(boxes, self.completer, self.threshold, self.effect_radius)

    def propose(self, image):
        h, w = image.shape[:2]
        boxes = [check_box(b, h, w) for b in self.boxes]
        insides = [_box_mask(b, h, w) for b in boxes]
        grown = np.zeros((h, w), bool)
        for m in insides:
            grown |= dilate(m, self._radius(image))
        # boxes localise the objects, so a rougher background model still separates them: looser flatness
        model = fit_background(image, self.completer, self.threshold, init=grown, max_holdout_error=0.08)
        if not model.flat and grown.mean() > 0.7:  # boxes cover the image: judge flatness without them
            model.flat = fit_background(image, self.completer, self.threshold).flat
        if model.flat:
            res = residual(image, model.background)
            strong = (res > self.threshold) & ~shadow_like(image, model.background)
            bodies = [m & strong for m in insides]
            bodies = _resolve_shared(image, bodies, [b[2] * b[3] for b in boxes])
            for k, m in enumerate(insides):
                if bodies[k].sum() < 4:  # the object blends in: trust the user's box
                    bodies[k] = m & (res > 0.5 * self.threshold)
                if bodies[k].sum() < 4:
                    bodies[k] = m
                bodies[k] = _largest_blobs(bodies[k], min_fraction=0.15)
        else:
            bodies = []
            for box, m in zip(boxes, insides):
                body = grabcut(image, rect=box) & dilate(m, 2)
                bodies.append(body if body.sum() >= 4 else m)
        props = []
        for k, (box, body) in enumerate(zip(boxes, bodies)):
            others = np.zeros((h, w), bool)
            for j, b in enumerate(bodies):
                if j != k:
                    others |= b
            if model.flat:
                region = effects_around(image, body, self.completer, self._radius(image),
                                        model.effect_threshold(self.threshold), limit=~others)
            else:
                region = dilate(body, max(1, min(h, w) // 100))
            p = InstanceProposal(body, region, source="box", metadata={"box": box})
            props.append(p)
        if model.flat:
            cast_shadows(image, props)
        return props


def _resolve_shared(image, bodies, areas):
    """Give pixels claimed by several bodies to the one whose unshared pixels match their colour best."""
    if len(bodies) <= 1:
        return bodies
    count = np.sum(bodies, axis=0)
    shared = count > 1
    if not shared.any():
        return bodies
    from .matting import dominant_colours

    refs = []
    for b in bodies:
        own = b & ~shared
        cols = dominant_colours(image[own if own.sum() >= 8 else b], max_colours=2, radius=0.1, min_share=0.2)
        refs.append(cols if len(cols) else np.full((1, 3), np.inf, np.float32))
    ys, xs = np.nonzero(shared)
    px = image[ys, xs]
    best = np.full(len(px), np.inf)
    owner = np.full(len(px), -1)
    for k, b in enumerate(bodies):
        d = np.abs(px[:, None, :] - refs[k][None]).max(-1).min(-1)
        d = np.where(b[ys, xs], d + 1e-3 * areas[k] / max(areas), np.inf)  # ties: the smaller box
        better = d < best
        best, owner = np.where(better, d, best), np.where(better, k, owner)
    out = [b.copy() for b in bodies]
    for k in range(len(out)):
        out[k][ys, xs] = owner == k
    return out


def _largest_blobs(mask: np.ndarray, min_fraction: float) -> np.ndarray:
    """Drop specks: keep connected parts holding at least `min_fraction` of the largest part."""
    from scipy import ndimage

    lab, n = ndimage.label(mask)
    if n <= 1:
        return mask
    sizes = ndimage.sum(mask, lab, index=np.arange(1, n + 1))
    keep = np.nonzero(sizes >= min_fraction * sizes.max())[0] + 1
    return np.isin(lab, keep)


class MaskProposer(InstanceProposer):
    """User masks (bool or 0..255 arrays the size of the image): each is one instance body."""

    name = "mask"

    def __init__(self, masks, completer=None, threshold: float = 0.08, effect_radius: float = 0.12):
        super().__init__(completer, threshold, effect_radius)
        self.masks = list(masks)
        if not self.masks:
            raise LayergenError("MaskProposer needs at least one mask")

    def _check_guidance(self, h, w):
        self._bodies(h, w)

    def _scaled(self, sx, sy):
        import cv2

        h, w = np.asarray(self.masks[0]).shape[:2]
        sw, sh = max(8, int(round(w * sx))), max(8, int(round(h * sy)))
        bodies = self._bodies(h, w)
        small = [cv2.resize(b.astype(np.uint8), (sw, sh), interpolation=cv2.INTER_AREA) > 0 for b in bodies]
        return MaskProposer(small, self.completer, self.threshold, self.effect_radius)

    def _bodies(self, h, w):
        bodies = []
        for i, m in enumerate(self.masks):
            m = np.asarray(m)
            if m.ndim == 3:
                m = m[..., -1] if m.shape[2] in (2, 4) else m.max(-1)
            if m.shape != (h, w):
                raise LayergenError(f"mask {i} is {m.shape[1] if m.ndim > 1 else '?'}x{m.shape[0]} "
                                    f"but the image is {w}x{h}")
            body = m > (127 if m.dtype == np.uint8 else 0.5)
            if not body.any():
                raise LayergenError(f"mask {i} is empty (no pixel selected)")
            bodies.append(body)
        return bodies

    def propose(self, image):
        h, w = image.shape[:2]
        bodies = self._bodies(h, w)
        model = fit_background(image, self.completer, self.threshold)
        return [self._with_effects(image, b, model, "mask") for b in bodies]


class PointProposer(InstanceProposer):
    """User clicks `(x, y)`: the automatic instance under (or nearest to) each point."""

    name = "point"

    def __init__(self, points, completer=None, threshold: float = 0.08, effect_radius: float = 0.12):
        super().__init__(completer, threshold, effect_radius)
        self.points = [tuple(p) for p in points]
        if not self.points:
            raise LayergenError("PointProposer needs at least one point")

    def _check_guidance(self, h, w):
        self._points(h, w)

    def _scaled(self, sx, sy):
        return PointProposer([(p[0] * sx, p[1] * sy) for p in self._points(10 ** 9, 10 ** 9)], self.completer,
                             self.threshold, self.effect_radius)

    def _points(self, h, w):
        pts = []
        for p in self.points:
            try:
                x, y = (int(round(float(v))) for v in p)
            except (TypeError, ValueError):
                raise LayergenError(f"a point must be two numbers x,y, got {p!r}") from None
            if not (0 <= x < w and 0 <= y < h):
                raise LayergenError(f"point {x},{y} lies outside the {w}x{h} image")
            pts.append((x, y))
        return pts

    def propose(self, image):
        from scipy import ndimage

        h, w = image.shape[:2]
        pts = [(min(x, w - 1), min(y, h - 1)) for x, y in self._points(10 ** 9, 10 ** 9)]
        model = fit_background(image, self.completer, self.threshold)
        props = []
        if model.flat:
            cands = flat_proposals(image, model)
            for x, y in pts:
                if not cands:
                    break
                d = [ndimage.distance_transform_edt(~c.mask)[y, x] for c in cands]
                best = cands[int(np.argmin(d))]
                if not any(best is q for q in props):
                    best.source = "point"
                    props.append(best)
            for p in props:
                p.region = p.region | effects_around(image, p.mask, self.completer, self._radius(image),
                                                     model.effect_threshold(self.threshold),
                                                     limit=~_others(props, p))
            return props
        for x, y in pts:
            init = np.full((h, w), 2, np.uint8)  # GC_PR_BGD everywhere
            r = max(2, min(h, w) // 4)
            init[max(0, y - r):y + r, max(0, x - r):x + r] = 3  # GC_PR_FGD around the click
            init[dilate(_point_mask(x, y, h, w), max(1, min(h, w) // 50))] = 1  # GC_FGD at the click
            body = grabcut(image, init_mask=init)
            props.append(self._with_effects(image, body if body.any() else _point_mask(x, y, h, w), model, "point"))
        return props


def _point_mask(x, y, h, w):
    m = np.zeros((h, w), bool)
    m[y, x] = True
    return m


# ------------------------------------------------------------------------------------------- ordering
def order_top_first(proposals: list[InstanceProposal], above: np.ndarray | None = None) -> list[InstanceProposal]:
    """Occlusion order, topmost first.

    For two touching bodies, the occluded one has a "bite" out of its shape:
    its convex hull reaches into the other body. The body whose hull covers
    less of the other is on top. Unrelated bodies: lower on the canvas first
    (nearer the viewer in most photos), then smaller first. `above[i, j]`
    (bool n x n: i is above j), when given, replaces the hull rule (e.g. from
    the learned layer matte).
    """
    n = len(proposals)
    if n <= 1:
        return list(proposals)
    if above is None:
        above = _hull_order(proposals)
    return _topological(proposals, np.asarray(above, bool))


def _hull_order(proposals: list[InstanceProposal]) -> np.ndarray:
    import cv2

    n = len(proposals)
    hulls = []
    for p in proposals:
        pts = cv2.findNonZero(p.mask.astype(np.uint8))
        hull = np.zeros(p.mask.shape, np.uint8)
        if pts is not None:
            cv2.fillConvexPoly(hull, cv2.convexHull(pts), 1)
        hulls.append(hull > 0)
    above = np.zeros((n, n), bool)  # above[i, j]: i is above j
    for i in range(n):
        for j in range(i + 1, n):
            if not (dilate(proposals[i].mask, 2) & proposals[j].mask).any():
                continue
            i_bites_j = (hulls[j] & proposals[i].mask).sum() / max(1, proposals[i].area)
            j_bites_i = (hulls[i] & proposals[j].mask).sum() / max(1, proposals[j].area)
            if abs(i_bites_j - j_bites_i) < 1e-3:
                continue
            if i_bites_j > j_bites_i:  # j's hull reaches into i: j is the occluded one
                above[i, j] = True
            else:
                above[j, i] = True
    return above


def _topological(proposals: list[InstanceProposal], above: np.ndarray) -> list[InstanceProposal]:
    n = len(proposals)

    def key(k):
        box = proposals[k].box
        return (-(box[1] + box[3]), proposals[k].area)

    order, left = [], set(range(n))
    while left:
        free = [k for k in left if not any(above[m, k] for m in left if m != k)]
        if not free:  # a cycle: break it with the tie rule
            free = list(left)
        k = min(free, key=key)
        order.append(k)
        left.remove(k)
    return [proposals[k] for k in order]


PROPOSERS = {"automatic": AutomaticProposer, "box": BoxProposer, "mask": MaskProposer, "point": PointProposer}
