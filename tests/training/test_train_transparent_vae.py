"""training/train_transparent_vae.py: runs a few steps on tiny components, saves, rotates, resumes."""
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from diffusers import AutoencoderKL

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "training" / "train_transparent_vae.py"
TINY = ["--resolution", "32", "--train_batch_size", "2", "--encoder_block_out_channels", "4", "8", "8", "8",
        "--decoder_block_out_channels", "8", "8", "8", "8", "--num_validation_images", "2", "--seed", "0"]


def load_script():
    spec = importlib.util.spec_from_file_location("train_transparent_vae", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def tiny_vae_dir(tmp_path_factory):
    torch.manual_seed(0)
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, down_block_types=("DownEncoderBlock2D",) * 4,
                        up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(8, 8, 8, 8), layers_per_block=1,
                        norm_num_groups=4, sample_size=32, scaling_factor=0.7)
    path = tmp_path_factory.mktemp("vae") / "vae"
    vae.save_pretrained(path)
    return path


def run(args, launcher=(sys.executable,), env_extra=None):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    env.update(env_extra or {})
    proc = subprocess.run([*launcher, str(SCRIPT), *args], capture_output=True, text=True, env=env, timeout=300,
                          cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout + proc.stderr


def test_trains_saves_rotates_and_resumes(tiny_vae_dir, tmp_path):
    out = tmp_path / "run"
    common = ["--pretrained_vae", str(tiny_vae_dir), "--output_dir", str(out), "--checkpointing_steps", "1",
              "--checkpoints_total_limit", "1", "--validation_steps", "2", "--crop_size", "16", *TINY]
    run([*common, "--max_train_steps", "2"])
    # Rotation kept only the newest checkpoint; previews and both model folders exist.
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2"]
    assert (out / "validation" / "step-000002.png").is_file() and (out / "validation" / "final.png").is_file()
    from layergen.models.transparent_codec import TransparentDecoder, TransparentEncoder, decode_rgba, encode_rgba
    enc = TransparentEncoder.from_pretrained(out / "transparent_encoder")
    dec = TransparentDecoder.from_pretrained(out / "transparent_decoder")
    assert enc.config.offset_scale > 0 and tuple(enc.config.block_out_channels) == (4, 8, 8, 8)
    assert dec.config.latent_injection_index == 3 and dec.config.down_block_types[-1] == "AttnDownBlock2D"
    vae = AutoencoderKL.from_pretrained(tiny_vae_dir)
    with torch.no_grad():
        rgba = decode_rgba(vae, dec, encode_rgba(vae, enc, torch.rand(1, 4, 32, 32)), tta=False)
    assert rgba.shape == (1, 4, 32, 32)
    before = {k: v.clone() for k, v in dec.state_dict().items()}

    # Resume continues the step count from checkpoint-2 (the LR scheduler sits at step 3 afterwards);
    # the last step trains on whole (uncropped) layers.
    log = run([*common, "--max_train_steps", "3", "--resume_from_checkpoint", "latest", "--final_full_res_steps", "1"])
    assert "resumed from" in log and "checkpoint-2" in log
    assert "step 2: switching to uncropped 32px layers" in log
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-3"]
    sched = torch.load(out / "checkpoint-3" / "scheduler.bin", weights_only=False)
    assert sched["last_epoch"] == 3
    after = TransparentDecoder.from_pretrained(out / "transparent_decoder").state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)


def test_dataset_is_deterministic_and_crops_hold_the_object():
    mod = load_script()
    ds = mod.TransparentLayerDataset(size=64, crop_size=32, scene_fraction=0.5)
    a, b = ds[5]["rgba"], ds[5]["rgba"]
    assert torch.equal(a, b) and a.shape == (4, 32, 32) and a.dtype == torch.float32
    assert 0 <= a.min() and a.max() <= 1
    visible = [float(ds[i]["rgba"][3].max()) for i in range(12)]
    assert sum(v > 0.5 for v in visible) >= 10  # crops are taken around visible pixels
    full = mod.TransparentLayerDataset(size=64, scene_fraction=1.0, augment=False)
    assert full[0]["rgba"].shape == (4, 64, 64)


def test_losses_are_zero_for_a_perfect_prediction_and_punish_fringes():
    mod = load_script()
    rgba = torch.zeros(2, 4, 8, 8)
    rgba[:, 0], rgba[:, 3, 2:6, 2:6] = 1.0, 1.0
    assert all(float(x) == 0 for x in mod.codec_losses(rgba.clone(), rgba, torch.Generator().manual_seed(0)))
    # A grey fringe: right alpha, wrong colour at a half-transparent edge pixel.
    true = rgba.clone()
    true[:, 3, 1, 2:6] = 0.5
    pred = true.clone()
    pred[:, :3, 1, 2:6] = 0.5
    alpha, rgb, comp = mod.codec_losses(pred, true, torch.Generator().manual_seed(0))
    assert float(alpha) == 0 and float(rgb) > 0 and float(comp) > 0
    # MSE term: 4 edge pixels x 2 images, error 0.5 in G and B (true colour red), weight 0.5.
    expected = (8 * 0.5 * (0.25 + 0.25 + 0.25)) / (3 * float(true[:, 3:].sum()) + 1.0)
    assert float(mod.rgb_mse_loss(pred, true)) == pytest.approx(expected)


@pytest.mark.slow
def test_runs_under_accelerate_with_two_processes(tiny_vae_dir, tmp_path):
    out = tmp_path / "ddp"
    launcher = (sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no")
    run(["--pretrained_vae", str(tiny_vae_dir), "--output_dir", str(out), "--max_train_steps", "2",
         "--checkpointing_steps", "2", "--validation_steps", "2", *TINY], launcher=launcher,
        env_extra={"ACCELERATE_USE_CPU": "1"})
    # Both ranks took part (one RNG state each); only the main process wrote the models.
    assert (out / "checkpoint-2" / "random_states_1.pkl").is_file()
    assert (out / "transparent_encoder" / "config.json").is_file()
    assert (out / "transparent_decoder" / "config.json").is_file()


def test_freeze_encoder_fine_tunes_the_decoder_only(tiny_vae_dir, tmp_path):
    """--freeze_encoder keeps every encoder weight bit-identical (latents stay valid) while the decoder learns."""
    first, second = tmp_path / "first", tmp_path / "second"
    common = ["--pretrained_vae", str(tiny_vae_dir), "--checkpointing_steps", "10", "--validation_steps", "10", *TINY]
    run([*common, "--output_dir", str(first), "--max_train_steps", "1"])
    run([*common, "--output_dir", str(second), "--max_train_steps", "2", "--pretrained_codec", str(first),
         "--freeze_encoder", "--learning_rate", "1e-2"])
    from layergen.models.transparent_codec import TransparentDecoder, TransparentEncoder
    for cls, name, same in ((TransparentEncoder, "transparent_encoder", True),
                            (TransparentDecoder, "transparent_decoder", False)):
        a = cls.from_pretrained(first / name).state_dict()
        b = cls.from_pretrained(second / name).state_dict()
        assert all(torch.equal(a[k], b[k]) for k in a) is same, name


def test_new_decoder_keeps_the_encoder_and_trains_a_fresh_wider_decoder(tiny_vae_dir, tmp_path):
    """--new_decoder: encoder bit-identical, decoder built from the flags (other width) and trained under latent noise."""
    first, second = tmp_path / "first", tmp_path / "second"
    common = ["--pretrained_vae", str(tiny_vae_dir), "--checkpointing_steps", "10", "--validation_steps", "10", *TINY]
    run([*common, "--output_dir", str(first), "--max_train_steps", "1"])
    wide = [*common, "--decoder_block_out_channels", "12", "12", "16", "16"]  # the last occurrence wins
    run([*wide, "--output_dir", str(second), "--max_train_steps", "2", "--pretrained_codec", str(first),
         "--freeze_encoder", "--new_decoder", "--latent_noise", "0.3"])
    from layergen.models.transparent_codec import TransparentDecoder, TransparentEncoder
    a = TransparentEncoder.from_pretrained(first / "transparent_encoder").state_dict()
    b = TransparentEncoder.from_pretrained(second / "transparent_encoder").state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert list(TransparentDecoder.from_pretrained(first / "transparent_decoder").config.block_out_channels) == [8] * 4
    assert list(TransparentDecoder.from_pretrained(second / "transparent_decoder").config.block_out_channels) == [
        12, 12, 16, 16]


def test_new_decoder_without_a_frozen_encoder_is_refused():
    mod = load_script()
    with pytest.raises(SystemExit):
        mod.parse_args(["--pretrained_vae", "v", "--output_dir", "o", "--new_decoder"])
    with pytest.raises(SystemExit):
        mod.parse_args(["--pretrained_vae", "v", "--output_dir", "o", "--latent_noise", "-1"])


def test_latent_noise_perturbs_the_decoded_latent_only_when_asked(tiny_vae_dir):
    mod = load_script()
    vae = AutoencoderKL.from_pretrained(tiny_vae_dir).eval()
    args = mod.parse_args(["--pretrained_vae", str(tiny_vae_dir), "--output_dir", "o", *TINY])
    encoder, decoder = mod.build_codec(args, vae)
    torch.nn.init.normal_(decoder.latent_conv_in.weight)  # zero-initialised: make the latent matter
    rgba = torch.rand(2, 4, 32, 32)
    clean = [mod.codec_forward(vae, encoder, decoder, rgba)[0] for _ in range(2)]
    noisy = mod.codec_forward(vae, encoder, decoder, rgba, latent_noise=0.5,
                              generator=torch.Generator().manual_seed(0))[0]
    assert torch.equal(clean[0], clean[1])
    assert (noisy - clean[0]).abs().mean() > 1e-4


def test_alpha_teacher_decodes_the_same_noisy_inputs_as_the_student(tiny_vae_dir):
    """The teacher sees exactly the student's (noisy) latent and pixels: a copy of the student agrees (to float rounding),
    so the --alpha_teacher_weight term starts at zero and only grows as the student's alpha drifts."""
    import copy

    mod = load_script()
    vae = AutoencoderKL.from_pretrained(tiny_vae_dir).eval()
    args = mod.parse_args(["--pretrained_vae", str(tiny_vae_dir), "--output_dir", "o", *TINY])
    encoder, decoder = mod.build_codec(args, vae)
    torch.nn.init.normal_(decoder.latent_conv_in.weight)
    teacher = copy.deepcopy(decoder).requires_grad_(False)
    rgba = torch.rand(2, 4, 32, 32)
    pred, _, teacher_pred = mod.codec_forward(vae, encoder, decoder, rgba, latent_noise=0.5,
                                              generator=torch.Generator().manual_seed(0), teacher=teacher)
    assert (pred - teacher_pred).abs().max() < 1e-5  # same inputs (grad vs no-grad kernels differ in the last bits)
    assert mod.codec_forward(vae, encoder, decoder, rgba)[2] is None
    with torch.no_grad():
        teacher.conv_out.bias += 0.25
    _, _, moved = mod.codec_forward(vae, encoder, decoder, rgba, latent_noise=0.5,
                                    generator=torch.Generator().manual_seed(0), teacher=teacher)
    assert torch.allclose(moved - pred.detach(), torch.full_like(pred, 0.25), atol=1e-5)
    with pytest.raises(SystemExit):
        mod.parse_args(["--pretrained_vae", "v", "--output_dir", "o", "--alpha_teacher_weight", "1"])
