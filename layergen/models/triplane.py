"""Tri-plane fields (HumanLiff-style): plane math as pure functions, plus the shared decoder.

A tri-plane is a tensor (3, C, R, R): planes XY, XZ, ZY in that order (EG3D's set repeated
XZ; we do not). Plane p is sampled with `grid_sample(align_corners=False)` at the
projection of a point, as (u, v) = (width coordinate, height coordinate):

    XY: (u, v) = (x, y)      XZ: (u, v) = (x, z)      ZY: (u, v) = (z, y)

after mapping the scene box to [-1, 1]. Texel j of a plane of width R is centred at
u = (2j + 1) / R - 1, so texels are 2/R apart and 1/R is *half a texel*.

**Tri-plane shift.** Each plane's C channels are split into `num_subplanes` (3) groups;
group 0 is read at (u, v), group 1 at (u + 1/R, v) and group 2 at (u, v + 1/R). The
three reads are concatenated, so every point gets 3 x C features (27 for C = 9) whose
bilinear footprints are offset by half a texel: jointly they resolve detail finer than a
texel, which is what lets 32 x 32 planes hold a thin limb. `shift=False` (the ablation)
reads all groups at (u, v) and keeps the concatenation, so the decoder's input size and
the parameter count are identical and only the offset differs.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin

PLANE_NAMES = ("xy", "xz", "zy")
# which point coordinates give (u, v) on each plane
PLANE_AXES = ((0, 1), (0, 2), (2, 1))


# ----------------------------------------------------------------------------- pure plane math
def normalize_points(points: torch.Tensor, box_min=(-1.0, -1.0, -1.0), box_max=(1.0, 1.0, 1.0)) -> torch.Tensor:
    """Map points in the scene box to [-1, 1]^3."""
    bmin = torch.as_tensor(box_min, dtype=points.dtype, device=points.device)
    bmax = torch.as_tensor(box_max, dtype=points.dtype, device=points.device)
    return (points - bmin) / (bmax - bmin) * 2.0 - 1.0


def project_points(points_n: torch.Tensor) -> torch.Tensor:
    """Normalised points (..., 3) -> plane coordinates (3, ..., 2) for XY, XZ, ZY."""
    return torch.stack([points_n[..., list(ax)] for ax in PLANE_AXES], 0)


def shift_offsets(resolution: int, num_subplanes: int = 3, shift: bool = True) -> torch.Tensor:
    """(num_subplanes, 2) offsets in normalised (u, v): 0, +half a texel in u, +half a texel in v, ..."""
    off = torch.zeros(num_subplanes, 2)
    if shift:
        half = 1.0 / resolution  # texels are 2/R apart in [-1, 1]
        for s in range(1, num_subplanes):
            off[s, (s - 1) % 2] = half * (1 + (s - 1) // 2)
    return off


def sample_triplane(planes: torch.Tensor, points: torch.Tensor, shift: bool = True, num_subplanes: int = 3,
                    box_min=(-1.0, -1.0, -1.0), box_max=(1.0, 1.0, 1.0)) -> torch.Tensor:
    """Concatenated tri-plane features.

    planes: (B, 3, C, R, R); points: (B, N, 3) in the scene box. Returns (B, N, 3 * C),
    ordered plane-major (XY, XZ, ZY), then sub-plane, then channel. Outside the box the
    features are zero (zero padding).
    """
    B, P, C, H, W = planes.shape
    if P != 3:
        raise ValueError(f"expected 3 planes, got {P}")
    if C % num_subplanes:
        raise ValueError(f"{C} channels do not split into {num_subplanes} sub-planes")
    if H != W:
        raise ValueError("tri-planes must be square")
    N = points.shape[1]
    cs = C // num_subplanes
    uv = project_points(normalize_points(points, box_min, box_max))          # (3, B, N, 2)
    off = shift_offsets(W, num_subplanes, shift).to(uv)                      # (S, 2)
    grid = uv[:, :, None] + off[None, None, :, None]                         # (3, B, S, N, 2)
    grid = grid.permute(1, 0, 2, 3, 4).reshape(B * 3 * num_subplanes, 1, N, 2)
    sub = planes.reshape(B * 3 * num_subplanes, cs, H, W)
    feat = F.grid_sample(sub, grid, mode="bilinear", padding_mode="zeros", align_corners=False)  # (B*3*S, cs, 1, N)
    feat = feat.reshape(B, 3 * num_subplanes * cs, N)
    return feat.transpose(1, 2)


def plane_tv(planes: torch.Tensor) -> torch.Tensor:
    """Total variation: mean L1 difference between neighbouring texels (both directions)."""
    dh = (planes[..., 1:, :] - planes[..., :-1, :]).abs().mean()
    dw = (planes[..., :, 1:] - planes[..., :, :-1]).abs().mean()
    return dh + dw


def plane_l1(planes: torch.Tensor) -> torch.Tensor:
    """Mean |value|: pulls unused texels to zero (for residual planes: to the layer below)."""
    return planes.abs().mean()


@torch.no_grad()
def clamp_planes_(planes: torch.Tensor, bound: float = 1.0) -> torch.Tensor:
    """In-place clamp to [-bound, bound] (HumanLiff clamps after every optimiser step)."""
    return planes.clamp_(-bound, bound)


def flip_x(planes: torch.Tensor, shift: bool = True, num_subplanes: int = 3) -> torch.Tensor:
    """Mirror a tri-plane (..., 3, C, R, R) across x = 0 (exactly, shift included).

    The decoder sees only plane features (no positions), so flipping the u axis of the
    planes that contain x (XY, XZ) mirrors the whole field: a free data augmentation.
    With the shift, the u-shifted sub-plane is read at u + 1/R; after a flip that read
    must land at -u + 1/R, so that sub-plane is flipped *and* moved by one texel
    (texel j takes old texel R - j; the one texel falling off the edge becomes zero).
    """
    out = planes.clone()
    C = planes.shape[-3]
    cs = C // num_subplanes
    for p in (0, 1):  # XY and XZ carry x on their u axis
        out[..., p, :, :, :] = planes[..., p, :, :, :].flip(-1)
        if shift and num_subplanes > 1:
            sub = planes[..., p, cs:2 * cs, :, :].flip(-1)
            moved = torch.zeros_like(sub)
            moved[..., 1:] = sub[..., :-1]
            out[..., p, cs:2 * cs, :, :] = moved
    return out


def direction_encoding(dirs: torch.Tensor, num_freqs: int) -> torch.Tensor:
    """[d, sin(2^k pi d), cos(2^k pi d)] for k < num_freqs."""
    feats = [dirs]
    for k in range(num_freqs):
        feats += [torch.sin((2.0 ** k) * math.pi * dirs), torch.cos((2.0 ** k) * math.pi * dirs)]
    return torch.cat(feats, -1)


# ----------------------------------------------------------------------------- decoder
class TriplaneDecoder(ModelMixin, ConfigMixin):
    """Shared MLP: concatenated tri-plane features -> density + view-dependent colour.

    One decoder serves every subject and layer; only the planes differ. Layout follows
    HumanLiff at a CPU-sized width: softplus MLP with a skip that re-concatenates the input
    features, a linear density head, and a colour head on (feature, view-direction encoding).
    Density = density_scale * softplus(raw + noise); the noise (training only) discourages
    semi-transparent fog.

    The config also carries the tri-plane geometry (resolution, channels, box, shift) so a
    saved decoder fully describes how its planes are read.
    """

    @register_to_config
    def __init__(self, plane_channels: int = 9, num_subplanes: int = 3, plane_resolution: int = 32,
                 hidden_dim: int = 64, color_hidden_dim: int = 32, view_freqs: int = 2, use_shift: bool = True,
                 density_scale: float = 20.0, density_bias: float = -2.0,
                 box_min: tuple = (-1.0, -1.0, -1.0), box_max: tuple = (1.0, 1.0, 1.0)):
        super().__init__()
        in_dim = 3 * plane_channels
        self.fc1 = nn.Linear(in_dim, hidden_dim)
        self.fc2 = nn.Linear(hidden_dim, hidden_dim)
        self.fc3 = nn.Linear(hidden_dim + in_dim, hidden_dim)
        self.density_head = nn.Linear(hidden_dim, 1)
        dir_dim = 3 * (1 + 2 * view_freqs)
        self.color_fc = nn.Linear(hidden_dim + dir_dim, color_hidden_dim)
        self.color_out = nn.Linear(color_hidden_dim, 3)
        with torch.no_grad():
            self.density_head.bias.fill_(density_bias)

    @property
    def plane_shape(self) -> tuple[int, int, int, int]:
        c = self.config
        return (3, c.plane_channels, c.plane_resolution, c.plane_resolution)

    def forward(self, features: torch.Tensor, dirs: torch.Tensor, density_noise: float = 0.0):
        """features (..., 3C), dirs (..., 3) unit -> (sigma (...), rgb (..., 3))."""
        h = F.softplus(self.fc1(features))
        h = F.softplus(self.fc2(h))
        h = F.softplus(self.fc3(torch.cat([h, features], -1)))
        raw = self.density_head(h)[..., 0]
        if density_noise > 0:
            raw = raw + torch.randn_like(raw) * density_noise
        sigma = self.config.density_scale * F.softplus(raw)
        c = F.softplus(self.color_fc(torch.cat([h, direction_encoding(dirs, self.config.view_freqs)], -1)))
        rgb = torch.sigmoid(self.color_out(c))
        return sigma, rgb

    def sample_features(self, planes: torch.Tensor, points: torch.Tensor, shift: bool | None = None) -> torch.Tensor:
        c = self.config
        return sample_triplane(planes, points, c.use_shift if shift is None else shift, c.num_subplanes,
                               c.box_min, c.box_max)

    def query(self, planes: torch.Tensor, points: torch.Tensor, dirs: torch.Tensor, density_noise: float = 0.0):
        """planes (B, 3, C, R, R), points/dirs (B, N, 3) -> sigma (B, N), rgb (B, N, 3)."""
        feats = self.sample_features(planes, points)
        sigma, rgb = self(feats, dirs, density_noise)
        inside = ((points >= points.new_tensor(self.config.box_min)) &
                  (points <= points.new_tensor(self.config.box_max))).all(-1)
        return sigma * inside, rgb

    def field(self, planes: torch.Tensor):
        """A renderer field for one tri-plane (3, C, R, R) or (1, 3, C, R, R)."""
        if planes.dim() == 4:
            planes = planes[None]

        def _field(points, dirs):
            s, c = self.query(planes, points[None], dirs[None])
            return s[0], c[0]

        return _field

    @torch.no_grad()
    def density_grid(self, planes: torch.Tensor, resolution: int = 64, chunk: int = 65536) -> torch.Tensor:
        """Density on a regular grid of voxel centres over the box, (D, H, W) indexed [z, y, x]."""
        pts = grid_points(resolution, self.config.box_min, self.config.box_max).reshape(-1, 3)
        dirs = torch.zeros_like(pts)
        dirs[:, 2] = -1.0
        f = self.field(planes.to(self.dtype))
        out = torch.cat([f(pts[i:i + chunk], dirs[i:i + chunk])[0] for i in range(0, pts.shape[0], chunk)])
        return out.reshape(resolution, resolution, resolution)


def grid_points(resolution: int, box_min=(-1.0, -1.0, -1.0), box_max=(1.0, 1.0, 1.0)) -> torch.Tensor:
    """Voxel-centre points (D, H, W, 3) with [z, y, x] indexing, xyz in the last dim."""
    axes = [torch.linspace(lo + (hi - lo) / (2 * resolution), hi - (hi - lo) / (2 * resolution), resolution)
            for lo, hi in zip(box_min, box_max)]
    z, y, x = torch.meshgrid(axes[2], axes[1], axes[0], indexing="ij")
    return torch.stack([x, y, z], -1)
