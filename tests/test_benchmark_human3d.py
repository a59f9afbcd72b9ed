"""benchmarks/human3d.py: stage-1 numbers of runs that are gone are carried over, fresh runs replace them."""
import json
from pathlib import Path


def _run(folder: Path, psnr: float, use_shift: bool):
    folder.mkdir(parents=True)
    rows = [{"seed": 7, "layer": "body", "psnr": psnr, "ssim": 0.9}]
    (folder / "metrics.json").write_text(json.dumps({"use_shift": use_shift, "heldout": {
        "psnr": psnr, "ssim": 0.9, "psnr_min": psnr, "per_layer": {"body": psnr}, "rows": rows}}))
    (folder / "args.json").write_text(json.dumps({"num_subjects": 8, "joint_steps": 600, "planes_steps": 400,
                                                  "seed": 0}))


def test_missing_stage1_runs_carry_their_previous_numbers(tmp_path, load_benchmark):
    bench = load_benchmark("human3d")
    out = tmp_path / "human3d.json"
    dirs = {k: tmp_path / k for k in ("stage1", "shift", "no_shift")}
    args = bench.parse_args(["--stage1", str(dirs["stage1"]), "--ablation_shift", str(dirs["shift"]),
                             "--ablation_noshift", str(dirs["no_shift"]), "--output", str(out)])
    assert bench.reconstruction(args) == {"shipped": None, "shift": None, "no_shift": None}

    _run(dirs["stage1"], 29.0, True)
    _run(dirs["shift"], 26.0, True)
    _run(dirs["no_shift"], 25.0, False)
    fresh = bench.reconstruction(args)
    assert fresh["shift_gain_db"] == 1.0 and fresh["shift_wins"] == "1/1 subject-layers"
    assert "carried_from" not in fresh["shift"]
    out.write_text(json.dumps({"reconstruction": fresh}))

    for d in dirs.values():                      # runs/ is not versioned: a new checkout has none of them
        (d / "metrics.json").unlink()
    carried = bench.reconstruction(args)
    for key in ("shipped", "shift", "no_shift"):
        assert carried[key]["psnr"] == fresh[key]["psnr"] and carried[key]["carried_from"]
    assert carried["shift_gain_db"] == 1.0
