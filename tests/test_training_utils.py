import torch
from accelerate import Accelerator
from diffusers.training_utils import EMAModel

from layergen.training_utils import averaged_copy, optimizer_step


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
