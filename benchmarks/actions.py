#!/usr/bin/env python
"""Action benchmark: can a learned identifier put a *held-out* action on *unseen* subjects?

What it compares (one run, same base model, same exemplars, same steps, same seeds):
  adi           layer-wise identifier + gradient-invariance mask (the method)
  adi_no_mask   layer-wise identifier, no mask                    (ablation: the mask)
  adi_shared    one token for all layers + mask                   (ablation: layer-wise tokens)
  adi_restaged  adi that also learns from each exemplar's figure put on the other backgrounds (exact mattes of
                the renders; `--restage train`): for exemplars that share a place
  adi_eigen     adi whose mask compares each anchor with its restaged self (`--restage mask`) and freezes the 2 %
                most context-like *directions* of each row instead of half its channels (`--mask_basis eigen`)
  adi_no_mask_apart  reference for `--exemplar_background same` only: adi_no_mask learned from the same four
                figures (exact mattes: same species, colours, poses) each put in another place; scored on the
                same one-place prompts. What an identifier draws when there is no shared place to copy
  ti            plain Textual Inversion: one input token, template "a <token>"
  ti_captioned  Textual Inversion with ADI's captioned template   (extra: isolates the template)
  base          no identifier at all (the model's pose prior on these prompts)
  text_seen     reference, no identifier: the same subjects with the verb of a *seen* action in the
                prompt ("a red cat sitting in the snow"; image k names SEEN_ACTIONS[k mod 7]) and
                scored against that action. It is the base model's own text route to a pose: what
                asking for any action costs the subject, with words the model was trained on.

Data: the procedural figure domain (`layergen.data.figures`). The mini action model was
trained on captions that never name the held-out actions (jump, wave, kick, bow). For each
held-out action: 4 exemplars (4 different species, colours, backgrounds; seeds from
HELDOUT_SEED_START), identifiers learned for `--steps` steps, then 16 images of 16 *unseen*
subjects (species x colour pairs not among the exemplars, in random backgrounds), prompt
"a <colour> <species> <background phrase> <token>", 20 DPM-Solver steps, CFG 5, image k
with seed `--seed + k` for every method (paired). Several `--seed`s repeat all of it per seed and pool
(one image is 100 / (16 x actions x seeds) points; at 4 actions and 2 seeds, 0.8). Harder exemplar sets:
`--exemplar_species same` (all one species) and `--exemplar_background same` (all in one place; the unseen
subjects then in the other backgrounds), where an identifier is tempted to carry that context along.

Scores, from judges trained only on renders (`training/train_pose_classifier.py`):
  action_acc   pose classifier says the held-out action (chance 1/11)
  subject_acc  subject classifier gets both species and colour of the *prompt*
  joint_acc    both at once: the action on the prompt's subject (the task itself)
  leak         subject classifier says one of the *exemplars'* subjects instead
  background_acc  scene classifier says the *prompt's* background (where the judges folder has scene/)
  paired       per pair of methods, images only one of them got right (same subject, prompt and seed),
               with the exact two-sided sign-test p-value: is a gap more than seed noise?

    python benchmarks/actions.py                      # full run, ~20-30 min on 2 CPU cores
    python benchmarks/actions.py --quick              # smoke run
    python benchmarks/actions.py --seed 4 5 --out b.json && \
        python benchmarks/actions.py --merge a.json b.json --out all.json   # add seeds to an earlier run

Table to stdout, JSON to benchmarks/results/actions.json.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import shlex
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from layergen.data.figures import (ACTION_VERBS, FIGURE_BACKGROUNDS, FIGURE_COLOURS,  # noqa: E402
                                   HELDOUT_ACTIONS, HELDOUT_SEED_START, SEEN_ACTIONS, SPECIES, exemplar_set,
                                   render_background, subject_caption)
from layergen.commands.action import training_script  # noqa: E402
from layergen.layers.compositing import to_uint8  # noqa: E402
from layergen.pipelines.pipeline_action import DEFAULT_IDENTIFIER_STEPS  # noqa: E402

METHODS = {
    "adi": ["--method", "adi"],
    "adi_no_mask": ["--method", "adi", "--mask_quantile", "0"],
    "adi_shared": ["--method", "adi", "--shared_token"],
    "adi_restaged": ["--method", "adi", "--restage", "train"],
    "adi_eigen": ["--method", "adi", "--restage", "mask", "--mask_basis", "eigen", "--mask_quantile", "0.02"],
    "adi_no_mask_apart": ["--method", "adi", "--mask_quantile", "0"],
    "ti": ["--method", "textual_inversion"],
    "ti_captioned": ["--method", "textual_inversion", "--template", "{caption} {token}"],
    "base": None,
    "text_seen": None,
}
# methods that learn from the one-place exemplars' figures, each put in another place
APART = {"adi_no_mask_apart"}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="ADI vs ablations vs Textual Inversion on held-out actions.")
    p.add_argument("--model", default=str(ROOT / "assets" / "layergen-mini" / "action"))
    p.add_argument("--classifiers", default=None,
                   help="Folder with pose/, subject/ and optionally scene/ (default <model>/classifiers).")
    p.add_argument("--actions", nargs="+", default=list(HELDOUT_ACTIONS))
    p.add_argument("--methods", nargs="+", default=[m for m in METHODS if m not in APART], choices=list(METHODS))
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--num_exemplars", type=int, default=4)
    p.add_argument("--num_images", type=int, default=16)
    p.add_argument("--mask_quantile", type=float, default=0.5)
    p.add_argument("--exemplar_species", choices=["distinct", "same"], default="distinct",
                   help="distinct: the 4 exemplars are 4 species; same: all one species (per action), the setting "
                        "where an identifier is tempted to learn the subject too")
    p.add_argument("--exemplar_background", choices=["distinct", "same"], default="distinct",
                   help="same: all exemplars of an action in one background (per action), and the unseen subjects "
                        "in the other four, so an identifier that carries that background along shows as a "
                        "background error")
    p.add_argument("--restage_matte", choices=["exact", "cut_out"], default="exact",
                   help="how --restage (adi_restaged) gets each exemplar's figure: the renderer's exact matte, or "
                        "cut out of the image as from a user's photo (layergen.decompose)")
    p.add_argument("--identifier_steps", type=float, default=DEFAULT_IDENTIFIER_STEPS,
                   help="fraction of denoising steps in which every method's identifier acts (ActionPipeline)")
    p.add_argument("--extra", default="", help="Extra training flags for every identifier method (quoted).")
    p.add_argument("--seed", type=int, nargs="+", default=[0],
                   help="one or more seeds (training noise, unseen subjects, image seeds); several are pooled, "
                        "with per-seed numbers and paired image-by-image counts in the JSON")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "actions.json"))
    p.add_argument("--save_images", default=None, help="Folder for one grid PNG per action (rows = methods).")
    p.add_argument("--identifier_dir", default=None,
                   help="Keep the learned identifiers here and reuse them when the same training config comes "
                        "again (e.g. to re-score with another --identifier_steps without retraining).")
    p.add_argument("--quick", action="store_true", help="1 action, 20 steps, 4 images: a smoke run")
    p.add_argument("--merge", nargs="+", default=None, metavar="JSON",
                   help="generate nothing: pool earlier runs' JSON files (same config; other seeds, or other "
                        "methods on the same seeds) into one report at --out")
    args = p.parse_args(argv)
    if APART & set(args.methods) and args.exemplar_background != "same":
        p.error(f"{', '.join(sorted(APART & set(args.methods)))} is a reference for --exemplar_background same "
                "(without it, it is adi_no_mask)")
    if args.quick:
        args.actions, args.steps, args.num_images = args.actions[:1], 20, 4
    return args


def unseen_subjects(exemplars, n, seed, avoid_background: str | None = None):
    """n (species, colour, background) with species x colour not among the exemplars', species balanced;
    `avoid_background`: draw the backgrounds from the other ones."""
    rng = np.random.default_rng([seed, 5])
    backgrounds = [b for b in FIGURE_BACKGROUNDS if b != avoid_background]
    used = {(e["species"], e["colour"]) for e in exemplars}
    pool = [(s, c) for s in SPECIES for c in FIGURE_COLOURS if (s, c) not in used]
    by_species = {s: [p for p in pool if p[0] == s] for s in SPECIES}
    for s in by_species:
        rng.shuffle(by_species[s])
    out, k = [], 0
    while len(out) < n:
        s = SPECIES[k % len(SPECIES)]
        pair = by_species[s][(k // len(SPECIES)) % len(by_species[s])]
        out.append((*pair, backgrounds[int(rng.integers(len(backgrounds)))]))
        k += 1
    return out


def seen_verb_caption(species: str, colour: str, background: str, action: str) -> str:
    """'a red cat sitting in the snow': the caption form the base model was trained on (seen actions only)."""
    if action not in SEEN_ACTIONS:
        raise ValueError(f"{action!r} is not a seen action: the base model never read a verb for it")
    return f"a {colour} {species} {ACTION_VERBS[action]} {FIGURE_BACKGROUNDS[background]}"


def identifier_cache_path(args, action: str, method: str, train_args) -> Path | None:
    """Where `--identifier_dir` keeps this identifier: keyed by everything it depends on (every parsed training
    setting `train_args`, defaults included, the base model, the exemplar set), so a changed flag *or default*
    never reuses a stale file."""
    if not args.identifier_dir:
        return None
    config = {k: v for k, v in vars(train_args).items() if k not in ("output_dir", "output")
              and not (k in TRAINER_ADDED and v == TRAINER_ADDED[k])}  # files learned before a flag existed stay
    exemplars = [args.exemplar_species] + ([] if args.exemplar_background == "distinct" else ["one background"])
    if method in APART:
        exemplars.append("apart")
    if args.restage_matte != "exact" and train_args.restage != "off":
        exemplars.append("cut out")  # only restaging reads the mattes
    key = hashlib.sha1(json.dumps([config, str(args.model), *exemplars], sort_keys=True,
                                  default=str).encode())
    return Path(args.identifier_dir) / f"{action}-{method}-{key.hexdigest()[:10]}.safetensors"


def score(images, subjects, exemplar_subjects, action, pose_clf, subject_clf, scene_clf=None) -> dict:
    """`action`: the expected action, one for all images or a list with one per image. `subjects`: the prompt's
    (species, colour, background) per image; with a scene judge the background is scored too."""
    pose = pose_clf.predict(images)["action"]
    wanted = [action] * len(images) if isinstance(action, str) else list(action)
    subj = subject_clf.predict(images)
    n = len(images)
    species_ok = [subj["species"][k] == subjects[k][0] for k in range(n)]
    colour_ok = [subj["colour"][k] == subjects[k][1] for k in range(n)]
    action_ok = [p == a for p, a in zip(pose, wanted)]
    subject_ok = [a and b for a, b in zip(species_ok, colour_ok)]
    out = {
        "action_acc": float(np.mean(action_ok)),
        "subject_acc": float(np.mean(subject_ok)),
        # the task itself: the action drawn on the prompt's subject, in the same image
        "joint_acc": float(np.mean([a and b for a, b in zip(action_ok, subject_ok)])),
        "species_acc": float(np.mean(species_ok)),
        "colour_acc": float(np.mean(colour_ok)),
        "leak": float(np.mean([(subj["species"][k], subj["colour"][k]) in exemplar_subjects for k in range(n)])),
        "poses": {p: pose.count(p) for p in sorted(set(pose))},
        "correct": {"action": [int(a) for a in action_ok], "subject": [int(a) for a in subject_ok],
                    "joint": [int(a and b) for a, b in zip(action_ok, subject_ok)]},
    }
    if scene_clf is not None:  # the prompt's background: the other half of the context an identifier may carry
        background_ok = [b == subjects[k][2] for k, b in enumerate(scene_clf.predict(images)["background"])]
        out["background_acc"] = float(np.mean(background_ok))
        out["correct"]["background"] = [int(b) for b in background_ok]
        add_in_place(out)
    return out


def add_in_place(cell: dict) -> dict:
    """`in_place`: the action *and* the prompt's background in one image. An identifier that carries its
    exemplars' place along can still draw the action, but in the wrong place; this score counts only the task.
    Derived from the stored per-image results, so runs scored before it existed get it on merging."""
    c = cell["correct"]
    if "background" in c and "in_place" not in c:
        c["in_place"] = [int(a and b) for a, b in zip(c["action"], c["background"])]
        cell["in_place_acc"] = float(np.mean(c["in_place"]))
    return cell


KEYS = ("action_acc", "subject_acc", "joint_acc", "species_acc", "colour_acc", "leak", "background_acc",
        "in_place_acc")


def keys_of(per_seed: dict) -> list[str]:
    """The scores every cell has (`background_acc` only where a scene judge scored the run)."""
    cells = [c for run in per_seed.values() for by_action in run.values() for c in by_action.values()]
    return [k for k in KEYS if all(k in c for c in cells)]


def pool(per_seed: dict, methods, actions) -> tuple[dict, dict]:
    """Pooled `summary` (mean over seeds x actions, equal images each) and `per_action` (mean over seeds)."""
    seeds, keys = list(per_seed), keys_of(per_seed)
    summary = {m: {k: float(np.mean([per_seed[s][m][a][k] for s in seeds for a in actions])) for k in keys}
               for m in methods}
    per_action = {}
    for m in methods:
        per_action[m] = {}
        for a in actions:
            cells = [per_seed[s][m][a] for s in seeds]
            row = {k: float(np.mean([c[k] for c in cells])) for k in keys}
            row["poses"] = {}
            for c in cells:
                for p, n in c["poses"].items():
                    row["poses"][p] = row["poses"].get(p, 0) + n
            row["seconds"] = round(float(sum(c["seconds"] for c in cells)), 1)
            per_action[m][a] = row
    return summary, per_action


def sign_test_p(wins: int, losses: int) -> float:
    """Exact two-sided sign test (McNemar's exact form) on the discordant pairs."""
    from math import comb

    n = wins + losses
    if n == 0:
        return 1.0
    tail = sum(comb(n, i) for i in range(min(wins, losses) + 1)) / 2 ** n
    return float(min(1.0, 2 * tail))


def paired(per_seed: dict, a: str, b: str, actions) -> dict:
    """Images `a` got right and `b` did not, and the reverse, per score, over every seed and action."""
    out = {}
    for key in ("action", "subject", "joint", "background", "in_place"):
        if not all(key in per_seed[s][m][act]["correct"] for s in per_seed for m in (a, b) for act in actions):
            continue
        x = [v for s in per_seed for act in actions for v in per_seed[s][a][act]["correct"][key]]
        y = [v for s in per_seed for act in actions for v in per_seed[s][b][act]["correct"][key]]
        wins = sum(1 for u, v in zip(x, y) if u and not v)
        losses = sum(1 for u, v in zip(x, y) if v and not u)
        n = len(x)
        # paired difference a - b in points, with the Wald 95 % interval for paired proportions: how large a gap
        # the images can rule out, which a p-value alone does not say ("no lower" needs the lower end)
        diff = (wins - losses) / n
        half = 1.96 * np.sqrt(max((wins + losses) / n - diff ** 2, 0.0) / n)
        out[key] = {"only_" + a: wins, "only_" + b: losses, "images": n, "p": round(sign_test_p(wins, losses), 4),
                    "difference_points": round(100 * diff, 2),
                    "ci95_points": [round(100 * (diff - half), 2), round(100 * (diff + half), 2)]}
    return out


def subject_by_action(per_seed: dict, method: str, actions) -> dict:
    """Subject accuracy split by whether the image shows the wanted action. Drawing a new pose costs the base model
    some subject accuracy whatever asks for it (see `text_seen`); a method that draws no action never pays it, so
    its overall subject rate is not a like-for-like comparison. The split is."""
    pairs = [(a, s) for seed in per_seed for act in actions
             for a, s in zip(per_seed[seed][method][act]["correct"]["action"],
                             per_seed[seed][method][act]["correct"]["subject"])]
    out = {}
    for name, hit in (("with_action", 1), ("without_action", 0)):
        subj = [s for a, s in pairs if a == hit]
        out[name] = float(np.mean(subj)) if subj else None
        out[f"images_{name}"] = len(subj)
    return out


def build_report(config: dict, identifier_training: dict, classifiers: dict, per_seed: dict) -> dict:
    """Pool `per_seed` ({seed: {method: {action: scores}}}), print the table, verdict and paired counts, and return
    the JSON report. Shared by a run and by `--merge`, so merged seeds are scored exactly like one run's."""
    methods, actions = config["methods"], config["actions"]
    summary, results = pool(per_seed, methods, actions)
    print()
    print(f"held-out actions {', '.join(actions)}; {config['num_exemplars']} exemplars, {config['steps']} steps, "
          f"{config['num_images']} unseen subjects each, seed(s) {' '.join(map(str, config['seed']))}")
    keys = keys_of(per_seed)
    print(f"{'method':<14}" + "".join(f"{k:>15}" for k in keys))
    for m in methods:
        print(f"{m:<14}" + "".join(f"{100 * summary[m][k]:>14.1f}%" for k in keys))
    verdict = {}
    if {"adi", "ti"} <= set(methods):
        verdict["adi_minus_ti_action_points"] = 100 * (summary["adi"]["action_acc"] - summary["ti"]["action_acc"])
        verdict["adi_subject_not_lower_than_ti"] = summary["adi"]["subject_acc"] >= summary["ti"]["subject_acc"]
        if "text_seen" in summary:  # the base model's own cost of asking for an action in words
            verdict["adi_minus_text_seen_subject_points"] = 100 * (summary["adi"]["subject_acc"]
                                                                   - summary["text_seen"]["subject_acc"])
        for abl in ("adi_no_mask", "adi_shared"):  # a part matters if removing it loses action-on-subject images
            if abl in summary:
                for k in ("action_acc", "subject_acc", "joint_acc"):
                    verdict[f"adi_minus_{abl}_{k.split('_')[0]}_points"] = 100 * (summary["adi"][k]
                                                                                   - summary[abl][k])
    pairs = {}
    for a, b in (("adi", "ti"), ("adi", "adi_no_mask"), ("adi", "adi_shared"), ("adi_restaged", "adi"),
                 ("adi_eigen", "adi_no_mask"), ("adi_eigen", "ti"), ("adi_eigen", "adi_restaged"),
                 ("adi_eigen", "adi_no_mask_apart"), ("adi_no_mask", "adi_no_mask_apart")):
        if {a, b} <= set(methods):
            pairs[f"{a}_vs_{b}"] = paired(per_seed, a, b, actions)
            print(f"paired {a} vs {b}: " + ", ".join(
                f"{k} +{v['only_' + a]}/-{v['only_' + b]} (p {v['p']:.3f}; {v['difference_points']:+.1f} points, "
                f"95% CI {v['ci95_points'][0]:+.1f} to {v['ci95_points'][1]:+.1f})"
                for k, v in pairs[f"{a}_vs_{b}"].items()))

    if "adi_vs_ti" in pairs:  # "no lower" at face value hangs on single images; the interval says what is ruled out
        verdict["adi_minus_ti_subject_ci95_points"] = pairs["adi_vs_ti"]["subject"]["ci95_points"]
    if verdict:
        print("verdict:", json.dumps(verdict))

    by_action = {m: subject_by_action(per_seed, m, actions) for m in methods}
    for m, v in by_action.items():
        pct = {k: "-" if v[k] is None else f"{100 * v[k]:.1f}%" for k in ("with_action", "without_action")}
        print(f"subject accuracy {m}: {pct['with_action']} of {v['images_with_action']} images with the action, "
              f"{pct['without_action']} of {v['images_without_action']} without")
    return {
        "benchmark": "actions",
        "description": __doc__.split("\n\n")[0].strip(),
        "config": config,
        "identifier_training": identifier_training,
        "method_flags": {m: METHODS[m] for m in methods},
        "classifiers": classifiers,
        "summary": summary,
        "verdict": verdict,
        "paired": pairs,
        "subject_by_action": by_action,
        "per_action": results,
        "per_seed": {str(seed): {"summary": pool({seed: r}, methods, actions)[0], "per_action": r}
                     for seed, r in per_seed.items()},
    }


# config keys that may differ between runs whose seeds are merged (everything else must match)
MERGE_FREE = ("seed", "methods", "identifier_dir", "quick")


# config keys added after runs were saved without them, with the value those runs had
CONFIG_ADDED = {"exemplar_background": "distinct", "restage_matte": "exact"}  # sessions 18, 19
# trainer settings added likewise (session 19), with the value every earlier identifier was trained with
TRAINER_ADDED = {"restage": "off", "restage_backgrounds": None, "num_restaged": 3, "mask_basis": "channel"}


def merge_reports(reports: list[dict]) -> dict:
    """One report from several runs of the same benchmark config: other seeds (e.g. added by a later session), or
    other methods on the same seeds. Per-seed, image-by-image results are pooled; the report keeps the methods that
    every seed has. Runs that differ in anything that changes the images (model, steps, identifier_steps, the
    trainer's settings...) are refused, and so is a seed x method that two runs both hold."""
    first = reports[0]
    # a judge only some runs had (the scene judge, added in session 15) adds a score and changes no other: the
    # judges all runs share must match, and the merged report keeps only their scores
    judges = [j for j in first["classifiers"] if all(j in r["classifiers"] for r in reports)]

    def compared(report, key):
        free = MERGE_FREE if key == "config" else ()
        added = {"config": CONFIG_ADDED, "identifier_training": TRAINER_ADDED}.get(key, {})
        values = {**added, **report[key]}
        return {k: v for k, v in values.items()
                if k not in free and (key != "classifiers" or k in judges)}

    for r in reports[1:]:
        for key in ("config", "identifier_training", "classifiers"):
            a, b = compared(first, key), compared(r, key)
            if a != b:
                diff = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
                raise ValueError(f"cannot merge: the runs differ in {key} ({', '.join(diff)})")
    per_seed: dict = {}
    for r in reports:
        for seed, run in r["per_seed"].items():
            cell = per_seed.setdefault(int(seed), {})
            for m, by_action in run["per_action"].items():
                if m in cell:
                    raise ValueError(f"cannot merge: seed {seed} of {m} is in more than one run")
                cell[m] = {a: add_in_place(c) for a, c in by_action.items()}
    order = list(METHODS)
    methods = [m for m in order if all(m in cell for cell in per_seed.values())]
    per_seed = {s: {m: per_seed[s][m] for m in methods} for s in sorted(per_seed)}
    config = {**first["config"], "methods": methods, "seed": sorted(per_seed)}
    config.pop("identifier_dir", None)
    return build_report(config, first["identifier_training"], {j: first["classifiers"][j] for j in judges},
                        per_seed)


def action_setup(args, seed: int, action: str, position: int, size: int, apart: bool = False):
    """(exemplars as the trainer takes them, the unseen (species, colour, background) to draw).

    `apart`: with `--exemplar_background same`, the same figures (by their exact mattes), exemplar k > 0 put on
    the k-th place after the shared one (so each in its own place), and the same one-place subjects.

    They follow the action's slot among the held-out actions, not its `position` in --actions: a run of some
    actions draws exactly what the full run drew for them (and --identifier_dir, keyed by action name, may reuse
    the full run's identifiers)."""
    a_idx = HELDOUT_ACTIONS.index(action) if action in HELDOUT_ACTIONS else len(HELDOUT_ACTIONS) + position
    one = SPECIES[a_idx % len(SPECIES)] if args.exemplar_species == "same" else None
    place = list(FIGURE_BACKGROUNDS)[a_idx % len(FIGURE_BACKGROUNDS)] if args.exemplar_background == "same" \
        else None
    ex = exemplar_set(action, args.num_exemplars, seed=HELDOUT_SEED_START + 1000 * a_idx, size=size, species=one,
                      background=place, matte=True)
    exemplars = [{"image": s.image, "caption": s.caption(), "stem": f"{k}", **s.metadata(),
                  "matte": s.matte if args.restage_matte == "exact" else None} for k, s in enumerate(ex)]
    if apart and place is not None:  # exemplar k > 0 on the k-th place after the shared one: the same figure (matte)
        names = list(FIGURE_BACKGROUNDS)
        for k, (e, s) in list(enumerate(zip(exemplars, ex)))[1:]:
            e["background"] = names[(names.index(place) + k) % len(names)]
            rng = np.random.default_rng([HELDOUT_SEED_START, a_idx, 53, k])
            backdrop = render_background(e["background"], size, rng)[0]
            e["image"] = to_uint8(s.matte[0] + (1 - s.matte[1])[..., None] * backdrop)
            e["caption"] = subject_caption(e["species"], e["colour"], e["background"])
    return exemplars, unseen_subjects(exemplars, args.num_images, seed + a_idx, avoid_background=place)


def run_seed(args, seed: int, pipe, trainer, pose_clf, subject_clf, scene_clf=None):
    """Every method on every action for one seed: `{method: {action: scores}}` and the images."""
    torch.manual_seed(seed)
    results = {m: {} for m in args.methods}
    grids = {}
    for position, action in enumerate(args.actions):
        exemplars, subjects = action_setup(args, seed, action, position, pipe.default_size())
        apart = action_setup(args, seed, action, position, pipe.default_size(), apart=True)[0] \
            if APART & set(args.methods) else None
        ex_subjects = {(e["species"], e["colour"]) for e in exemplars}
        captions = [subject_caption(*s) for s in subjects]
        grids[action] = {}
        for method in args.methods:
            t0 = time.time()
            if pipe.action_identifiers:
                pipe.unload_action_identifier()
            expected = action
            if method == "text_seen":
                expected = [SEEN_ACTIONS[k % len(SEEN_ACTIONS)] for k in range(len(subjects))]
                prompts = [seen_verb_caption(*subj, a) for subj, a in zip(subjects, expected)]
            elif METHODS[method] is None:
                prompts = captions
            else:
                token = f"<{action}-{method}>".replace("_", "-")
                targs = trainer.parse_args(
                    ["--name", token, "--output_dir", ".", "--steps", str(args.steps),
                     "--num_exemplars", str(args.num_exemplars), "--validation_steps", "0",
                     "--checkpointing_steps", str(10 ** 9), "--seed", str(seed),
                     *(["--mask_quantile", str(args.mask_quantile)] if "--mask_quantile" not in METHODS[method]
                       else []), *METHODS[method], *shlex.split(args.extra)])
                cached = identifier_cache_path(args, action, method, targs)
                if cached is not None and cached.is_file():
                    ident = pipe.load_action_identifier(cached)
                else:
                    with tempfile.TemporaryDirectory() as tmp:
                        targs.output_dir, targs.output = tmp, (None if cached is None else str(cached))
                        ident = trainer.train(targs, pipe=pipe, exemplars=apart if method in APART else exemplars,
                                              show_progress=False)
                    pipe.load_action_identifier(ident)
                prompts = [f"{c} {ident.token}" for c in captions]
            learn_s = time.time() - t0
            images = pipe(prompts, seed=seed, output_type="np", identifier_steps=args.identifier_steps).images
            res = score(images, subjects, ex_subjects, expected, pose_clf, subject_clf, scene_clf)
            res["seconds"] = round(time.time() - t0, 1)
            res["learn_seconds"] = round(learn_s, 1)
            results[method][action] = res
            grids[action][method] = images
            print(f"{action:>6} {method:<13} action {res['action_acc']:.2f}  subject {res['subject_acc']:.2f}  "
                  f"leak {res['leak']:.2f}  ({res['seconds']:.0f}s)", flush=True)
        if pipe.action_identifiers:
            pipe.unload_action_identifier()
    return results, grids


def read_reports(files) -> list[dict]:
    """The `--merge` inputs; ValueError for a file that cannot be read or is not an actions report."""
    reports = []
    for f in files:
        try:
            report = json.loads(Path(f).read_text())
        except (OSError, ValueError) as e:
            raise ValueError(f"cannot read {f}: {e}") from None
        if report.get("benchmark") != "actions" or "per_seed" not in report:
            raise ValueError(f"{f} is not an actions benchmark report with per-seed results")
        reports.append(report)
    return reports


def write_report(report: dict, out: str) -> None:
    from layergen.atomic import write_text_atomic

    write_text_atomic(Path(out), json.dumps(report, indent=2) + "\n")
    print(f"wrote {out}")


def main(argv=None):
    args = parse_args(argv)
    if args.merge:
        try:
            report = merge_reports(read_reports(args.merge))
        except ValueError as e:  # a usage error: message and exit 2, nothing written
            print(f"actions.py: error: --merge: {e}", file=sys.stderr)
            raise SystemExit(2)
        report["config"]["merged_from"] = [str(f) for f in args.merge]
        write_report(report, args.out)
        return report
    from layergen.models.figure_classifier import FigureClassifier
    from layergen.pipelines.pipeline_action import ActionPipeline

    clf_dir = Path(args.classifiers or Path(args.model) / "classifiers")
    pose_clf = FigureClassifier.from_pretrained(clf_dir / "pose", torch_dtype=torch.float32).eval()
    subject_clf = FigureClassifier.from_pretrained(clf_dir / "subject", torch_dtype=torch.float32).eval()
    scene_clf = (FigureClassifier.from_pretrained(clf_dir / "scene", torch_dtype=torch.float32).eval()
                 if (clf_dir / "scene").is_dir() else None)  # optional: older judge folders have none
    pipe = ActionPipeline.from_pretrained(args.model)
    pipe.set_progress_bar_config(disable=True)
    trainer = training_script()

    per_seed, grids = {}, {}
    for seed in args.seed:
        per_seed[seed], grids[seed] = run_seed(args, seed, pipe, trainer, pose_clf, subject_clf, scene_clf)
    clf_metrics = {}
    for name in ("pose", "subject", "scene"):
        f = clf_dir / name / "metrics.json"
        if f.is_file():
            clf_metrics[name] = json.loads(f.read_text())
    report = build_report(
        config={k: v for k, v in vars(args).items() if k not in ("out", "save_images", "merge")},
        # what every identifier was trained with: the trainer's settings (its defaults plus --extra), then each
        # method's own flags on top
        identifier_training={k: v for k, v in vars(trainer.parse_args(
            ["--name", "<x>", "--output_dir", ".", *shlex.split(args.extra)])).items()
            if k not in ("name", "output_dir", "output", "seed")},
        classifiers=clf_metrics, per_seed=per_seed)
    write_report(report, args.out)
    if args.save_images:
        from layergen.training_utils import save_image_grid

        for seed, by_action in grids.items():
            for action, rows in by_action.items():
                ims = [im for m in args.methods for im in rows[m][:8]]
                name = f"{action}.png" if len(grids) == 1 else f"{action}_seed{seed}.png"
                save_image_grid(ims, Path(args.save_images) / name, cols=min(8, args.num_images))
    return report


if __name__ == "__main__":
    main()
