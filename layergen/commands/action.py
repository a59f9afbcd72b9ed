"""`layergen action ...`: learn an action from a few exemplar images, then generate it for new subjects."""
from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path

from ..seeds import check_seed, seed_arg

ORDER = 40
ROOT = Path(__file__).resolve().parents[2]


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "action",
        help="learn an action identifier from exemplars (ADI) and generate it for new subjects",
        description="Action-identifier inversion: learn what a few exemplar images have in common\n"
                    "(an action such as jumping) as a token <name>, then put it in prompts.",
        epilog="examples:\n"
               "  layergen action exemplars jump exemplars/         # 4 procedural figures jumping\n"
               "  layergen action learn exemplars/ --name jump      # -> jump.safetensors\n"
               '  layergen action generate "a blue cat in the snow <jump>" -o cat.png',
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = p.add_subparsers(dest="action_command", metavar="SUBCOMMAND")
    p.set_defaults(func=lambda args: (p.print_help(), 2)[1])

    e = sub.add_parser("exemplars", help="render procedural exemplar figures of an action (+ metadata.jsonl)")
    e.add_argument("action", metavar="ACTION", help="one of the figure actions, e.g. jump, wave, kick, bow")
    e.add_argument("output", metavar="DIR", help="folder to write the images and metadata.jsonl into")
    e.add_argument("-n", "--num", type=int, default=4, help="number of exemplars (default 4)")
    e.add_argument("--seed", type=seed_arg, default=1_000_000, help="seed of the exemplar set")
    e.add_argument("--size", type=int, default=128)
    e.add_argument("--background", metavar="PLACE",
                   help="shoot every exemplar in this place (meadow, beach, snow, night, room): a set for which "
                        "`learn --restage mask --mask_basis eigen` keeps the place out of new images")
    e.set_defaults(func=run_exemplars)

    learn = sub.add_parser("learn", help="learn an identifier from a folder of exemplar images",
                           description="Runs training/train_action_identifier.py (see its --help for every option).")
    learn.add_argument("exemplars", metavar="EXEMPLARS", help="folder of exemplar images (+ optional metadata.jsonl)")
    learn.add_argument("--name", required=True, help="identifier name; prompts use it as <name>")
    learn.add_argument("-o", "--output", help="identifier file (default ./<name>.safetensors)")
    learn.add_argument("--model", help="ActionPipeline folder (default: bundled layergen-mini action model)")
    # Training settings left unset take training/train_action_identifier.py's defaults (one place to tune).
    learn.add_argument("--method", choices=["adi", "textual_inversion"], help="default adi")
    learn.add_argument("--steps", type=int, help="optimisation steps (default 600)")
    learn.add_argument("--num_exemplars", type=int, help="use the first N exemplars (default 4)")
    learn.add_argument("--mask_quantile", type=float,
                       help="share of channels (directions) masked as action-agnostic (default 0.5 for channels, "
                            "0.02 for directions; 0 = no mask)")
    learn.add_argument("--mask_basis", choices=["channel", "eigen"],
                       help="mask channels (ADI, the default) or the most context-like directions; with --restage "
                            "mask, eigen keeps a place all exemplars share out of new images")
    learn.add_argument("--contrast", choices=["auto", "render", "generate", "dir", "none"],
                       help="where the action-different images come from (default auto)")
    learn.add_argument("--restage", choices=["off", "mask", "train"],
                       help="exemplars all shot in one place: put their subjects on other backgrounds, for the mask "
                            "only or for training too (default off)")
    learn.add_argument("--restage_backgrounds", metavar="DIR",
                       help="background images for --restage (procedural figures draw their own)")
    learn.add_argument("--work_dir", help="checkpoints/validation images (default: a temporary folder)")
    learn.add_argument("--seed", type=seed_arg)
    learn.set_defaults(func=run_learn)

    g = sub.add_parser("generate", help='generate images from a prompt naming identifiers, e.g. "a cat <jump>"',
                       description="Generate images with the action model from a prompt whose <name> tokens are\n"
                                   "learned identifiers (layergen action learn). Every <name> needs an identifier:\n"
                                   "a -i FILE defining it, or <name>.safetensors in --identifier_dir.",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    g.add_argument("prompt", metavar="PROMPT")
    g.add_argument("-i", "--identifier", action="append", default=[],
                   help="identifier file; repeat for several (default: <name>.safetensors in --identifier_dir "
                        "for every <name> in the prompt)")
    g.add_argument("--identifier_dir", default=".", help="where to look for <name>.safetensors (default: .)")
    g.add_argument("-o", "--output", default="action.png", help="output PNG (several images: name-K.png)")
    g.add_argument("-n", "--num_images", type=int, default=1)
    g.add_argument("--seed", type=seed_arg, default=0)
    g.add_argument("--steps", type=int, default=20)
    g.add_argument("--guidance_scale", type=float, default=5.0)
    g.add_argument("--negative_prompt", default=None)
    g.add_argument("--identifier_steps", type=float, default=None,
                   help="fraction of the denoising steps (noisiest first) in which identifiers act; the rest "
                        "read the plain prompt (default 0.7, the pipeline's; 1 = every step)")
    g.add_argument("--model", help="ActionPipeline folder (default: bundled layergen-mini action model)")
    g.add_argument("--no_strict", action="store_true", help="load identifiers learned on other weights anyway")
    g.set_defaults(func=run_generate)


def training_script():
    path = ROOT / "training" / "train_action_identifier.py"
    if not path.is_file():
        from ..errors import LayergenError

        raise LayergenError(f"{path} is missing: `layergen action learn` needs the training/ folder of a "
                            "layergen source checkout")
    spec = importlib.util.spec_from_file_location("layergen_train_action_identifier", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def write_exemplars(output, action: str, num: int = 4, seed: int = 1_000_000, size: int = 128,
                    background: str | None = None) -> list[Path]:
    """Render `num` procedural figures doing `action` into the folder `output` (all or nothing), with a
    metadata.jsonl naming each one's species, colour and place (what `learn` renders contrast images from)."""
    import json

    from PIL import Image

    from ..atomic import atomic_dir
    from ..data.figures import ACTIONS, FIGURE_BACKGROUNDS, exemplar_set
    from ..errors import LayergenError

    if action not in ACTIONS:
        raise LayergenError(f"unknown action {action!r}; figures can do: {', '.join(ACTIONS)}")
    if not 1 <= num <= 24:
        raise LayergenError(f"--num must be in [1, 24], got {num}")
    if background is not None and background not in FIGURE_BACKGROUNDS:
        raise LayergenError(f"unknown --background {background!r}; choose from {', '.join(FIGURE_BACKGROUNDS)}")
    if not 32 <= size <= 1024:
        raise LayergenError(f"--size must be in [32, 1024] pixels, got {size}")
    out = Path(output)
    if out.exists() and not out.is_dir():
        raise LayergenError(f"{out}: exists and is not a folder; exemplars are written into a folder")
    if out.is_dir():  # the folder is replaced as a whole: only ever replace an earlier exemplar folder
        foreign = sorted(p.name for p in out.iterdir() if not p.name.startswith(".")
                         and not (p.is_file() and (p.suffix.lower() == ".png" or p.name == "metadata.jsonl")))
        if foreign or (any(out.iterdir()) and not (out / "metadata.jsonl").is_file()):
            raise LayergenError(f"{out}: folder holds other files ({', '.join(foreign[:3]) or 'no metadata.jsonl'})"
                                ", which replacing it would delete; write to a new or empty folder")
    samples = exemplar_set(action, num, seed=seed, size=size, background=background)
    names = [f"{k:02d}-{s.colour}-{s.species}.png" for k, s in enumerate(samples)]
    with atomic_dir(output) as tmp:
        for name, s in zip(names, samples):
            Image.fromarray(s.image).save(tmp / name)
        rows = [json.dumps({"file_name": name, **s.metadata()}) for name, s in zip(names, samples)]
        (tmp / "metadata.jsonl").write_text("\n".join(rows) + "\n")
    return [Path(output) / name for name in names]


def run_exemplars(args) -> int:
    samples = write_exemplars(args.output, args.action, args.num, args.seed, args.size, args.background)
    print(f"wrote {len(samples)} exemplars of '{args.action}' to {args.output}")
    return 0


def run_learn(args) -> int:
    import tempfile

    from ..atomic import check_writable
    from ..errors import LayergenError

    if not Path(args.exemplars).is_dir():
        raise LayergenError(f"{args.exemplars}: not a folder of exemplar images")
    if args.steps is not None and args.steps < 1:
        raise LayergenError(f"--steps must be at least 1, got {args.steps}")
    if args.num_exemplars is not None and args.num_exemplars < 2:
        raise LayergenError(f"--num_exemplars must be at least 2 (context pairs need two subjects), "
                            f"got {args.num_exemplars}")
    module = training_script()
    name = args.name.strip().strip("<>")
    output = args.output or f"{name}.safetensors"
    if Path(output).suffix.lower() != ".safetensors":
        raise LayergenError(f"-o {output}: an identifier file ends in .safetensors")
    check_writable(output)
    with tempfile.TemporaryDirectory(prefix="layergen-action-") as tmp:
        argv = ["--exemplars", args.exemplars, "--name", name, "--output", output,
                "--output_dir", args.work_dir or tmp, "--validation_steps", "0"]
        if not args.work_dir:  # nobody will resume from a temporary folder
            argv += ["--checkpointing_steps", str(10 ** 9)]
        for flag in ("method", "steps", "num_exemplars", "mask_quantile", "mask_basis", "contrast", "restage",
                     "restage_backgrounds", "seed"):
            if getattr(args, flag) is not None:
                argv += [f"--{flag}", str(getattr(args, flag))]
        if args.model:
            argv += ["--pretrained_model_name_or_path", args.model]
        module.main(argv)
    print(f"use it as <{name}> in prompts: layergen action generate \"a blue cat <{name}>\" -i {output}")
    return 0


def run_generate(args) -> int:
    from ..atomic import atomic_path, check_writable
    from ..errors import LayergenError
    from ..mini import mini_path
    from ..models.action_identifier import TOKEN_PATTERN
    from ..pipelines.pipeline_action import ActionPipeline

    if not 1 <= args.num_images <= 64:
        raise LayergenError(f"--num_images must be in [1, 64], got {args.num_images}")
    if args.steps < 1:
        raise LayergenError(f"--steps must be at least 1, got {args.steps}")
    if not args.prompt.strip():
        raise LayergenError("PROMPT is empty; name a subject and an identifier, e.g. 'a blue cat in the snow <jump>'")
    check_seed(args.seed, "--seed", args.num_images)
    dest = Path(args.output)
    if dest.suffix.lower() != ".png":
        raise LayergenError(f"{dest}: output must be a .png file")
    paths = [dest] if args.num_images == 1 else [dest.with_name(f"{dest.stem}-{k}{dest.suffix}")
                                                 for k in range(args.num_images)]
    check_writable(paths[0])
    pipe = ActionPipeline.from_pretrained(args.model or mini_path("action"))
    files = [Path(f) for f in args.identifier]
    loaded = set()
    for f in files:
        loaded.add(pipe.load_action_identifier(f, strict=not args.no_strict).token)
    for token in dict.fromkeys(TOKEN_PATTERN.findall(args.prompt)):
        if token in loaded:
            continue
        f = Path(args.identifier_dir) / f"{token[1:-1]}.safetensors"
        if not f.is_file():
            given = (f"the -i files define {', '.join(sorted(loaded))}" if loaded else "no identifier file was given")
            raise LayergenError(f"prompt names {token} but {given} and {f} does not exist; "
                                f"pass -i FILE or learn it with: layergen action learn EXEMPLARS --name {token[1:-1]}")
        pipe.load_action_identifier(f, strict=not args.no_strict)
    out = pipe(args.prompt, num_images_per_prompt=args.num_images, seed=args.seed,
               num_inference_steps=args.steps, guidance_scale=args.guidance_scale,
               negative_prompt=args.negative_prompt,
               **({} if args.identifier_steps is None else {"identifier_steps": args.identifier_steps}))
    for img, path in zip(out.images, paths):
        with atomic_path(path) as tmp:
            img.save(tmp, format="PNG")
    print("wrote " + ", ".join(str(p) for p in paths))
    return 0
