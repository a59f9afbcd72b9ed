import argparse
import io
from pathlib import Path

import pytest
import torch
from accelerate import Accelerator
from accelerate.tracking import GeneralTracker
from diffusers import UNet2DModel
from diffusers.training_utils import EMAModel
from tqdm.auto import tqdm

from layergen.training_utils import (add_training_args, averaged_copy, due, finish_step, local_model, optimizer_step,
                                     prepare_training, run_script, start_accelerator, step_schedule)
from layergen.errors import LayergenError, ModelNotFoundError


def test_averaged_copy_carries_ema_weights_and_leaves_the_model_alone():
    accelerator = Accelerator(cpu=True)
    model = torch.nn.Linear(3, 2)
    ema = EMAModel(model.parameters(), decay=0.5)
    trained = [p.detach().clone() for p in model.parameters()]
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    ema.step(model.parameters())  # the EMA's first step copies the weights (its decay warms up from 0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)  # training moves on; the average stays behind
    copied = averaged_copy(accelerator, model, ema)
    for c, p, shadow in zip(copied.parameters(), model.parameters(), ema.shadow_params):
        assert torch.equal(c, shadow)
        assert not torch.equal(c, p)
    for p, old in zip(model.parameters(), trained):
        assert torch.allclose(p, old + 2.0)  # the training weights are not swapped for the averaged ones
    assert not copied.training
    plain = averaged_copy(accelerator, model)
    assert all(torch.equal(a, b) for a, b in zip(plain.parameters(), model.parameters()))
    assert plain is not accelerator.unwrap_model(model)


def test_optimizer_step_clips_steps_schedules_and_zeroes():
    accelerator = Accelerator(cpu=True)
    p = torch.nn.Parameter(torch.zeros(4))
    opt = torch.optim.SGD([p], lr=1.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 ** s)
    p.grad = torch.full((4,), 10.0)  # norm 20, clipped to 1
    optimizer_step(accelerator, [p], opt, sched, max_grad_norm=1.0)
    assert torch.allclose(p.detach(), torch.full((4,), -0.5), atol=1e-5)
    assert p.grad is None or not p.grad.any()
    assert opt.param_groups[0]["lr"] == 0.5


class _RecordingTracker(GeneralTracker):
    """An in-memory `--report_to` target: what a user's tensorboard/wandb run would receive."""

    name = "recording"
    requires_logging_directory = False
    main_process_only = True

    def __init__(self):
        super().__init__()
        self.config, self.logged = None, []

    @property
    def tracker(self):
        return self

    def store_init_configuration(self, values):
        self.config = values

    def log(self, values, step=None, **kwargs):
        self.logged.append((step, values))


def test_shared_flags_start_trackers_and_finish_step_logs_counts_and_checkpoints(tmp_path):
    parser = argparse.ArgumentParser()
    add_training_args(parser, train_batch_size=3, max_train_steps=7, learning_rate=1e-3, lr_warmup_steps=2,
                      checkpointing_steps=2, validation_steps=5, checkpoints_total_limit=1)
    args = parser.parse_args(["--use_ema"])
    assert (args.train_batch_size, args.max_train_steps) == (3, 7)
    assert (args.checkpointing_steps, args.validation_steps) == (2, 5)
    assert args.use_ema and args.ema_decay == 0.995 and args.max_grad_norm == 1.0
    no_ema = argparse.ArgumentParser()
    add_training_args(no_ema, train_batch_size=1, max_train_steps=1, learning_rate=1.0, lr_warmup_steps=0,
                      ema_decay=None)
    assert not hasattr(no_ema.parse_args([]), "use_ema")

    tracker = _RecordingTracker()
    args.report_to, args.output_dir = tracker, str(tmp_path / "run")
    accelerator = start_accelerator(args, "unit")
    assert tracker.config["train_batch_size"] == "3"  # the run's flags reach the tracker as its config
    # file-writing trackers (tensorboard) refuse to start without a logging directory
    assert Path(accelerator.logging_dir) == tmp_path / "run" / "logs"

    model = torch.nn.Linear(2, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    model, opt = accelerator.prepare(model, opt)
    ema = EMAModel(model.parameters(), decay=0.5)
    progress = tqdm(total=args.max_train_steps, file=io.StringIO())
    step = 0
    for k in range(3):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(1.0)
        step = finish_step(accelerator, args, tmp_path, step, progress, {"loss": torch.tensor([1.0, 3.0 + k])},
                           ema, model)
    assert step == 3 and progress.n == 3
    assert [s for s, _ in tracker.logged] == [1, 2, 3]
    assert [v["loss"] for _, v in tracker.logged] == [2.0, 2.5, 3.0]  # averaged over the batch (and processes)
    assert ema.optimization_step == 3
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint-2"]  # every 2nd step, rotated to the limit of 1


class _TwoProcessAccelerator:
    """Just what prepare_training asks of an accelerator, posing as one of 2 processes (no real launch)."""

    num_processes = 2

    def __init__(self):
        self.registered = []

    def prepare(self, *objs):
        return objs

    def register_for_checkpointing(self, obj):
        self.registered.append(obj)


def _lr_per_optimisation_step(optimizer, schedule, num_processes, steps):
    out = []
    for _ in range(steps):
        out.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        for _ in range(num_processes):  # a prepared scheduler steps once per process per optimisation step
            schedule.step()
    return out


def test_prepare_training_warms_up_over_the_same_optimisation_steps_on_any_process_count():
    args = argparse.Namespace(use_ema=True, ema_decay=0.9, learning_rate=1.0, lr_warmup_steps=4,
                              resume_from_checkpoint=None)
    for accelerator in (Accelerator(cpu=True), _TwoProcessAccelerator()):
        model = UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8,),
                            down_block_types=("DownBlock2D",), up_block_types=("UpBlock2D",), layers_per_block=1,
                            norm_num_groups=4)
        model, optimizer, schedule, ema, step = prepare_training(accelerator, args, model, "unused")
        assert step == 0
        assert ema.decay == 0.9 and ema.model_cls is UNet2DModel  # saved EMA weights reload as the model's class
        if isinstance(accelerator, _TwoProcessAccelerator):
            assert accelerator.registered == [ema]  # the EMA is checkpointed and resumed with the run
            lrs = _lr_per_optimisation_step(optimizer, schedule, 2, 7)
        else:
            lrs = _lr_per_optimisation_step(optimizer, schedule, 1, 7)
        assert lrs == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0, 1.0]  # linear warm-up over 4 optimisation steps


def test_step_schedule_calls_its_factor_with_optimisation_steps():
    def lrs(num_processes):
        p = torch.nn.Parameter(torch.zeros(1))
        opt = torch.optim.SGD([p], lr=1.0)
        return _lr_per_optimisation_step(opt, step_schedule(opt, lambda s: 1.0 / (s + 1), num_processes),
                                         num_processes, 5)

    assert lrs(1) == [1.0, 1 / 2, 1 / 3, 1 / 4, 1 / 5]
    assert lrs(2) == lrs(1) and lrs(4) == lrs(1)  # a prepared scheduler steps once per process


def test_due_counts_intervals_and_zero_means_never():
    assert [s for s in range(1, 10) if due(s, 3)] == [3, 6, 9]
    assert not any(due(s, 0) or due(s, None) for s in range(1, 10))


def test_layer_and_background_latents_batch_like_one_by_one():
    """The shared cache builder: fp16 scaled latent means of the procedural layers and backgrounds, in seed order
    across its 32-seed batches, with matching captions; nothing for count 0."""
    from diffusers import AutoencoderKL

    from layergen.data.scenes import make_object_layer, make_scene
    from layergen.models.transparent_codec import TransparentEncoder, encode_rgba
    from layergen.training_utils import layer_and_background_latents, rgb_latents, rgba_latents

    torch.manual_seed(0)
    vae = AutoencoderKL(down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                        block_out_channels=(8, 8, 8, 8), layers_per_block=1, norm_num_groups=4,
                        scaling_factor=0.7).eval()
    enc = TransparentEncoder(block_out_channels=(4, 8, 8, 8)).eval()
    out = layer_and_background_latents(vae, enc, 34, 32, disable=True)
    assert out["fg"].shape == out["bg"].shape == (34, 4, 4, 4) and out["fg"].dtype == torch.float16
    for seed in (0, 33):  # first batch and second batch
        obj = make_object_layer(seed, 32, centred=False, exclude_heldout=True)
        scene = make_scene(seed, 32, num_objects=0)
        assert out["fg_caps"][seed] == obj.caption and out["bg_caps"][seed] == scene.background_caption
        rgb = torch.from_numpy(scene.background).permute(2, 0, 1)[None].float() / 127.5 - 1
        with torch.no_grad():
            bg = vae.encode(rgb).latent_dist.mean * 0.7
            fg = encode_rgba(vae, enc, torch.from_numpy(obj.rgba).permute(2, 0, 1)[None].float() / 255)
        torch.testing.assert_close(out["bg"][seed:seed + 1].float(), bg, atol=2e-3, rtol=2e-3)
        torch.testing.assert_close(out["fg"][seed:seed + 1].float(), fg, atol=2e-3, rtol=2e-3)
        torch.testing.assert_close(rgb_latents(vae, [scene.background]).float(), bg, atol=2e-3, rtol=2e-3)
        torch.testing.assert_close(rgba_latents(vae, enc, [obj.rgba]).float(), fg, atol=2e-3, rtol=2e-3)
    empty = layer_and_background_latents(vae, enc, 0, 32, disable=True)
    assert empty == {"fg": None, "bg": None, "fg_caps": [], "bg_caps": []}


def test_shared_flags_refuse_values_that_would_crash_or_train_nothing(capsys):
    """nan / negative learning rates, zero batches or accumulation, negative steps: a usage error (exit 2)
    before anything loads, not an optimiser traceback or a run that saves an untrained model."""
    p = argparse.ArgumentParser()
    add_training_args(p, train_batch_size=2, max_train_steps=10, learning_rate=1e-4, lr_warmup_steps=0)
    args = p.parse_args(["--max_train_steps", "0", "--learning_rate", "3e-4", "--ema_decay", "0.99"])
    assert (args.max_train_steps, args.learning_rate, args.ema_decay) == (0, 3e-4, 0.99)  # 0: save the initial model
    for flag, value in (("--learning_rate", "nan"), ("--learning_rate", "-1e-4"), ("--learning_rate", "inf"),
                        ("--train_batch_size", "0"), ("--gradient_accumulation_steps", "0"),
                        ("--max_train_steps", "-1"), ("--max_grad_norm", "inf"), ("--ema_decay", "1"),
                        ("--train_batch_size", "2.5")):
        with pytest.raises(SystemExit) as exc:
            p.parse_args([flag, value])
        assert exc.value.code == 2 and flag in capsys.readouterr().err


def test_scripts_report_bad_models_and_data_in_one_line(tmp_path):
    """The scripts' own entry point (`run_script`): a missing model folder is named, never tried as a Hub id."""
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    env = {"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}
    for script, argv, fragment in (
            ("train_layer_unet.py", ["--vae", str(tmp_path / "nope"), "--codec", str(tmp_path)], "no such folder"),
            ("train_action_identifier.py", ["--name", "x", "--exemplars", str(tmp_path / "none")], "none")):
        proc = subprocess.run([sys.executable, str(root / "training" / script), "--output_dir", str(tmp_path / "o"),
                               *argv], capture_output=True, text=True, env=env, timeout=300)
        assert proc.returncode == 2 and "Traceback" not in proc.stderr, (script, proc.stderr[-2000:])
        assert fragment in proc.stderr.strip().splitlines()[-1], (script, proc.stderr)
    assert not (tmp_path / "o" / "pipeline").exists()


def test_local_model_and_run_script(tmp_path, capsys):
    assert local_model(tmp_path, "--vae") == tmp_path
    with pytest.raises(ModelNotFoundError, match="--vae .*nope: no such folder"):
        local_model(tmp_path / "nope", "--vae")

    def failing():
        raise LayergenError("the data folder is empty")

    with pytest.raises(SystemExit) as exc:
        run_script(failing)
    assert exc.value.code == 2 and capsys.readouterr().err == "error: the data folder is empty\n"
