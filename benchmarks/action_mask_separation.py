#!/usr/bin/env python
"""Can ADI's gradient statistics tell an action apart from appearance? (mechanism behind the mask ablation)

What it measures: the gradient-invariance mask keeps the identifier channels whose gradient reacts to the
action (anchor vs *action-different* image: same subject, another pose) more than to the context (anchor vs
*context-different* image: another exemplar of the action). A mask can only protect the subject if the
channels it keeps carry less of a *subject* change than of a pose change. This script measures exactly that,
on the bundled mini action model, the benchmark's held-out actions and exemplars:

  for every held-out action, per-sample identifier gradients (the trainer's own `draw_triples` and
  `per_sample_grads`: same noise and timestep within a triple, focal timesteps) for `--draws` steps of 4 triples,
  plus two *probes* the trainer never sees: the anchor re-rendered as another species (same pose jitter, colour,
  background) and as another colour. Mask statistics come from the first half of the draws; on the second half, for each
  mask score, the fraction of the squared gradient difference each mask keeps (per layer, averaged):

    pose     anchor vs action-different image (what the mask should keep)
    context  anchor vs context-different image (what it is built to drop)
    species  anchor vs its other-species probe (what leaks in the benchmark)
    colour   anchor vs its other-colour probe
    update   the no-mask update, summed over the held-out draws (what learning the action needs)

A random mask keeps half of everything. Scores: `shipped` (d_act - d_ctx per channel, as trained),
`ratio` (d_act / d_ctx per channel), `rotated` (the same statistic in the eigenbasis of the difference of the
two gradient-difference covariances: what a rotated basis, not just channels, could do), `twin` and
`twin_rotated` (d_ctx replaced by d_subj = |g_action - g_twin|, where the twin is the action-different image
re-rendered as another species with the same draws and caption: a clean subject-only contrast, built from seen
poses only, which the trainer does not have), `random`.
Gradients are taken at the initial identifier and after `--steps` steps of no-mask training, for exemplars
of 4 species (`distinct`, the benchmark default) and of one species (`same`). Seed 0 throughout.

    python benchmarks/action_mask_separation.py          # ~25 min on one CPU core
    python benchmarks/action_mask_separation.py --quick  # smoke run

Table to stdout, JSON to benchmarks/results/action_mask_separation.json.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from layergen.commands.action import training_script  # noqa: E402
from layergen.data.figures import (FIGURE_COLOURS, HELDOUT_ACTIONS, HELDOUT_SEED_START, SPECIES,  # noqa: E402
                                   contrast_set, exemplar_set, render_figure)

KINDS = ("pose", "context", "species", "colour", "update")
SCORES = ("shipped", "ratio", "rotated", "twin", "twin_rotated", "random")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="How much of a pose vs a subject change each identifier mask keeps.")
    p.add_argument("--model", default=str(ROOT / "assets" / "layergen-mini" / "action"))
    p.add_argument("--actions", nargs="+", default=list(HELDOUT_ACTIONS))
    p.add_argument("--draws", type=int, default=96, help="Steps of 4 triples per action (half fit, half held out).")
    p.add_argument("--steps", type=int, default=600, help="No-mask training steps before the second measurement.")
    p.add_argument("--settings", nargs="+", default=["distinct", "same"], choices=["distinct", "same"])
    p.add_argument("--quick", action="store_true", help="Smoke run: one action, 8 draws, 2 training steps.")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "action_mask_separation.json"))
    args = p.parse_args(argv)
    if args.quick:
        args.actions, args.draws, args.steps = args.actions[:1], 8, 2
    if args.draws < 4 or args.draws % 2:
        p.error("--draws must be an even number >= 4")
    return args


def other_species(species: str, k: int) -> str:
    return SPECIES[(SPECIES.index(species) + 1 + k % 3) % len(SPECIES)]


def probes(samples, a_seed: int, action: str, size: int):
    """Each exemplar re-rendered with one factor changed and every random draw (pose jitter, placement,
    background details) the same: another species, and another colour."""
    out = {"species": [], "colour": []}
    colours = list(FIGURE_COLOURS)
    for k, s in enumerate(samples):
        other = other_species(s.species, k)
        other_colour = colours[(colours.index(s.colour) + 1 + k % 5) % len(colours)]
        for kind, (sp, col) in (("species", (other, s.colour)), ("colour", (s.species, other_colour))):
            out[kind].append(render_figure(sp, col, s.background, action, size,
                                           np.random.default_rng([a_seed, 7, k]), seed=a_seed * 100 + k).image)
    return out


def gradients(T, pipe, ident, exemplars, contrast, twins, probe_images, draws: int) -> torch.Tensor:
    """draws x 6 (anchor, context partner, action partner, species probe, colour probe, the action partner's
    species twin) x 4 x rows x D."""
    from diffusers import DDPMScheduler

    states = T.TextStates(pipe, ident)
    token = ident.token
    prompts = [T.prompt_for("{caption} {token}", e["caption"], token) for e in exemplars]
    x_ex = T.encode_images(pipe, [e["image"] for e in exemplars])
    x_pr = [T.encode_images(pipe, probe_images[k]) for k in ("species", "colour")]
    x_ct = [T.encode_images(pipe, [c["image"] for c in cs]) for cs in contrast]
    x_tw = [T.encode_images(pipe, [c.image for c in cs]) for cs in twins]
    p_ct = [[T.prompt_for("{caption} {token}", c["caption"], token) for c in cs] for cs in contrast]
    noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    gen = torch.Generator().manual_seed(0)
    n, b, out = len(exemplars), 4, []
    for _ in range(draws):
        anchor, partner, noise, t, pick, _ = T.draw_triples(gen, b, n, x_ex.shape[1:],
                                                            noise_scheduler.config.num_train_timesteps, "focal",
                                                            [len(x) for x in x_ct])
        latents = torch.cat([x_ex[anchor], x_ex[partner], torch.stack([x_ct[i][k] for i, k in
                                                                       zip(anchor.tolist(), pick)]),
                             x_pr[0][anchor], x_pr[1][anchor],
                             torch.stack([x_tw[i][k] for i, k in zip(anchor.tolist(), pick)])])
        # probes and twins keep their original's caption: the identifier alone would have to explain the change
        own = [prompts[i] for i in anchor.tolist()]
        act = [p_ct[i][k] for i, k in zip(anchor.tolist(), pick)]
        prm = own + [prompts[i] for i in partner.tolist()] + act + own + own + act
        _, g = T.per_sample_grads(pipe, ident, states, latents, prm, noise.repeat(6, 1, 1, 1),
                                  t.repeat(6), noise_scheduler, pipe.default_size())
        out.append(g.view(6, b, *g.shape[1:]))
    return torch.stack(out).double()


def keep_bases(fit: torch.Tensor) -> dict:
    """Orthonormal bases (D x D/2) of what each mask score keeps, fitted on `fit` (n x 6 x b x D, one row)."""
    dim = fit.shape[-1]
    d_act = (fit[:, 0] - fit[:, 2]).reshape(-1, dim)
    d_ctx = (fit[:, 0] - fit[:, 1]).reshape(-1, dim)
    d_subj = (fit[:, 2] - fit[:, 5]).reshape(-1, dim)
    a, c, s = d_act.abs().mean(0), d_ctx.abs().mean(0), d_subj.abs().mean(0)
    eye = torch.eye(dim, dtype=fit.dtype)
    k = dim // 2

    def top(score):
        return eye[:, torch.argsort(score, descending=True, stable=True)[:k]]

    def rotated(x, y):  # the top half of the eigenvectors of cov(x) / tr - cov(y) / tr
        cx, cy = x.T @ x, y.T @ y
        return torch.linalg.eigh(cx / cx.trace() - cy / cy.trace())[1][:, -k:]

    gen = torch.Generator().manual_seed(0)
    return {"shipped": top(a / a.mean() - c / c.mean()), "ratio": top(a / c.clamp_min(1e-12)),
            "rotated": rotated(d_act, d_ctx), "twin": top(a / a.mean() - s / s.mean()),
            "twin_rotated": rotated(d_act, d_subj), "random": top(torch.rand(dim, generator=gen, dtype=fit.dtype))}


def kept_fractions(grads: torch.Tensor) -> dict:
    """{score: {kind: kept fraction}} averaged over the identifier's rows (layers)."""
    half = grads.shape[0] // 2
    acc = {s: {k: [] for k in KINDS} for s in SCORES}
    for row in range(grads.shape[3]):
        fit, held = grads[:half, :, :, row], grads[half:, :, :, row]
        dim = held.shape[-1]
        diffs = {"pose": held[:, 0] - held[:, 2], "context": held[:, 0] - held[:, 1],
                 "species": held[:, 0] - held[:, 3], "colour": held[:, 0] - held[:, 4],
                 "update": ((held[:, 0] + held[:, 1]) / 2).sum((0, 1))[None]}
        for score, basis in keep_bases(fit).items():
            for kind, x in diffs.items():
                x = x.reshape(-1, dim)
                acc[score][kind].append(float((x @ basis).pow(2).sum() / x.pow(2).sum().clamp_min(1e-30)))
    return {s: {k: float(np.mean(v)) for k, v in by_kind.items()} for s, by_kind in acc.items()}


def main(argv=None):
    args = parse_args(argv)
    T = training_script()
    pipe = T.load_pipeline(args.model)
    pipe.set_progress_bar_config(disable=True)
    pipe.unet.requires_grad_(False)
    pipe.text_encoder.requires_grad_(False)
    size = pipe.default_size()
    results = {}
    for setting in args.settings:
        for action in args.actions:
            a_seed = HELDOUT_SEED_START + 1000 * HELDOUT_ACTIONS.index(action)  # the benchmark's exemplars
            one = SPECIES[HELDOUT_ACTIONS.index(action) % len(SPECIES)] if setting == "same" else None
            samples = exemplar_set(action, 4, seed=a_seed, size=size, species=one)
            exemplars = [{"image": s.image, "caption": s.caption(), "stem": str(k), **s.metadata()}
                         for k, s in enumerate(samples)]
            targs = T.parse_args(["--name", "<probe>", "--output_dir", ".", "--mask_quantile", "0",
                                  "--steps", str(args.steps), "--validation_steps", "0",
                                  "--checkpointing_steps", str(10 ** 9)])
            contrast = T.build_contrast(T.parse_args(["--name", "<probe>", "--output_dir", "."]), exemplars, pipe,
                                        size)
            probe_images = probes(samples, a_seed, action, size)
            twins = [contrast_set(e["species"], e["colour"], e["background"], action, targs.num_contrast, seed=k,
                                  size=size, draw_as=other_species(e["species"], k))
                     for k, e in enumerate(exemplars)]  # the trainer's render contrast (seed + k), as twins
            for stage, steps in (("init", 0), ("trained", args.steps)):
                targs.max_train_steps = steps  # 0: the trainer's own initial identifier
                with tempfile.TemporaryDirectory() as tmp:
                    targs.output_dir = tmp
                    ident = T.train(targs, pipe=pipe, exemplars=exemplars, show_progress=False)
                grads = gradients(T, pipe, ident, exemplars, contrast, twins, probe_images, args.draws)
                results.setdefault(setting, {}).setdefault(stage, {})[action] = kept_fractions(grads)
                print(f"{setting:>8} {stage:>7} {action:>5}: " + "  ".join(
                    f"{s} {results[setting][stage][action][s]['pose']:.2f}/"
                    f"{results[setting][stage][action][s]['species']:.2f}" for s in SCORES), flush=True)

    summary = {}
    print("\nkept fraction of each gradient difference (mean over actions and layers; random keeps 0.50)")
    print(f"{'exemplars':<10}{'stage':<9}{'score':<13}" + "".join(f"{k:>9}" for k in KINDS) + f"{'pose/species':>14}")
    for setting, by_stage in results.items():
        for stage, by_action in by_stage.items():
            for score in SCORES:
                row = {k: float(np.mean([by_action[a][score][k] for a in by_action])) for k in KINDS}
                row["pose_over_species"] = row["pose"] / max(row["species"], 1e-12)
                summary.setdefault(setting, {}).setdefault(stage, {})[score] = row
                print(f"{setting:<10}{stage:<9}{score:<13}" + "".join(f"{row[k]:>9.3f}" for k in KINDS)
                      + f"{row['pose_over_species']:>14.2f}")
    report = {"benchmark": "action_mask_separation", "description": __doc__.split("\n\n")[0].strip(),
              "config": {k: v for k, v in vars(args).items() if k != "out"}, "summary": summary,
              "per_action": results}
    from layergen.atomic import write_text_atomic

    write_text_atomic(Path(args.out), json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")
    return report


if __name__ == "__main__":
    main()
