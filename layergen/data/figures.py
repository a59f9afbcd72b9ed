"""Procedural articulated figures: the action domain of the mini family (ADI, `layergen action`).

Why procedural: an action benchmark needs images whose *pose* is known exactly and varies
independently of the *subject* (species, colour) and the *context* (background). Here
every sample is a pure function of its seed: a species-specific body on a shared
skeleton, posed by one of `ACTIONS`, drawn in profile (facing right) on a background.

* Subjects: `SPECIES` (cat, bird, robot, frog) x `FIGURE_COLOURS`.
* Contexts: `FIGURE_BACKGROUNDS`.
* Actions: `ACTIONS` (11 poses). `HELDOUT_ACTIONS` are never named in training captions
  (`caption()` omits them), so a model trained on these captions can only produce them
  on demand through a learned identifier; `SEEN_ACTIONS` may be named.

Skeleton angles are absolute, in degrees: 0 points straight down, 90 points forward
(the way the figure faces), 180 straight up. The spine angle is measured from straight
up (positive leans forward). Parts are drawn at 4x with a dark outline and box-filtered
down, so limbs stay legible through an 8x-downsampling VAE.
"""
from __future__ import annotations

import math
import zlib
from dataclasses import dataclass

import cv2
import numpy as np

from ..layers.compositing import to_uint8

SUPERSAMPLE = 4
HELDOUT_SEED_START = 1_000_000

SPECIES = ("cat", "bird", "robot", "frog")
FIGURE_COLOURS = {
    "red": (215, 45, 45),
    "orange": (240, 135, 25),
    "yellow": (235, 205, 30),
    "green": (45, 160, 65),
    "blue": (45, 90, 225),
    "purple": (140, 60, 200),
}
FIGURE_BACKGROUNDS = {  # name -> caption phrase
    "meadow": "in a meadow",
    "beach": "on a beach",
    "snow": "in the snow",
    "night": "at night",
    "room": "in a room",
}

# name -> (verb form used in captions, pose). Pose: spine, near arm (upper, fore), far arm, near leg
# (thigh, shin), far leg, lift (fraction of body height above the ground).
_POSES = {
    "stand": ("standing", dict(spine=0, arm_n=(12, 18), arm_f=(-12, -6), leg_n=(5, 0), leg_f=(-5, 0))),
    "sit": ("sitting", dict(spine=-12, arm_n=(-35, -35), arm_f=(-42, -42), leg_n=(90, 90), leg_f=(84, 84))),
    "stretch": ("stretching", dict(spine=0, arm_n=(172, 178), arm_f=(190, 184), leg_n=(22, 22),
                                   leg_f=(-22, -22))),
    "crouch": ("crouching", dict(spine=40, arm_n=(75, 85), arm_f=(62, 75), leg_n=(100, -12), leg_f=(88, -22))),
    "run": ("running", dict(spine=18, arm_n=(-50, 35), arm_f=(45, 135), leg_n=(55, -5), leg_f=(-40, -105))),
    "point": ("pointing", dict(spine=0, arm_n=(90, 90), arm_f=(-6, 0), leg_n=(5, 0), leg_f=(-5, 0))),
    "dance": ("dancing", dict(spine=-12, arm_n=(140, 110), arm_f=(-115, -160), leg_n=(-30, -95),
                              leg_f=(8, 0))),
    "jump": ("jumping", dict(spine=-4, arm_n=(145, 160), arm_f=(130, 150), leg_n=(75, -25), leg_f=(55, -45),
                             lift=0.22)),
    "wave": ("waving", dict(spine=0, arm_n=(118, 178), arm_f=(-8, -2), leg_n=(5, 0), leg_f=(-5, 0))),
    "kick": ("kicking", dict(spine=-18, arm_n=(-65, -40), arm_f=(65, 85), leg_n=(98, 95), leg_f=(-6, 0))),
    "bow": ("bowing", dict(spine=78, arm_n=(6, 6), arm_f=(-2, -2), leg_n=(3, 0), leg_f=(-6, 0))),
}
ACTIONS = tuple(_POSES)
ACTION_VERBS = {k: v[0] for k, v in _POSES.items()}
HELDOUT_ACTIONS = ("jump", "wave", "kick", "bow")
SEEN_ACTIONS = tuple(a for a in ACTIONS if a not in HELDOUT_ACTIONS)

# Body proportions in units of the skeleton height unit (0.8 of the canvas; a standing figure is ~0.6).
_BODY = {
    #         torso (len, width), head (w, h), upper/fore arm, thigh/shin, limb width, arm width
    "cat": dict(torso=(0.27, 0.17), head=(0.2, 0.18), arm=(0.13, 0.13), leg=(0.15, 0.15), limb=0.075, armw=0.07),
    "bird": dict(torso=(0.28, 0.22), head=(0.18, 0.17), arm=(0.14, 0.14), leg=(0.16, 0.15), limb=0.055,
                 armw=0.1),
    "robot": dict(torso=(0.28, 0.2), head=(0.19, 0.17), arm=(0.13, 0.13), leg=(0.15, 0.15), limb=0.085,
                  armw=0.08),
    "frog": dict(torso=(0.24, 0.22), head=(0.26, 0.15), arm=(0.12, 0.12), leg=(0.16, 0.14), limb=0.09, armw=0.08),
}
OUTLINE = (30, 30, 35)


@dataclass
class FigureSample:
    """One rendered figure: the RGB image and every factor that made it."""

    image: np.ndarray  # H x W x 3 uint8
    species: str
    colour: str
    background: str
    action: str
    seed: int
    joints: dict  # name -> (x, y) in pixels
    matte: tuple[np.ndarray, np.ndarray] | None = None  # (premultiplied figure H x W x 3, alpha H x W), floats

    @property
    def subject(self) -> str:
        return f"{self.colour} {self.species}"

    def caption(self, with_action: bool = False) -> str:
        """'a red cat in a meadow'; the action verb only if asked for AND the action is not held out."""
        verb = f" {ACTION_VERBS[self.action]}" if with_action and self.action not in HELDOUT_ACTIONS else ""
        return f"a {self.subject}{verb} {FIGURE_BACKGROUNDS[self.background]}"

    def metadata(self) -> dict:
        return {"species": self.species, "colour": self.colour, "background": self.background,
                "action": self.action, "seed": self.seed, "caption": self.caption()}


def subject_caption(species: str, colour: str, background: str) -> str:
    return f"a {colour} {species} {FIGURE_BACKGROUNDS[background]}"


# ---------------------------------------------------------------------------------------------
# backgrounds


def render_background(name: str, size: int, rng: np.random.Generator) -> tuple[np.ndarray, float]:
    """(H x W x 3 float32 in [0, 1], ground line y in pixels)."""
    if name not in FIGURE_BACKGROUNDS:
        raise ValueError(f"unknown background {name!r}; expected one of {tuple(FIGURE_BACKGROUNDS)}")
    ground = size * float(rng.uniform(0.7, 0.78))
    y = np.arange(size, dtype=np.float32)[:, None, None] / size
    img = np.zeros((size, size, 3), np.float32)
    sky = y < ground / size
    spec = {
        "meadow": ((150, 200, 245), (215, 235, 250), (120, 185, 80), (95, 150, 60)),
        "beach": ((120, 190, 240), (200, 230, 250), (235, 215, 160), (215, 190, 130)),
        "snow": ((175, 190, 210), (225, 230, 240), (245, 248, 252), (215, 225, 235)),
        "night": ((15, 20, 50), (45, 50, 90), (55, 55, 65), (35, 35, 45)),
        "room": ((225, 205, 170), (210, 190, 155), (150, 100, 60), (120, 80, 45)),
    }[name]
    c = [np.asarray(v, np.float32) / 255 for v in spec]
    t_sky = np.clip(y / max(ground / size, 1e-3), 0, 1)
    t_gnd = np.clip((y - ground / size) / max(1 - ground / size, 1e-3), 0, 1)
    img[:] = np.where(sky, c[0] * (1 - t_sky) + c[1] * t_sky, c[2] * (1 - t_gnd) + c[3] * t_gnd)
    if name == "beach":  # a band of sea above the sand
        sea = (y[..., 0] >= ground / size - 0.07) & (y[..., 0] < ground / size)
        img[np.broadcast_to(sea, (size, size))] = np.asarray((40, 110, 190), np.float32) / 255
    elif name == "night":  # a few stars and a moon
        for _ in range(int(rng.integers(6, 12))):
            sx, sy = rng.uniform(0, size), rng.uniform(0, ground * 0.8)
            cv2.circle(img, (int(sx), int(sy)), max(1, size // 128), (0.95, 0.95, 0.8), -1)
        mx, my = rng.uniform(0.1, 0.3) * size * (1 if rng.random() < 0.5 else 3.5), rng.uniform(0.1, 0.25) * size
        cv2.circle(img, (int(mx), int(my)), int(size * 0.06), (0.95, 0.93, 0.75), -1, cv2.LINE_AA)
    elif name == "room":  # skirting board and a window
        cv2.rectangle(img, (0, int(ground) - max(2, size // 40)), (size, int(ground)), (0.95, 0.93, 0.88), -1)
        wx = int(rng.uniform(0.05, 0.65) * size)
        cv2.rectangle(img, (wx, int(size * 0.12)), (wx + int(size * 0.28), int(size * 0.38)), (0.65, 0.82, 0.95), -1)
    elif name == "meadow":  # tufts of grass
        for _ in range(int(rng.integers(5, 10))):
            gx, gy = rng.uniform(0, size), rng.uniform(ground + 3, size - 2)
            cv2.line(img, (int(gx), int(gy)), (int(gx + 2), int(gy - size * 0.03)), (0.3, 0.55, 0.2), 1)
    elif name == "snow":  # falling flakes
        for _ in range(int(rng.integers(8, 16))):
            sx, sy = rng.uniform(0, size), rng.uniform(0, ground)
            cv2.circle(img, (int(sx), int(sy)), max(1, size // 128), (1, 1, 1), -1)
    return img, ground


# ---------------------------------------------------------------------------------------------
# skeleton


def _vec(angle_deg: float, length: float) -> np.ndarray:
    """Absolute limb angle (0 down, 90 forward = +x, 180 up) -> (dx, dy) in image coordinates."""
    a = math.radians(angle_deg)
    return np.array([math.sin(a) * length, math.cos(a) * length])


def pose_joints(action: str, species: str, height: float, rng: np.random.Generator | None = None,
                jitter: float = 6.0) -> dict:
    """Joint positions (pelvis at the origin) for `action`, with angles jittered by up to `jitter` degrees."""
    if action not in _POSES:
        raise ValueError(f"unknown action {action!r}; expected one of {ACTIONS}")
    p = dict(_POSES[action][1])
    b = _BODY[species]
    j = (lambda: float(rng.uniform(-jitter, jitter))) if rng is not None else (lambda: 0.0)
    spine = math.radians(p["spine"] + j())
    torso = b["torso"][0] * height
    pelvis = np.zeros(2)
    chest = pelvis + np.array([math.sin(spine), -math.cos(spine)]) * torso
    neck = pelvis + np.array([math.sin(spine), -math.cos(spine)]) * (torso + b["head"][1] * height * 0.55)
    joints = {"pelvis": pelvis, "chest": chest, "head": neck, "spine_angle": math.degrees(spine)}
    shoulder = pelvis + (chest - pelvis) * 0.88
    for side in ("n", "f"):
        up, fo = p[f"arm_{side}"]
        elbow = shoulder + _vec(up + j(), b["arm"][0] * height)
        hand = elbow + _vec(fo + j(), b["arm"][1] * height)
        th, sh = p[f"leg_{side}"]
        knee = pelvis + _vec(th + j(), b["leg"][0] * height)
        foot = knee + _vec(sh + j(), b["leg"][1] * height)
        joints.update({f"shoulder_{side}": shoulder, f"elbow_{side}": elbow, f"hand_{side}": hand,
                       f"knee_{side}": knee, f"foot_{side}": foot})
    joints["lift"] = p.get("lift", 0.0) * height
    return joints


# ---------------------------------------------------------------------------------------------
# drawing


def _shade(rgb, k: float):
    return tuple(float(np.clip(c * k, 0, 1)) for c in rgb)


class _Canvas:
    """A 4x supersampled float canvas; every part is drawn outline-first, then filled."""

    def __init__(self, img: np.ndarray, scale: float, outline: float):
        s = SUPERSAMPLE
        self.img = cv2.resize(img, (img.shape[1] * s, img.shape[0] * s), interpolation=cv2.INTER_NEAREST)
        self.s, self.outline = s, max(1, int(round(outline * s)))
        self.ink = tuple(c / 255 for c in OUTLINE)

    def _p(self, xy):
        return (int(round(xy[0] * self.s)), int(round(xy[1] * self.s)))

    def limb(self, a, b, width, colour, square=False):
        w = max(1, int(round(width * self.s)))
        for col, extra in ((self.ink, 2 * self.outline), (colour, 0)):
            cv2.line(self.img, self._p(a), self._p(b), col, w + extra, cv2.LINE_AA)
            for pt in (a, b):
                if square:
                    h = (w + extra) // 2
                    c = self._p(pt)
                    cv2.rectangle(self.img, (c[0] - h, c[1] - h), (c[0] + h, c[1] + h), col, -1)
                else:
                    cv2.circle(self.img, self._p(pt), (w + extra) // 2, col, -1, cv2.LINE_AA)

    def ellipse(self, centre, axes, angle_deg, colour):
        c, ax = self._p(centre), (max(1, int(axes[0] * self.s)), max(1, int(axes[1] * self.s)))
        cv2.ellipse(self.img, c, (ax[0] + self.outline, ax[1] + self.outline), angle_deg, 0, 360, self.ink, -1,
                    cv2.LINE_AA)
        cv2.ellipse(self.img, c, ax, angle_deg, 0, 360, colour, -1, cv2.LINE_AA)

    def polygon(self, pts, colour, outline=True):
        p = np.array([self._p(q) for q in pts], np.int32)
        if outline:
            cv2.polylines(self.img, [p], True, self.ink, 2 * self.outline, cv2.LINE_AA)
        cv2.fillPoly(self.img, [p], colour, cv2.LINE_AA)

    def box(self, centre, half, angle_deg, colour):
        rect = cv2.boxPoints(((centre[0], centre[1]), (2 * half[0], 2 * half[1]), angle_deg))
        self.polygon(rect, colour)

    def dot(self, xy, r, colour):
        cv2.circle(self.img, self._p(xy), max(1, int(round(r * self.s))), colour, -1, cv2.LINE_AA)

    def small(self, size: int) -> np.ndarray:
        """The canvas at `size` (float), area-averaged: linear, so mattes taken from it are exact."""
        return cv2.resize(self.img, (size, size), interpolation=cv2.INTER_AREA)

    def finish(self, size: int) -> np.ndarray:
        return to_uint8(self.small(size))


def _draw_figure(cv: _Canvas, species: str, rgb, J: dict, height: float):
    b = _BODY[species]
    far = _shade(rgb, 0.72)
    limb_w, arm_w = b["limb"] * height, b["armw"] * height
    square = species == "robot"
    spine = J["spine_angle"]

    def arm(side, col):
        if species == "bird":  # wings: a tapered polygon along the arm
            s, e, h = J[f"shoulder_{side}"], J[f"elbow_{side}"], J[f"hand_{side}"]
            d = e - s
            n = np.array([-d[1], d[0]]) / (np.linalg.norm(d) + 1e-6) * arm_w * 0.6
            cv.polygon([s + n, e + n * 0.8, h, e - n * 0.8, s - n], col)
        else:
            cv.limb(J[f"shoulder_{side}"], J[f"elbow_{side}"], arm_w, col, square)
            cv.limb(J[f"elbow_{side}"], J[f"hand_{side}"], arm_w * 0.9, col, square)

    def leg(side, col):
        cv.limb(J["pelvis"], J[f"knee_{side}"], limb_w, col, square)
        cv.limb(J[f"knee_{side}"], J[f"foot_{side}"], limb_w * 0.9, col, square)
        if species == "frog":  # webbed foot
            f = J[f"foot_{side}"]
            cv.ellipse(f + np.array([limb_w * 0.6, 0]), (limb_w * 0.9, limb_w * 0.35), 0, col)

    # far limbs first (darker), then tail, torso, head, near limbs
    leg("f", far)
    arm("f", far)
    if species == "cat":
        p = J["pelvis"]
        tail = [p, p + np.array([-0.12, -0.02]) * height, p + np.array([-0.2, -0.12]) * height]
        cv.limb(tail[0], tail[1], limb_w * 0.7, rgb)
        cv.limb(tail[1], tail[2], limb_w * 0.6, rgb)
    elif species == "bird":
        p = J["pelvis"]
        cv.polygon([p, p + np.array([-0.16, -0.1]) * height, p + np.array([-0.18, 0.02]) * height], rgb)
    mid = (J["pelvis"] + J["chest"]) / 2
    tl, tw = b["torso"][0] * height, b["torso"][1] * height
    if species == "robot":
        cv.box(mid, (tw * 0.55, tl * 0.58), spine, rgb)
        cv.box(mid, (tw * 0.25, tl * 0.18), spine, _shade(rgb, 1.3))  # chest panel
    else:
        cv.ellipse(mid, (tw * 0.55, tl * 0.62), spine, rgb)
    # head
    h = J["head"]
    hw, hh = b["head"][0] * height / 2, b["head"][1] * height / 2
    fwd = np.array([math.cos(math.radians(spine)), math.sin(math.radians(spine))])  # facing direction
    up = np.array([math.sin(math.radians(spine)), -math.cos(math.radians(spine))])
    eye_white, pupil = (1.0, 1.0, 1.0), (0.05, 0.05, 0.08)
    if species == "cat":
        for off in (-0.55, 0.35):
            base = h + up * hh * 0.55 + fwd * hw * off
            cv.polygon([base - fwd * hw * 0.35, base + up * hh * 0.95, base + fwd * hw * 0.35], rgb)
        cv.ellipse(h, (hw, hh), spine, rgb)
        cv.dot(h + fwd * hw * 0.45 - up * hh * 0.05, hh * 0.16, pupil)
    elif species == "bird":
        cv.ellipse(h, (hw, hh), spine, rgb)
        cv.polygon([h + fwd * hw * 0.8 + up * hh * 0.25, h + fwd * hw * 1.7, h + fwd * hw * 0.8 - up * hh * 0.3],
                   (0.95, 0.75, 0.15))
        cv.dot(h + fwd * hw * 0.35 + up * hh * 0.2, hh * 0.17, pupil)
    elif species == "robot":
        cv.limb(h + up * hh, h + up * hh * 1.7, max(1.0, limb_w * 0.25), OUTLINE_F)
        cv.dot(h + up * hh * 1.8, hh * 0.25, (0.95, 0.2, 0.2))
        cv.box(h, (hw, hh), spine, rgb)
        cv.box(h + fwd * hw * 0.35, (hw * 0.45, hh * 0.25), spine, (0.15, 0.85, 0.95))
    elif species == "frog":
        cv.ellipse(h, (hw, hh), spine, rgb)
        for off in (-0.35, 0.45):
            e = h + up * hh * 0.85 + fwd * hw * off
            cv.dot(e, hh * 0.5 + cv.outline / cv.s, OUTLINE_F)
            cv.dot(e, hh * 0.5, eye_white)
            cv.dot(e + fwd * hh * 0.12, hh * 0.22, pupil)
        cv.limb(h + fwd * hw * 0.1 - up * hh * 0.3, h + fwd * hw * 0.8 - up * hh * 0.25, 1.0, OUTLINE_F)
    arm("n", rgb)
    leg("n", rgb)


OUTLINE_F = tuple(c / 255 for c in OUTLINE)


def render_figure(species: str, colour: str, background: str, action: str, size: int = 128,
                  rng: np.random.Generator | None = None, jitter: float = 6.0, seed: int = -1,
                  matte: bool = False) -> FigureSample:
    """Draw one figure; every random choice (placement, scale, angle jitter, background details) uses `rng`.

    `matte` also returns the figure's exact matte (it is drawn once more on black and on white; the image is
    unchanged), so the very same figure can be put on another background: `figure + (1 - alpha) * backdrop`."""
    if species not in SPECIES:
        raise ValueError(f"unknown species {species!r}; expected one of {SPECIES}")
    if colour not in FIGURE_COLOURS:
        raise ValueError(f"unknown colour {colour!r}; expected one of {tuple(FIGURE_COLOURS)}")
    rng = rng if rng is not None else np.random.default_rng(0)
    bg, ground = render_background(background, size, rng)
    height = size * 0.8 * float(rng.uniform(0.9, 1.06))
    J = pose_joints(action, species, height, rng, jitter)
    pts = np.array([v for k, v in J.items() if isinstance(v, np.ndarray)])
    # extents including head and limb widths, so the whole figure stays on the canvas
    b = _BODY[species]
    pad = max(b["head"]) * height * 0.6
    x0, x1 = pts[:, 0].min() - pad, pts[:, 0].max() + pad
    lowest = pts[:, 1].max() + b["limb"] * height * 0.5
    top = pts[:, 1].min() - pad * 1.4
    foot_y = ground + size * float(rng.uniform(0.04, 0.14)) - J["lift"]
    dy = foot_y - lowest
    if top + dy < size * 0.03:  # too tall: sink into the ground rather than leave the canvas
        dy = size * 0.03 - top
    dx = size / 2 - (x0 + x1) / 2 + float(rng.uniform(-0.08, 0.08)) * size
    dx = float(np.clip(dx, -x0 + 2, size - 2 - x1)) if x1 - x0 < size - 4 else size / 2 - (x0 + x1) / 2
    shift = np.array([dx, dy])
    J = {k: (v + shift if isinstance(v, np.ndarray) else v) for k, v in J.items()}
    rgb = tuple(c / 255 for c in FIGURE_COLOURS[colour])

    def draw(backdrop):
        cv = _Canvas(backdrop, size / 128, outline=0.9 * size / 128)
        _draw_figure(cv, species, rgb, J, height)
        return cv

    image = draw(bg).finish(size)
    joints = {k: (float(v[0]), float(v[1])) for k, v in J.items() if isinstance(v, np.ndarray)}
    cut = None
    if matte:  # "over" is affine in the backdrop: on black it is the premultiplied figure, black to white adds 1-alpha
        on_black, on_white = (draw(np.full_like(bg, v)).small(size) for v in (0.0, 1.0))
        cut = (on_black, np.clip(1.0 - (on_white - on_black).mean(-1), 0.0, 1.0).astype(np.float32))
    return FigureSample(image, species, colour, background, action, seed, joints, cut)


def make_figure(seed: int, size: int = 128, species: str | None = None, colour: str | None = None,
                background: str | None = None, action: str | None = None, actions=ACTIONS) -> FigureSample:
    """A random figure from `seed`; any factor given is fixed, the others are drawn (uniformly)."""
    rng = np.random.default_rng([int(seed), 31])
    species = species or SPECIES[int(rng.integers(len(SPECIES)))]
    colour = colour or tuple(FIGURE_COLOURS)[int(rng.integers(len(FIGURE_COLOURS)))]
    background = background or tuple(FIGURE_BACKGROUNDS)[int(rng.integers(len(FIGURE_BACKGROUNDS)))]
    action = action or actions[int(rng.integers(len(actions)))]
    return render_figure(species, colour, background, action, size, rng, seed=int(seed))


def training_caption(sample: FigureSample, rng: np.random.Generator, action_word_prob: float = 0.5) -> str:
    """Caption for base-model training: subject + background, plus the verb of a *seen* action at random.

    Held-out actions are never named (`FigureSample.caption` refuses to), so the
    mini model cannot be prompted into them by words.
    """
    return sample.caption(with_action=bool(rng.random() < action_word_prob))


def exemplar_set(action: str, num: int = 4, seed: int = HELDOUT_SEED_START, size: int = 128,
                 distinct_species: bool = True, species: str | None = None,
                 background: str | None = None, matte: bool = False) -> list[FigureSample]:
    """`num` figures doing `action`, with different subjects and backgrounds (ADI exemplars).

    `species` makes every exemplar that species (colours and backgrounds still differ): the
    setting where an identifier is most tempted to learn the subject along with the action.
    `background` puts every exemplar in that background (exemplars shot in one place): the context
    an identifier may carry along instead. Everything else is drawn as without it. `matte`: see `render_figure`."""
    if species is not None and species not in SPECIES:
        raise ValueError(f"unknown species {species!r}; choose from {', '.join(SPECIES)}")
    if background is not None and background not in FIGURE_BACKGROUNDS:
        raise ValueError(f"unknown background {background!r}; choose from {', '.join(FIGURE_BACKGROUNDS)}")
    if species is not None and num > len(FIGURE_COLOURS):
        raise ValueError(f"at most {len(FIGURE_COLOURS)} exemplars of one species (one per colour), got {num}")
    rng = np.random.default_rng([int(seed), 97])
    out, used = [], set()
    if species is not None:
        cycle = [species]
    else:  # one species per exemplar in turn, or each drawn at random
        cycle = list(rng.permutation(SPECIES)) if distinct_species else []
    colours, bgs = list(FIGURE_COLOURS), list(FIGURE_BACKGROUNDS)
    k = 0
    while len(out) < num:
        sp = cycle[len(out) % len(cycle)] if cycle else SPECIES[int(rng.integers(len(SPECIES)))]
        col = colours[int(rng.integers(len(colours)))]
        if (sp, col) in used:
            continue
        used.add((sp, col))
        bg = bgs[(len(out) + int(rng.integers(len(bgs)))) % len(bgs)]
        bg = bg if background is None else background
        out.append(render_figure(sp, col, bg, action, size, np.random.default_rng([int(seed), 7, k]),
                                 seed=int(seed) * 100 + k, matte=matte))
        k += 1
    return out


def contrast_set(species: str, colour: str, background: str, action: str, num: int = 2, seed: int = 0,
                 actions=SEEN_ACTIONS, size: int = 128, draw_as: str | None = None) -> list[FigureSample]:
    """The same subject and background doing *other* actions: the action-different half of ADI's triples.

    `draw_as` renders the very same poses, jitter and placement as another species: subject-only twins of the
    set (for measuring what an identifier's gradients do when only the species changes)."""
    key = zlib.crc32(f"{species} {colour} {background}".encode())
    rng = np.random.default_rng([int(seed), 13, key])
    choices = [a for a in actions if a != action]
    picks = rng.choice(len(choices), size=min(num, len(choices)), replace=False)
    return [render_figure(draw_as or species, colour, background, choices[int(i)], size,
                          np.random.default_rng([int(seed), 17, key, int(i)]), seed=int(seed)) for i in picks]
