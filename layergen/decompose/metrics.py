"""Decomposition metrics against ground-truth layers (used by `benchmarks/decomposition.py` and tests).

Layers are matched one-to-one before scoring, LayersEditDist-style: the
assignment minimising (1 - alpha IoU) + RGB L1 over all pairs (Hungarian);
ground-truth layers left unmatched count as deletions (IoU 0, L1 against an
empty layer), surplus predictions as insertions (counted, not scored). We
match without order because non-overlapping layers have no defined order;
`order_accuracy` scores the order of overlapping pairs separately.
"""
from __future__ import annotations

import numpy as np


def _f(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x)
    return x.astype(np.float64) / 255.0 if x.dtype == np.uint8 else x.astype(np.float64)


def alpha_iou(a: np.ndarray, b: np.ndarray) -> float:
    """Soft IoU of two alpha maps in [0, 1]: sum(min) / sum(max) (1 when both are empty)."""
    a, b = _f(a), _f(b)
    den = np.maximum(a, b).sum()
    return 1.0 if den <= 0 else float(np.minimum(a, b).sum() / den)


def rgb_l1(pred_rgba: np.ndarray, true_rgba: np.ndarray) -> float:
    """Mean |premultiplied RGB difference| over the pixels either layer covers (0..1 scale)."""
    p, t = _f(pred_rgba), _f(true_rgba)
    pm, tm = p[..., :3] * p[..., 3:4], t[..., :3] * t[..., 3:4]
    union = (p[..., 3] > 0) | (t[..., 3] > 0)
    if not union.any():
        return 0.0
    return float(np.abs(pm - tm)[union].mean())


def match_layers(pred: list[np.ndarray], true: list[np.ndarray]) -> list[tuple[int, int]]:
    """(pred_index, true_index) pairs of the best one-to-one assignment."""
    from scipy.optimize import linear_sum_assignment

    if not pred or not true:
        return []
    cost = np.zeros((len(pred), len(true)))
    for i, p in enumerate(pred):
        for j, t in enumerate(true):
            cost[i, j] = (1.0 - alpha_iou(p[..., 3], t[..., 3])) + rgb_l1(p, t)
    rows, cols = linear_sum_assignment(cost)
    return [(int(r), int(c)) for r, c in zip(rows, cols) if alpha_iou(pred[r][..., 3], true[c][..., 3]) > 0.0]


def psnr(a, b, mask=None, cap: float = 60.0) -> float:
    """PSNR in dB (uint8 scaled to [0, 1], floats taken as [0, 1]) over `mask` if given (NaN for an empty mask),
    capped at `cap`: identical images give the cap, not infinity, so means over images stay finite."""
    a, b = _f(a), _f(b)
    d = (a - b) ** 2
    if mask is not None:
        if not mask.any():
            return float("nan")
        d = d[mask]
    mse = float(d.mean())
    return cap if mse <= 10 ** (-cap / 10) else float(min(cap, 10 * np.log10(1.0 / mse)))


def evaluate(pred_stack, scene) -> dict:
    """Score a predicted `LayerStack` against a procedural `Scene` (see module docstring).

    Returns per-image numbers; `shadow_num/shadow_den` and `bg_sq_err/bg_count`
    are sums so that a benchmark can pool them over images.
    """
    gt_layers = [o.rgba for o in scene.objects]
    layers = list(pred_stack.layers)
    bg_layer = layers[0] if layers and layers[0].metadata.get("kind") == "background" else None
    inst = [l for l in layers if l is not bg_layer]
    pred = [_canvas(l, pred_stack.width, pred_stack.height) for l in inst]
    pairs = match_layers(pred, gt_layers)
    by_true = {j: i for i, j in pairs}
    ious, l1s = [], []
    for j, t in enumerate(gt_layers):
        if j in by_true:
            p = pred[by_true[j]]
            ious.append(alpha_iou(p[..., 3], t[..., 3]))
            l1s.append(rgb_l1(p, t))
        else:
            ious.append(0.0)
            l1s.append(rgb_l1(np.zeros_like(t), t))
    # background inside the formerly occluded area
    covered = np.zeros((scene.size, scene.size), bool)
    for o in scene.objects:
        covered |= o.rgba[..., 3] > 25
    bg_pred = _canvas(bg_layer, pred_stack.width, pred_stack.height)[..., :3] if bg_layer is not None else \
        np.zeros_like(scene.background)
    diff = (_f(bg_pred) - _f(scene.background)) ** 2
    bg_psnr = psnr(bg_pred, scene.background, covered)
    # shadow alpha that lands in its object's layer (visible shadow pixels only)
    shadow_num = shadow_den = 0.0
    for j, o in enumerate(scene.objects):
        if o.effect != "shadow":
            continue
        vis = np.ones_like(o.body_alpha, np.float64)
        for upper in scene.objects[j + 1:]:
            vis *= 1.0 - _f(upper.rgba[..., 3])
        gt_a = _f(o.rgba[..., 3])
        m = (o.effect_alpha > 0.05) & (o.body_alpha < 0.05)
        w = vis[m]
        shadow_den += float((w * gt_a[m]).sum())
        if j in by_true:
            pa = _f(pred[by_true[j]][..., 3])
            shadow_num += float((w * np.minimum(pa[m], gt_a[m])).sum())
    # occlusion order of overlapping ground-truth pairs
    order_ok = order_n = 0
    pos = {j: i for i, j in pairs}
    for a in range(len(gt_layers)):
        for b in range(a + 1, len(gt_layers)):
            if not ((gt_layers[a][..., 3] > 25) & (gt_layers[b][..., 3] > 25)).any():
                continue
            if a in pos and b in pos:
                order_n += 1
                order_ok += int(pos[a] < pos[b])
    recomposite = psnr(pred_stack.composite()[..., :3], scene.composite, cap=100.0)
    return {
        "alpha_iou": float(np.mean(ious)) if ious else 1.0,
        "rgb_l1": float(np.mean(l1s)) if l1s else 0.0,
        "bg_psnr_occluded": bg_psnr,
        "bg_sq_err": float(diff[covered].sum()), "bg_count": int(covered.sum() * 3),
        "shadow_num": shadow_num, "shadow_den": shadow_den,
        "order_ok": order_ok, "order_n": order_n,
        "recomposite_psnr": recomposite,
        "num_pred": len(pred), "num_true": len(gt_layers), "num_matched": len(pairs),
    }


def _canvas(layer, width, height) -> np.ndarray:
    """A layer's pixels placed on the full canvas (offset and clipping applied), uint8 RGBA."""
    out = np.zeros((height, width, 4), np.uint8)
    h, w = layer.pixels.shape[:2]
    x0, y0 = max(layer.x, 0), max(layer.y, 0)
    x1, y1 = min(layer.x + w, width), min(layer.y + h, height)
    if x0 < x1 and y0 < y1:
        out[y0:y1, x0:x1] = layer.pixels[y0 - layer.y:y1 - layer.y, x0 - layer.x:x1 - layer.x]
    return out


def summarise(rows: list[dict]) -> dict:
    """Aggregate per-image `evaluate` rows: means, plus pooled shadow share and pooled background PSNR."""
    def mean(k):
        v = [r[k] for r in rows if r.get(k) is not None and r[k] == r[k]]
        return float(np.mean(v)) if v else float("nan")

    sq = sum(r["bg_sq_err"] for r in rows)
    cnt = sum(r["bg_count"] for r in rows)
    pooled = float(10 * np.log10(1.0 / max(sq / cnt, 1e-10))) if cnt else float("nan")
    sden = sum(r["shadow_den"] for r in rows)
    on = sum(r["order_n"] for r in rows)
    return {
        "alpha_iou": mean("alpha_iou"),
        "rgb_l1": mean("rgb_l1"),
        "bg_psnr_occluded": mean("bg_psnr_occluded"),
        "bg_psnr_occluded_pooled": pooled,
        "shadow_in_layer": sum(r["shadow_num"] for r in rows) / sden if sden else float("nan"),
        "order_accuracy": sum(r["order_ok"] for r in rows) / on if on else float("nan"),
        "recomposite_psnr": mean("recomposite_psnr"),
        "seconds_per_image": mean("seconds"),
        "layer_count_error": float(np.mean([abs(r["num_pred"] - r["num_true"]) for r in rows])) if rows else 0.0,
        "images": len(rows),
    }
