"""Procedural layered mannequins: a parametric body of primitives plus cumulative clothing.

Stands in for SMPL + SynBody (neither is usable here). A `Mannequin` is a pure function
of its seed: body proportions (height, girth, limb lengths, shoulder width), skin and hair
colour, one of `POSES`, and a subset of the garments in `LAYER_NAMES` order, each with a
colour and a fit (shell thickness) and a variant (long/short).

Layers are cumulative, as in HumanLiff: layer k = body + garments 1..k. Every shape is a
signed distance function (SDF); layer k's SDF is `min(sdf_{k-1}, sdf_garment_k)`, so

* occupancy only grows (layer k contains layer k-1: density_k >= density_{k-1} everywhere), and
* wherever the garment's SDF is not the smaller one (all uncovered body parts and the space
  around them), density and colour of layer k equal those of layer k-1 exactly.

Density is `SIGMA_MAX * sigmoid(-sdf / SDF_SCALE)`; colour is the albedo of the nearest
part, shaded by a fixed world-space light (so colour is view-independent and a tri-plane
can hold it). World axes and cameras: see layergen/models/volume_renderer.py and
docs/conventions_3d.md.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch

from ..errors import LayergenError

LAYER_NAMES = ("body", "pants", "shirt", "shoes", "hat")
GARMENTS = LAYER_NAMES[1:]
POSES = ("a_pose", "t_pose", "walk", "relaxed")
SIGMA_MAX = 150.0
BLEND = 0.03  # smooth-union radius of the body joints
SDF_SCALE = 0.006
FLOOR_Y = -0.95
# seeds >= this are reserved for held-out subjects (never used to fit the decoder or train diffusion)
HELDOUT_SEED_START = 1_000_000
LIGHT_DIR = (0.35, 0.75, 0.55)
# point sampling for supervision: the reference step that turns density into a bounded opacity
REF_STEP = 2.0 / 64

SKIN_TONES = np.array([[0.96, 0.80, 0.69], [0.91, 0.72, 0.58], [0.80, 0.60, 0.45], [0.66, 0.46, 0.33],
                       [0.50, 0.34, 0.24], [0.36, 0.24, 0.17]], np.float32)
HAIR_COLOURS = np.array([[0.10, 0.07, 0.05], [0.30, 0.18, 0.09], [0.55, 0.38, 0.20], [0.80, 0.65, 0.35],
                         [0.45, 0.45, 0.45]], np.float32)
GARMENT_PALETTE = np.array([
    [0.85, 0.15, 0.15], [0.15, 0.35, 0.80], [0.15, 0.60, 0.25], [0.95, 0.80, 0.15], [0.55, 0.20, 0.65],
    [0.10, 0.10, 0.12], [0.92, 0.92, 0.95], [0.95, 0.50, 0.10], [0.10, 0.60, 0.65], [0.60, 0.60, 0.62],
    [0.20, 0.22, 0.45], [0.85, 0.35, 0.55]], np.float32)


def layer_index(name: str) -> int:
    """Class index of a layer name (0 = body)."""
    try:
        return LAYER_NAMES.index(name)
    except ValueError:
        raise LayergenError(f"unknown layer {name!r}; choose from {', '.join(LAYER_NAMES)}") from None


def parse_layers(spec) -> tuple[str, ...]:
    """'body,pants,shirt' or a sequence -> validated tuple in canonical order, body first."""
    names = [s.strip() for s in (spec.split(",") if isinstance(spec, str) else spec) if str(s).strip()]
    if not names:
        raise LayergenError("no layers given; e.g. --layers body,pants,shirt,shoes")
    idx = [layer_index(n) for n in names]
    if len(set(idx)) != len(idx):
        raise LayergenError(f"a layer is repeated in {','.join(names)}")
    if idx != sorted(idx):
        raise LayergenError(f"layers must follow the order {','.join(LAYER_NAMES)}; got {','.join(names)}")
    if idx[0] != 0:
        raise LayergenError("the first layer must be 'body' (clothing is generated on a body)")
    return tuple(names)


# ----------------------------------------------------------------------------- SDF primitives (torch)
def sdf_capsule(p, a, b, ra, rb):
    """Tapered capsule from a (radius ra) to b (radius rb); a distance bound, exact when ra == rb."""
    ba = b - a
    h = ((p - a) @ ba / (ba @ ba)).clamp(0.0, 1.0)
    r = ra + (rb - ra) * h
    return (p - a - h[:, None] * ba).norm(dim=-1) - r


def sdf_ellipsoid(p, c, radii, rot=None):
    """Ellipsoid (approximate SDF, Quilez). `rot` (3, 3) maps world to local axes."""
    q = p - c
    if rot is not None:
        q = q @ rot.T
    k0 = (q / radii).norm(dim=-1)
    k1 = (q / (radii * radii)).norm(dim=-1).clamp_min(1e-9)
    return k0 * (k0 - 1.0) / k1


def smin(a, b, k):
    """Polynomial smooth minimum (blends joints so the body is one smooth surface)."""
    h = (k - (a - b).abs()).clamp_min(0.0) / k
    return torch.minimum(a, b) - h * h * k * 0.25


@dataclass
class Part:
    """One primitive with optional cuts: keep the side where dot(p - point, normal) <= 0."""

    kind: str                      # 'capsule' | 'ellipsoid'
    params: dict
    colour: np.ndarray
    cuts: list = field(default_factory=list)

    def sdf(self, p: torch.Tensor) -> torch.Tensor:
        """Reference (one part at a time) SDF; `PartSet` is the fast batched version."""
        t = {k: (torch.as_tensor(np.asarray(v, np.float32)) if np.ndim(v) else float(v)) for k, v in self.params.items()}
        if self.kind == "capsule":
            d = sdf_capsule(p, t["a"], t["b"], t["ra"], t["rb"])
        else:
            d = sdf_ellipsoid(p, t["c"], t["radii"], t.get("rot"))
        for point, normal in self.cuts:
            n = torch.as_tensor(_unit(normal))
            d = torch.maximum(d, (p - torch.as_tensor(np.asarray(point, np.float32))) @ n)
        return d


class PartSet:
    """Many parts evaluated at once: distances (N, P) through a few matrix products.

    Capsule distances use |q - a|^2 = |q|^2 - 2 q.a + |a|^2 (one matmul for all capsules)
    and ellipsoids one (3, 3E) transform into every scaled local frame, which is several
    times faster on CPU than a Python loop over parts. Columns are ordered capsules first,
    then ellipsoids (`colours` follows the same order).
    """

    def __init__(self, parts: list):
        f32 = lambda x: torch.as_tensor(np.asarray(x, np.float32))  # noqa: E731
        caps = [i for i, pt in enumerate(parts) if pt.kind == "capsule"]
        ells = [i for i, pt in enumerate(parts) if pt.kind != "capsule"]
        order = caps + ells
        self.parts = [parts[i] for i in order]
        self.ncap = len(caps)
        if caps:
            a = f32([parts[i].params["a"] for i in caps])
            ba = f32([parts[i].params["b"] for i in caps]) - a
            self.ca2, self.cba = (2 * a).T.contiguous(), ba.T.contiguous()
            self.cbb = (ba * ba).sum(-1)
            self.cad = (a * ba).sum(-1)
            self.caa = (a * a).sum(-1)
            self.cra = f32([parts[i].params["ra"] for i in caps])
            self.crd = f32([parts[i].params["rb"] for i in caps]) - self.cra
        if ells:
            mats, offs, radii = [], [], []
            for i in ells:
                prm = parts[i].params
                r = np.asarray(prm["radii"], np.float32)
                m = np.asarray(prm.get("rot", np.eye(3)), np.float32) / r[:, None]    # scaled local frame
                mats.append(m)
                offs.append(m @ np.asarray(prm["c"], np.float32))
                radii.append(r)
            self.emat = f32(np.concatenate(mats, 0)).T.contiguous()   # (3, 3E)
            self.eoff = f32(np.concatenate(offs, 0))
            self.einv = 1.0 / f32(radii)                              # (E, 3)
        cuts = [(j, _unit(n), float(np.dot(_unit(n), np.asarray(pt, np.float32))))
                for j, part in enumerate(self.parts) for pt, n in part.cuts]
        self.cut_idx = torch.tensor([c[0] for c in cuts], dtype=torch.long)
        self.cut_n = f32([c[1] for c in cuts]).T.contiguous() if cuts else None
        self.cut_c = f32([c[2] for c in cuts]) if cuts else None
        self.colours = f32([pt.colour for pt in self.parts])

    def sample_surface(self, num: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """`num` points on the parts' surfaces, parts chosen by (approximate) area.

        Cut-away sides and parts hidden inside others are sampled too: they are still
        near the body, which is all the fitting needs.
        """
        areas = []
        for pt in self.parts:
            if pt.kind == "capsule":
                r = 0.5 * (pt.params["ra"] + pt.params["rb"])
                L = float(np.linalg.norm(np.asarray(pt.params["b"]) - np.asarray(pt.params["a"])))
                areas.append(2 * math.pi * r * L + 4 * math.pi * r * r)
            else:
                a, b, c = (float(x) for x in pt.params["radii"])
                areas.append(4 * math.pi * (((a * b) ** 1.6 + (a * c) ** 1.6 + (b * c) ** 1.6) / 3) ** (1 / 1.6))
        probs = torch.tensor(areas) / sum(areas)
        which = torch.multinomial(probs, num, replacement=True, generator=generator)
        dirs = torch.randn(num, 3, generator=generator)
        dirs = dirs / dirs.norm(dim=-1, keepdim=True).clamp_min(1e-8)
        h = torch.rand(num, generator=generator)
        out = torch.empty(num, 3)
        for j, pt in enumerate(self.parts):
            sel = (which == j).nonzero(as_tuple=True)[0]
            if not sel.numel():
                continue
            prm = pt.params
            if pt.kind == "capsule":
                a = torch.as_tensor(np.asarray(prm["a"], np.float32))
                ba = torch.as_tensor(np.asarray(prm["b"], np.float32)) - a
                ax = ba / ba.norm()
                d = dirs[sel] - (dirs[sel] @ ax)[:, None] * ax
                d = d / d.norm(dim=-1, keepdim=True).clamp_min(1e-8)
                r = prm["ra"] + (prm["rb"] - prm["ra"]) * h[sel]
                out[sel] = a + h[sel, None] * ba + r[:, None] * d
            else:
                rot = torch.as_tensor(np.asarray(prm.get("rot", np.eye(3)), np.float32))
                local = dirs[sel] * torch.as_tensor(np.asarray(prm["radii"], np.float32))
                out[sel] = torch.as_tensor(np.asarray(prm["c"], np.float32)) + local @ rot
        return out

    def distances(self, p: torch.Tensor) -> torch.Tensor:
        n = p.shape[0]
        cols = []
        if self.ncap:
            pd = p @ self.cba - self.cad                                  # (q - a) . ba
            pa2 = (p * p).sum(-1, keepdim=True) - p @ self.ca2 + self.caa
            h = (pd / self.cbb).clamp(0.0, 1.0)
            dist = (pa2 - h * (2 * pd - h * self.cbb)).clamp_min(1e-12).sqrt()
            cols.append(dist - (self.cra + self.crd * h))
        if self.ncap < len(self.parts):
            q = (p @ self.emat - self.eoff).reshape(n, -1, 3)            # (N, E, 3) = local / radii
            k0 = (q * q).sum(-1).sqrt()
            q = q * self.einv
            k1 = (q * q).sum(-1).sqrt().clamp_min(1e-9)
            cols.append(k0 * (k0 - 1.0) / k1)
        d = torch.cat(cols, 1) if len(cols) > 1 else cols[0]
        if self.cut_n is not None:
            cv = p @ self.cut_n - self.cut_c                              # (N, cuts)
            cut = torch.full_like(d, -1e9).scatter_reduce(1, self.cut_idx.expand(n, -1), cv, reduce="amax")
            d = torch.maximum(d, cut)
        return d


def _unit(v):
    v = np.asarray(v, np.float64)
    return (v / np.linalg.norm(v)).astype(np.float32)


def _limb_dir(abduct_deg, flex_deg, side):
    """Direction from a joint: straight down, flexed forward (+z) by `flex`, abducted sideways by `abduct`."""
    a, f = math.radians(abduct_deg), math.radians(flex_deg)
    return _unit([side * math.sin(a), -math.cos(a) * math.cos(f), math.cos(a) * math.sin(f)])


def _foot_rot(yaw_deg=0.0):
    """World->local rotation for a foot pointing along +z (yawed about y)."""
    y = math.radians(yaw_deg)
    return np.array([[math.cos(y), 0, -math.sin(y)], [0, 1, 0], [math.sin(y), 0, math.cos(y)]], np.float32)


# ----------------------------------------------------------------------------- the mannequin
@dataclass
class Garment:
    kind: str            # one of GARMENTS
    colour: np.ndarray   # albedo, RGB in [0, 1]
    fit: float           # shell thickness (scene units): ~0.012 tight .. 0.035 loose
    variant: str = ""    # pants: long/shorts; shirt: long/short sleeves; hat: cap


@dataclass
class Mannequin:
    seed: int
    height: float
    girth: float
    leg_ratio: float
    arm_ratio: float
    shoulder: float
    skin: np.ndarray
    hair: np.ndarray
    pose: str
    angles: dict
    garments: list

    @property
    def layers(self) -> tuple[str, ...]:
        """Layer names, body first, garments in canonical order (layer k = body + first k garments)."""
        return ("body",) + tuple(g.kind for g in self.garments)

    def describe(self) -> dict:
        return {"seed": self.seed, "pose": self.pose, "height": round(self.height, 4), "girth": round(self.girth, 4),
                "leg_ratio": round(self.leg_ratio, 4), "arm_ratio": round(self.arm_ratio, 4),
                "skin": [round(float(c), 3) for c in self.skin],
                "garments": [{"kind": g.kind, "variant": g.variant, "fit": round(g.fit, 4),
                              "colour": [round(float(c), 3) for c in g.colour]} for g in self.garments]}

    # -- skeleton ------------------------------------------------------------------------------
    def joints(self) -> dict:
        H, g, s = self.height, self.girth, self.height / 1.8
        ang = self.angles
        y_ankle = FLOOR_Y + 0.05 * s
        leg_len = self.leg_ratio * H - 0.05 * s
        head_h, neck_h = 0.23 * s, 0.06 * s
        y_top = FLOOR_Y + H
        y_head_c = y_top - head_h / 2
        y_neck = y_top - head_h
        y_shoulder = y_neck - neck_h
        hip_x = 0.085 * s * g
        y_hip = y_ankle + leg_len * math.cos(math.radians(max(abs(ang["hip_l"]), abs(ang["hip_r"])) * 0.5))
        J = {"head": np.array([0, y_head_c, 0.0]), "neck": np.array([0, y_neck, 0.0]),
             "shoulder_c": np.array([0, y_shoulder, 0.0]), "hip_c": np.array([0, y_hip, 0.0])}
        sh_x = 0.17 * s * g * self.shoulder
        upper, fore = 0.19 * self.arm_ratio / 0.42 * H, 0.16 * self.arm_ratio / 0.42 * H
        thigh, shin = 0.53 * leg_len, 0.47 * leg_len
        for side, sx in (("l", 1.0), ("r", -1.0)):
            sh = np.array([sx * sh_x, y_shoulder - 0.035 * s, 0.0])
            d1 = _limb_dir(ang["arm_abd"], ang[f"arm_flex_{side}"], sx)
            el = sh + d1 * upper
            d2 = _limb_dir(ang["arm_abd"] * 0.9, ang[f"arm_flex_{side}"] + ang["elbow"], sx)
            wr = el + d2 * fore
            hip = np.array([sx * hip_x, y_hip, 0.0])
            d3 = _limb_dir(ang["leg_abd"], ang[f"hip_{side}"], sx)
            kn = hip + d3 * thigh
            d4 = _limb_dir(ang["leg_abd"], ang[f"hip_{side}"] - ang[f"knee_{side}"], sx)
            an = kn + d4 * shin
            J.update({f"shoulder_{side}": sh, f"elbow_{side}": el, f"wrist_{side}": wr, f"hand_dir_{side}": d2,
                      f"hip_{side}": hip, f"knee_{side}": kn, f"ankle_{side}": an})
        # stand on the floor: lift/lower so the lowest ankle is at y_ankle
        dy = y_ankle - min(J["ankle_l"][1], J["ankle_r"][1])
        for k in J:
            if not k.startswith("hand_dir"):
                J[k] = J[k] + np.array([0, dy, 0])
        return {k: v.astype(np.float32) for k, v in J.items()}

    # -- parts ---------------------------------------------------------------------------------
    def body_parts(self) -> list[Part]:
        J, s, g = self.joints(), self.height / 1.8, self.girth
        skin = self.skin
        P = [Part("ellipsoid", {"c": J["head"], "radii": np.array([0.085, 0.112, 0.095], np.float32) * s}, skin),
             Part("ellipsoid", {"c": J["head"] + np.array([0, 0.022, -0.012], np.float32) * s,
                                "radii": np.array([0.089, 0.102, 0.095], np.float32) * s}, self.hair,
                  cuts=[(J["head"] + np.array([0, 0.005, 0.03], np.float32) * s, _unit([0, -0.6, 1.0]))]),
             Part("capsule", {"a": J["neck"] + np.array([0, 0.03 * s, 0], np.float32), "b": J["shoulder_c"],
                              "ra": 0.045 * s * g, "rb": 0.05 * s * g}, skin)]
        yc, yh = J["shoulder_c"][1], J["hip_c"][1]
        torso_len = yc - yh
        P.append(Part("ellipsoid", {"c": np.array([0, yc - 0.3 * torso_len, 0], np.float32),
                                    "radii": np.array([0.165 * g * self.shoulder, 0.34 * torso_len, 0.105 * g], np.float32) * np.array([s, 1, s], np.float32)}, skin))
        P.append(Part("ellipsoid", {"c": np.array([0, yh + 0.42 * torso_len, 0], np.float32),
                                    "radii": np.array([0.135 * g, 0.36 * torso_len, 0.095 * g], np.float32) * np.array([s, 1, s], np.float32)}, skin))
        P.append(Part("ellipsoid", {"c": np.array([0, yh + 0.06 * s, 0], np.float32),
                                    "radii": np.array([0.155 * g * s, 0.12 * s, 0.105 * g * s], np.float32)}, skin))
        for side in ("l", "r"):
            P += [Part("capsule", {"a": J[f"shoulder_{side}"], "b": J[f"elbow_{side}"], "ra": 0.05 * s * g, "rb": 0.04 * s * g}, skin),
                  Part("capsule", {"a": J[f"elbow_{side}"], "b": J[f"wrist_{side}"], "ra": 0.04 * s * g, "rb": 0.031 * s * g}, skin),
                  Part("ellipsoid", {"c": J[f"wrist_{side}"] + J[f"hand_dir_{side}"] * 0.06 * s,
                                     "radii": np.array([0.035, 0.065, 0.035], np.float32) * s}, skin),
                  Part("capsule", {"a": J[f"hip_{side}"], "b": J[f"knee_{side}"], "ra": 0.085 * s * g, "rb": 0.058 * s * g}, skin),
                  Part("capsule", {"a": J[f"knee_{side}"], "b": J[f"ankle_{side}"], "ra": 0.055 * s * g, "rb": 0.038 * s * g}, skin),
                  Part("ellipsoid", {"c": J[f"ankle_{side}"] + np.array([0, -0.02, 0.05], np.float32) * s,
                                     "radii": np.array([0.042, 0.035, 0.105], np.float32) * s,
                                     "rot": _foot_rot(6.0 if side == "l" else -6.0)}, skin)]
        return P

    def garment_parts(self, gm: Garment) -> list[Part]:
        J, s, gi, t = self.joints(), self.height / 1.8, self.girth, gm.fit
        body = self.body_parts()
        col = gm.colour
        by_key = {"chest": body[3], "belly": body[4], "pelvis": body[5]}

        def inflate(part, dt, cuts=(), extra=None):
            prm = dict(part.params)
            if part.kind == "capsule":
                prm["ra"], prm["rb"] = prm["ra"] + dt, prm["rb"] + dt
            else:
                prm["radii"] = prm["radii"] + dt
            if extra:
                prm.update(extra)
            return Part(part.kind, prm, col, list(cuts))

        def limb_cut(a, b, frac):
            """Cut perpendicular to limb a->b at fraction `frac`, keeping the a side."""
            d = _unit(J[b] - J[a])
            return (J[a] + (J[b] - J[a]) * frac, d)

        out = []
        if gm.kind == "pants":
            waist = J["hip_c"] + np.array([0, 0.13 * s, 0], np.float32)
            out.append(inflate(by_key["pelvis"], t, [(waist, np.array([0, 1, 0], np.float32))]))
            out.append(inflate(by_key["belly"], t, [(waist, np.array([0, 1, 0], np.float32))]))
            for side, i0 in (("l", 0), ("r", 1)):
                thigh, shin = body[6 + 6 * i0 + 3], body[6 + 6 * i0 + 4]
                if gm.variant == "shorts":
                    out.append(inflate(thigh, t, [limb_cut(f"hip_{side}", f"knee_{side}", 0.7)]))
                else:
                    out.append(inflate(thigh, t))
                    out.append(inflate(shin, t, [limb_cut(f"knee_{side}", f"ankle_{side}", 0.9)]))
        elif gm.kind == "shirt":
            neck_cut = (J["shoulder_c"] + np.array([0, -0.005, 0], np.float32), np.array([0, 1, 0.35], np.float32))
            hem = (J["hip_c"] + np.array([0, 0.03 * s, 0], np.float32), np.array([0, -1, 0], np.float32))
            for key in ("chest", "belly", "pelvis"):
                out.append(inflate(by_key[key], t + 0.004, [neck_cut, hem]))
            for side, i0 in (("l", 0), ("r", 1)):
                upper, fore = body[6 + 6 * i0], body[6 + 6 * i0 + 1]
                if gm.variant == "short":
                    out.append(inflate(upper, t, [limb_cut(f"shoulder_{side}", f"elbow_{side}", 0.6)]))
                else:
                    out.append(inflate(upper, t))
                    out.append(inflate(fore, t, [limb_cut(f"elbow_{side}", f"wrist_{side}", 0.92)]))
        elif gm.kind == "shoes":
            for side, i0 in (("l", 0), ("r", 1)):
                foot, shin = body[6 + 6 * i0 + 5], body[6 + 6 * i0 + 4]
                out.append(inflate(foot, t + 0.01))
                out.append(inflate(shin, t + 0.008, [(J[f"ankle_{side}"] + np.array([0, 0.06 * s, 0], np.float32),
                                                      np.array([0, 1, 0], np.float32))]))
        elif gm.kind == "hat":
            head = body[0]
            c = head.params["c"]
            brim_y = c[1] + 0.02 * s
            out.append(inflate(head, t + 0.012, [(np.array([0, brim_y, 0], np.float32), np.array([0, -1, 0], np.float32))]))
            out.append(Part("ellipsoid", {"c": np.array([c[0], brim_y + 0.005 * s, c[2] + 0.07 * s], np.float32),
                                          "radii": np.array([0.10, 0.014, 0.12], np.float32) * s}, col))
        else:  # pragma: no cover - guarded by sampling
            raise LayergenError(f"unknown garment {gm.kind!r}")
        return out

    # -- fields --------------------------------------------------------------------------------
    def _components(self, layer: int):
        """[(parts, label)] for body and garments up to `layer` (inclusive); built once."""
        if getattr(self, "_comp_cache", None) is None:
            self._comp_cache = [(PartSet(self.body_parts()), 0)] + [
                (PartSet(self.garment_parts(gm)), LAYER_NAMES.index(gm.kind)) for gm in self.garments]
        return self._comp_cache[:layer + 1]

    def _resolve_layer(self, layer) -> int:
        n = len(self.layers)
        if isinstance(layer, str):
            if layer not in self.layers:
                raise LayergenError(f"mannequin {self.seed} has no layer {layer!r} (layers: {', '.join(self.layers)})")
            return self.layers.index(layer)
        layer = n - 1 if layer is None else (layer + n if layer < 0 else layer)
        if not 0 <= layer < n:
            raise LayergenError(f"layer index {layer} out of range for {n} layers")
        return layer

    def _sdf_colour(self, p: torch.Tensor, k: int):
        """(sdf, albedo, label) of layer k at points p; differentiable in p."""
        best_col = best_lab = total = None
        for parts, lab in self._components(k):
            ds = parts.distances(p)                                              # (N, P)
            if lab == 0:  # one smooth body surface: smooth-min of the two nearest parts blends the joints
                two, arg2 = ds.topk(2, dim=1, largest=False)
                dmin, arg = two[:, 0], arg2[:, 0]
                comp = smin(dmin, two[:, 1], BLEND)
            else:
                dmin, arg = ds.min(1)
                comp = dmin
            col, labv = parts.colours[arg], torch.full_like(dmin, float(lab))
            if total is None:
                best_col, best_lab, total = col, labv, comp
            else:  # the garment wins where its surface is nearer: the outer shell's colour shows
                win = comp < total
                best_col = torch.where(win[:, None], col, best_col)
                best_lab = torch.where(win, labv, best_lab)
                total = torch.minimum(total, comp)
        return total, best_col, best_lab

    def evaluate(self, points: torch.Tensor, layer=None, shading: bool = True) -> dict:
        """Ground-truth field of layer `layer` (index, name, or None = top) at points (N, 3).

        Returns dict(sdf (N,), sigma (N,), albedo (N, 3), rgb (N, 3) shaded, label (N,) layer
        class of the visible part: 0 body, 1 pants, ...). Normals for shading come from the
        SDF gradient, computed only near the surface (elsewhere a ray never sees the colour).
        """
        k = self._resolve_layer(layer)
        p = points.detach().float()
        with torch.no_grad():
            parts = [self._sdf_colour(p[i:i + 16384], k) for i in range(0, p.shape[0], 16384)]
            sdf, albedo, lab = (torch.cat(x) for x in zip(*parts)) if parts else (p[:, 0], p, p[:, 0])
        sigma = SIGMA_MAX * torch.sigmoid(-sdf / SDF_SCALE)
        rgb = albedo * 0.55
        if shading:
            near = (sdf.abs() < 0.06).nonzero(as_tuple=True)[0]
            if near.numel():
                q = p[near].clone().requires_grad_(True)
                with torch.enable_grad():
                    d, _, _ = self._sdf_colour(q, k)
                    (grad,) = torch.autograd.grad(d.sum(), q)
                n = grad / grad.norm(dim=-1, keepdim=True).clamp_min(1e-8)
                shade = 0.55 + 0.45 * (n @ torch.tensor(_unit(LIGHT_DIR))).clamp_min(0.0)
                rgb = rgb.index_copy(0, near, (albedo[near] * shade[:, None]).clamp(0, 1))
        else:
            rgb = albedo
        return {"sdf": sdf, "sigma": sigma, "albedo": albedo, "rgb": rgb, "label": lab.long()}

    def field(self, layer=None, chunk: int = 131072):
        """A renderer field (points, dirs) -> (sigma, rgb) for one layer."""
        def _f(points, dirs):
            outs = [self.evaluate(points[i:i + chunk], layer) for i in range(0, points.shape[0], chunk)]
            return torch.cat([o["sigma"] for o in outs]), torch.cat([o["rgb"] for o in outs])
        return _f

    def label_field(self, layer=None, chunk: int = 131072):
        """points -> one-hot layer class (N, len(LAYER_NAMES)) of the visible part, for region masks."""
        def _f(points):
            outs = [self.evaluate(points[i:i + chunk], layer, shading=False)["label"] for i in range(0, points.shape[0], chunk)]
            return torch.nn.functional.one_hot(torch.cat(outs), len(LAYER_NAMES)).float()
        return _f


# ----------------------------------------------------------------------------- sampling
def sample_mannequin(seed: int, garments=None, pose: str | None = None, hat_prob: float = 0.35,
                     garment_prob: float = 1.0) -> Mannequin:
    """A random mannequin, a pure function of `seed`.

    garments: explicit tuple of garment kinds (canonical order enforced), or None: pants,
    shirt and shoes each kept with probability `garment_prob` and a hat with `hat_prob`.
    """
    rng = np.random.default_rng([int(seed), 9])
    if pose is None:
        pose = POSES[int(rng.integers(len(POSES)))]
    if pose not in POSES:
        raise LayergenError(f"unknown pose {pose!r}; choose from {', '.join(POSES)}")
    J = lambda lo, hi: float(rng.uniform(lo, hi))  # noqa: E731
    angles = {"arm_abd": {"a_pose": 28, "t_pose": 88, "walk": 10, "relaxed": 7}[pose] + J(-4, 4),
              "elbow": {"a_pose": 8, "t_pose": 0, "walk": 15, "relaxed": 5}[pose] + J(0, 6),
              "leg_abd": {"a_pose": 7, "t_pose": 4, "walk": 2, "relaxed": 2}[pose] + J(-1.5, 1.5)}
    if pose == "walk":
        swing = J(18, 28)
        angles.update(arm_flex_l=-swing, arm_flex_r=swing, hip_l=swing * 0.9, hip_r=-swing * 0.7,
                      knee_l=J(5, 12), knee_r=J(12, 22))
    else:
        angles.update(arm_flex_l=J(-4, 4), arm_flex_r=J(-4, 4), hip_l=J(-2, 2), hip_r=J(-2, 2),
                      knee_l=J(0, 3), knee_r=J(0, 3))
    skin = SKIN_TONES[int(rng.integers(len(SKIN_TONES)))] * J(0.95, 1.05)
    hair = HAIR_COLOURS[int(rng.integers(len(HAIR_COLOURS)))]
    height, girth = J(1.68, 1.88), J(0.85, 1.2)
    leg_ratio, arm_ratio, shoulder = J(0.45, 0.51), J(0.39, 0.45), J(0.92, 1.1)
    if garments is None:
        kinds = [g for g in ("pants", "shirt", "shoes") if rng.random() < garment_prob]
        if rng.random() < hat_prob:
            kinds.append("hat")
    else:
        kinds = list(parse_layers(["body", *garments]))[1:]
    out, used = [], [skin]
    for kind in GARMENTS:
        if kind not in kinds:
            continue
        # a colour clearly different from the skin and the other garments (clothing must be visible)
        order = rng.permutation(len(GARMENT_PALETTE))
        colour = next((GARMENT_PALETTE[i] for i in order
                       if min(np.abs(GARMENT_PALETTE[i] - u).sum() for u in used) > 0.45), GARMENT_PALETTE[order[0]])
        colour = np.clip(colour * J(0.9, 1.08), 0, 1).astype(np.float32)
        used.append(colour)
        if kind == "pants":
            variant = "shorts" if rng.random() < 0.3 else "long"
        elif kind == "shirt":
            variant = "short" if rng.random() < 0.4 else "long"
        else:
            variant = "cap" if kind == "hat" else ""
        out.append(Garment(kind, colour, J(0.012, 0.035) if kind != "shoes" else J(0.008, 0.02), variant))
    return Mannequin(seed=int(seed), height=height, girth=girth, leg_ratio=leg_ratio, arm_ratio=arm_ratio,
                     shoulder=shoulder, skin=np.clip(skin, 0, 1).astype(np.float32), hair=hair, pose=pose,
                     angles=angles, garments=out)


def sample_training_points(m: Mannequin, layer, num_points: int, generator: torch.Generator | None = None,
                           near_surface: float = 0.5, in_box: float = 0.3, noise=(0.008, 0.03)) -> dict:
    """3D supervision for fitting: points (N, 3) with ground-truth density and colour.

    A `near_surface` fraction is drawn on the layer's primitives and jittered (half with
    each std in `noise`), an `in_box` fraction uniformly in the mannequin's bounding box
    (where tri-plane "ghosts" appear: points whose three projections all land on the
    body), the rest uniformly in the scene box. Targets: `sigma`, `alpha` =
    1 - exp(-sigma * REF_STEP) (bounded: what one render step sees) and shaded `rgb`, with
    `surface` flagging points within 0.03 of the surface (only there is colour ever seen).
    """
    k = m._resolve_layer(layer)
    comps = m._components(k)
    n_surf = int(num_points * near_surface)
    counts = torch.tensor([len(ps.parts) for ps, _ in comps], dtype=torch.float32)
    per = torch.multinomial(counts / counts.sum(), n_surf, replacement=True, generator=generator).bincount(
        minlength=len(comps))
    surf = torch.cat([ps.sample_surface(int(c), generator) for (ps, _), c in zip(comps, per.tolist()) if c])
    std = torch.where(torch.rand(n_surf, generator=generator) < 0.5, noise[0], noise[1])
    surf = surf + torch.randn(surf.shape, generator=generator) * std[:, None]
    n_box = int(num_points * in_box)
    bmin, bmax = (torch.tensor(b) for b in body_box(m))
    boxed = bmin + (bmax - bmin) * torch.rand(n_box, 3, generator=generator)
    uni = torch.rand(num_points - n_surf - n_box, 3, generator=generator) * 2 - 1
    pts = torch.cat([surf, boxed, uni]).clamp(-1, 1)
    gt = m.evaluate(pts, k)
    return {"points": pts, "sigma": gt["sigma"], "alpha": 1 - torch.exp(-gt["sigma"] * REF_STEP), "rgb": gt["rgb"],
            "surface": (gt["sdf"].abs() < 0.03).float(), "label": gt["label"]}


def render_mannequin(m: Mannequin, layer, c2w: torch.Tensor, K: torch.Tensor, size: int, num_coarse: int = 96,
                     num_importance: int = 96, labels: bool = False) -> dict:
    """Ground-truth RGBA renders (V, H, W, 4) float [0, 1] of one layer, plus region labels.

    With labels=True also returns 'labels' (V, H, W) int: the layer class (0 body, 1 pants,
    ...) of the visible surface, -1 where alpha < 0.5 (the GT region masks).
    """
    from ..models.volume_renderer import VolumeRenderer

    r = VolumeRenderer(num_coarse=num_coarse, num_importance=num_importance, chunk=8192)
    bmin, bmax = body_box(m)
    out = r.render_views(m.field(layer), c2w, K, size, size, box_min=bmin, box_max=bmax,
                         extra=m.label_field(layer) if labels else None)
    res = {"rgba": out["rgba"]}
    if labels:
        lab = out["extra"].argmax(-1)
        res["labels"] = torch.where(out["rgba"][..., 3] >= 0.5, lab, torch.full_like(lab, -1))
    return res


def body_box(m: Mannequin, pad: float = 0.08):
    """A loose axis-aligned box around the mannequin (all layers), clipped to the scene box."""
    J = m.joints()
    pts = np.stack([v for k, v in J.items() if not k.startswith("hand_dir")])
    lo = np.maximum(pts.min(0) - 0.2 - pad, -1.0)
    hi = np.minimum(pts.max(0) + 0.2 + pad, 1.0)
    lo[1] = max(FLOOR_Y - pad, -1.0)
    hi[1] = min(FLOOR_Y + m.height + 0.05 + pad, 1.0)
    return tuple(float(v) for v in lo), tuple(float(v) for v in hi)


def layer_labels_name(label: int) -> str:
    return "background" if label < 0 else LAYER_NAMES[label]
