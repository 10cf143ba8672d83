"""Guidance distillation (diffguide/training/distill.py, diffguide/models/student.py): Meng et al. 2023, "On Distillation of
Guided Diffusion Models" (arXiv 2210.03142, no official code), its stage 2 from Salimans & Ho 2022, "Progressive
Distillation for Fast Sampling of Diffusion Models" (arXiv 2202.00512, Algorithm 2), and the LoRA variant."""

import pytest
import torch
from omegaconf import OmegaConf

from diffguide.training import distill
from diffguide.errors import UserError
from diffguide.guidance.distilled import Distilled
from diffguide.models import student as student_lib
from diffguide.models import unet as unet_lib
from diffguide.models.gmm import GaussianMixture
from diffguide.models.schedules import CLEAN
from diffguide.samplers.ddim import DDIM
from diffguide.training.loop import noised
from tests.helpers import SCHEDULE, TINY_UNET, ToyDenoiser, toy_images


def _stage1_cfg(tmp_path, teacher, **kw):
    base = dict(name="s", out=str(tmp_path / "student.safetensors"), teacher=str(teacher), w_range=[1.0, 4.0],
                lora=None, steps=8, batch_size=32, lr=2e-3, warmup_steps=1, weight_decay=0.0, ema_decay=0.0,
                precision="fp32", seed=0, log_every=100, checkpoint_every=0)
    return OmegaConf.create({**base, **kw})


@pytest.fixture(scope="module")
def teacher_path(tmp_path_factory):
    """A tiny class-conditional UNet whose conditional and unconditional predictions differ (its class embedding
    scaled up: a random tiny network's barely do)."""
    torch.manual_seed(1)
    model = unet_lib.build(TINY_UNET, 4, SCHEDULE)
    with torch.no_grad():
        model.unet.class_embedding.weight.mul_(20)
    path = tmp_path_factory.mktemp("teacher") / "teacher.safetensors"
    unet_lib.save(model, path)
    return path


def _fixed_batch(student, n=32):
    g = torch.Generator().manual_seed(7)
    images, labels = toy_images(n)
    x0 = images.float() / 127.5 - 1
    t = torch.randint(0, 1000, (n,), generator=g)
    x_t = noised(student.alphas_cumprod, x0, t, torch.randn(x0.shape, generator=g))
    w = 1 + 3 * torch.rand(n, generator=g)
    return x_t, t, labels, w


def _stage1_loss(student, teacher, batch):
    x_t, t, labels, w = batch
    with torch.no_grad():
        return torch.nn.functional.mse_loss(student.guided_output(x_t, t, labels, w),
                                            distill.guided_target(teacher, x_t, t, labels, w)).item()


def test_the_target_is_the_teachers_guided_prediction_worked_by_hand():
    """Meng et al. Sec. 2: x^w(z_t) = (1 + w') x_c(z_t) - w' x(z_t) with their w' = w - 1 (diffguide's w), i.e.
    eps_u + w (eps_c - eps_u). On ToyDenoiser eps(x, t, y) = 0.5 x + 0.1 (y + 1) + t / 1000 (y = -1 for the null
    class), so the target is 0.5 x + t / 1000 + 0.1 w (y + 1), row by row with each row's own w."""
    toy = ToyDenoiser(num_classes=3)
    x = torch.randn(4, 1, 2, 2)
    t = torch.tensor([10, 500, 999, 0])
    labels = torch.tensor([0, 1, 2, 1])
    w = torch.tensor([1.0, 1.5, 4.0, 2.5])
    target = distill.guided_target(toy, x, t, labels, w)
    by_hand = 0.5 * x + (t.float() / 1000).view(-1, 1, 1, 1) + (0.1 * w * (labels + 1)).view(-1, 1, 1, 1)
    torch.testing.assert_close(target, by_hand, rtol=0, atol=1e-6)
    assert toy.calls == [8]  # conditional and unconditional in one batched forward


def test_the_untrained_student_is_the_teachers_conditional_model(teacher_path):
    """The scale embedding's last layer starts at zero, so before training the student predicts the teacher's
    conditional eps at every w (Meng et al. initialise the student from the teacher)."""
    teacher = unet_lib.load(str(teacher_path))
    student = student_lib.from_teacher(teacher, [1, 4])
    x_t, t, labels, w = _fixed_batch(student, 8)
    with torch.no_grad():
        torch.testing.assert_close(student.guided_output(x_t, t, labels, w), teacher.raw_output(x_t, t, labels),
                                   rtol=0, atol=0)


def test_a_few_training_steps_lower_the_distillation_loss_and_the_checkpoint_reproduces_the_student(
        tmp_path, teacher_path):
    teacher = unet_lib.load(str(teacher_path))
    cfg = _stage1_cfg(tmp_path, teacher_path)
    images, labels = toy_images()
    batch = _fixed_batch(teacher)
    before = _stage1_loss(student_lib.from_teacher(teacher, [1, 4]), teacher, batch)
    student, stats = distill.train_guided_student(cfg, images, labels, torch.device("cpu"), log=lambda *_: None)
    after = _stage1_loss(student, teacher, batch)
    assert before > 1e-4 and after < 0.7 * before, (before, after)
    # the file holds fp16 tensors: the same network with its weights rounded so is reproduced to the bit
    with torch.no_grad():
        for p in student.unet.parameters():
            p.copy_(p.half().float())
        x_t, t, y, w = batch
        expected = student.guided_output(x_t, t, y, w)
    reloaded = student_lib.load(cfg.out)
    assert reloaded.w_range == (1.0, 4.0) and reloaded.trained_steps is None
    with torch.no_grad():
        torch.testing.assert_close(reloaded.guided_output(x_t, t, y, w), expected, rtol=0, atol=0)


def test_the_lora_students_base_stays_the_teacher_to_the_bit(tmp_path, teacher_path):
    """LoRA-Enhanced Distillation: the student is the frozen teacher plus adapters. After training, the base weights
    equal the teacher's bit for bit, the base run as the teacher (adapters and scale embedding off) is the teacher's
    output exactly, the adapters moved, and the loss fell. The checkpoint holds the adapters only and reloads onto
    the teacher's file; another teacher is refused."""
    teacher = unet_lib.load(str(teacher_path))
    cfg = _stage1_cfg(tmp_path, teacher_path, lora={"r": 4, "alpha": 4, "target_modules": ["conv1", "conv2"]},
                      out=str(tmp_path / "lora.safetensors"))
    images, labels = toy_images()
    batch = _fixed_batch(teacher)
    before = _stage1_loss(student_lib.from_teacher(teacher, [1, 4]), teacher, batch)
    student, stats = distill.train_guided_student(cfg, images, labels, torch.device("cpu"), log=lambda *_: None)
    base = student_lib.base_state(student)
    reference = teacher.unet.state_dict()
    assert set(base) == set(reference)
    for key, value in reference.items():
        assert torch.equal(base[key], value), key
    assert _stage1_loss(student, teacher, batch) < 0.9 * before
    assert stats["trainable"] < 0.5 * stats["parameters"]
    lora_b = [v for k, v in student_lib.trainable_state(student).items() if "lora_B" in k]
    assert lora_b and any(v.abs().max() > 0 for v in lora_b)  # peft starts B at zero
    x_t, t, y, w = batch
    with torch.no_grad():
        torch.testing.assert_close(student_lib.LoraBase(student).raw_output(x_t, t, y),
                                   teacher.raw_output(x_t, t, y), rtol=0, atol=0)
    reloaded = student_lib.load(cfg.out, teacher=str(teacher_path), merge=False)
    merged = student_lib.load(cfg.out, teacher=str(teacher_path))
    with torch.no_grad():
        for p in student.unet.parameters():
            p.copy_(p.half().float())
        expected = student.guided_output(x_t, t, y, w)
        torch.testing.assert_close(reloaded.guided_output(x_t, t, y, w), expected, rtol=0, atol=0)
        torch.testing.assert_close(merged.guided_output(x_t, t, y, w), expected, rtol=0, atol=1e-5)
    other = tmp_path / "other.safetensors"
    unet_lib.save(unet_lib.build(TINY_UNET, 4, SCHEDULE), other)
    with pytest.raises(UserError, match="not the teacher this LoRA student was trained on"):
        student_lib.load(cfg.out, teacher=str(other))


def _ddim_gain(t, s, std):
    """One exact-x0 DDIM step of N(mu, std^2) data maps d = x - alpha mu to d (alpha_s alpha_t std^2 +
    noise_s noise_t) / v_t, v_t = alpha_t^2 std^2 + noise_t^2 (worked by hand from x0 = mu + alpha_t std^2 d / v_t,
    eps = (x - alpha_t x0) / noise_t = noise_t d / v_t, x_s = alpha_s x0 + noise_s eps)."""
    v = t.alpha ** 2 * std ** 2 + t.noise ** 2
    return (s.alpha * t.alpha * std ** 2 + s.noise * t.noise) / v


@pytest.mark.parametrize("last", [False, True])
def test_the_two_step_target_on_the_exact_mixture_is_the_closed_form(last):
    """Salimans & Ho, Algorithm 2: z' and z'' are two teacher DDIM steps t -> t' -> t'', and
    x~ = (z'' - (sigma_t'' / sigma_t) z_t) / (alpha_t'' - (sigma_t'' / sigma_t) alpha_t). For the exact mixture's
    class-conditional model (class k: N(mu_k, s^2) data) each DDIM step is the affine map of `_ddim_gain`, so the
    ideal one-step student is x~ = mu + (g(t, t') g(t', t'') - r) / (alpha'' - r alpha_t) (z_t - alpha_t mu) with
    r = sigma''/sigma_t: worked by hand here. A DDIM step from z_t with x0 = x~ lands on z''."""
    means = torch.tensor([[[[0.6, -0.3], [0.1, 0.9]]], [[[-0.8, 0.2], [0.5, -0.4]]]])
    std = 0.3
    gmm = GaussianMixture(means, std)
    grid = gmm.schedule.grid(DDIM.scheduler_class, 8, "trailing")
    t, t_mid, t_next = (grid[-2], grid[-1], CLEAN) if last else (grid[2], grid[3], grid[4])
    labels = torch.tensor([0, 1, 1])
    z = torch.randn(3, 1, 2, 2, dtype=torch.float64)
    target = distill.two_step_target(lambda x, level: gmm.predict(x, level, labels), z, t, t_mid, t_next, None)
    mu = means[labels].double()
    r = t_next.noise / t.noise
    gain = _ddim_gain(t, t_mid, std) * _ddim_gain(t_mid, t_next, std)
    by_hand = mu + (gain - r) / (t_next.alpha - r * t.alpha) * (z - t.alpha * mu)
    torch.testing.assert_close(target.double(), by_hand, rtol=1e-9, atol=1e-9)
    # the defining property: the student's one DDIM step with x0 = x~ is the teacher's two
    two = z
    for a, b in ((t, t_mid), (t_mid, t_next)):
        pred = gmm.predict(two, a, labels)
        two = b.alpha * pred.x0 + b.noise * pred.eps
    one = t_next.alpha * target + t_next.noise * (z - t.alpha * target) / t.noise
    torch.testing.assert_close(one.double(), two.double(), rtol=1e-9, atol=1e-9)


def test_the_target_is_clipped_where_the_sampler_clips():
    """With a data range, the teacher's steps clip x0 as the sampler does, and the target is clipped too: a clipping
    sampler's step is monotone in each pixel of x^, so clip(x~) is the reachable prediction closest to the target."""
    gmm = GaussianMixture(torch.tensor([[[[3.0]]], [[[-3.0]]]]), 0.5)
    grid = gmm.schedule.grid(DDIM.scheduler_class, 4, "trailing")
    labels = torch.tensor([0, 1])
    z = torch.zeros(2, 1, 1, 1, dtype=torch.float64)
    unclipped = distill.two_step_target(lambda x, lv: gmm.predict(x, lv, labels), z, grid[0], grid[1], grid[2], None)
    clipped = distill.two_step_target(lambda x, lv: gmm.predict(x, lv, labels), z, grid[0], grid[1], grid[2],
                                      (-1.0, 1.0))
    assert unclipped.abs().min() > 1 and clipped.abs().max() <= 1


def test_the_two_weightings_of_the_progressive_loss():
    """snr: |eps^ - eps~|^2 = (alpha^2 / sigma^2) |x^ - x~|^2; truncated_snr: max(alpha^2 / sigma^2, 1) |x^ - x~|^2
    (Salimans & Ho, Sec. 4): checked on a student whose output is known, at a low and a high noise level."""
    from diffguide.models import gmm as gmm_lib

    teacher = gmm_lib.DistilledMixture(torch.tensor([[[[0.5]]], [[[-0.5]]]]), 0.3)

    class Fixed(torch.nn.Module):
        def guided_output(self, x, time, labels, w):
            return torch.full_like(x, 0.25)

    grid = teacher.schedule.grid(DDIM.scheduler_class, 4, "trailing")
    labels = torch.tensor([0, 1])
    w = torch.tensor([2.0, 3.0])
    x_t = torch.tensor([[[[0.3]]], [[[-1.2]]]])
    for t, t_mid, t_next in ((grid[0], grid[1], grid[2]), (grid[2], grid[3], CLEAN)):
        x_tilde = distill.two_step_target(lambda x, lv: teacher.predict_guided(x, lv, labels, w), x_t, t, t_mid,
                                          t_next, teacher.data_range)
        x_hat = (x_t - t.noise * 0.25) / t.alpha
        snr = t.alpha ** 2 / t.noise ** 2
        x_err = (x_hat - x_tilde).pow(2).mean().item()
        for weighting, weight in (("snr", snr), ("truncated_snr", max(snr, 1.0))):
            got = distill.progressive_loss(teacher, Fixed(), x_t, labels, w, t, t_mid, t_next, weighting).item()
            assert got == pytest.approx(weight * x_err, rel=1e-4), (weighting, t.t)
    with pytest.raises(UserError, match="train.weighting='x' is not one of snr, truncated_snr"):
        distill.progressive_loss(teacher, Fixed(), x_t, labels, w, *grid[:3], "x")


def test_round_levels_nest_and_grids_that_do_not_are_refused():
    gmm = GaussianMixture(torch.zeros(2, 1, 1, 1), 0.5)
    student_levels, teacher_levels = distill.round_levels(gmm, 8)
    assert len(teacher_levels) == 16 and teacher_levels[::2] == student_levels
    assert [lv.t for lv in student_levels] == [999, 874, 749, 624, 499, 374, 249, 124]
    # 1000 / 96 and 1000 / 48 round differently at one level: the 48-step grid is not every other 96-step level
    with pytest.raises(UserError, match="not every other level"):
        distill.round_levels(gmm, 48)


def test_progressive_training_lowers_its_loss_and_writes_every_round(tmp_path, teacher_path):
    """Two rounds (4 -> 2 -> 1 steps) of a few steps each: each round's loss falls on a fixed batch, each round's
    student is written, remembers its step count, and refuses another."""
    images, labels = toy_images()
    stage1 = tmp_path / "stage1.safetensors"
    distill.train_guided_student(_stage1_cfg(tmp_path, teacher_path, steps=2, out=str(stage1)), images, labels,
                                 torch.device("cpu"), log=lambda *_: None)
    cfg = OmegaConf.create(dict(name="p", out=str(tmp_path / "p"), student=str(stage1),
                                w_range=[1.0, 4.0], rounds=[2, 1], steps=6, batch_size=16, lr=1e-3, warmup_steps=1,
                                weight_decay=0.0, ema_decay=0.0, precision="fp32", seed=0, log_every=100,
                                checkpoint_every=0))
    _, stats = distill.train_progressive(cfg, images, labels, torch.device("cpu"), log=lambda *_: None)
    for steps in (2, 1):
        assert stats[f"{steps}step"]["final_loss"] < stats[f"{steps}step"]["first_loss"]
        student = student_lib.load(str(tmp_path / f"p_{steps}step.safetensors"))
        assert student.trained_steps == steps
        student.check_sampling(DDIM(steps), Distilled(2.0))
        with pytest.raises(UserError, match=f"run it with steps={steps}"):
            student.check_sampling(DDIM(steps * 4), Distilled(2.0))
    assert not (tmp_path / "p_1step.md").exists()  # the cards are the command's (tests/test_train_command.py)


def test_a_student_refuses_other_guidance_and_other_models_refuse_distilled(teacher_path):
    teacher = unet_lib.load(str(teacher_path))
    student = student_lib.from_teacher(teacher, [1, 4])
    from diffguide.guidance.cfg import CFG

    with pytest.raises(UserError, match="does not apply to a guidance-distilled student"):
        DDIM(4).check(student, CFG(2.0))
    with pytest.raises(UserError, match="needs a guidance-distilled student"):
        Distilled(2.0).check(teacher)
    with pytest.raises(UserError, match=r"outside the scales this student was trained on, \[1, 4\]"):
        Distilled(5.0).check(student)
    Distilled(4.0).check(student)


def test_distilled_sampling_spends_one_evaluation_per_step(teacher_path):
    """25 DDIM steps of a student cost 25 NFE, and its prediction is the student's guided output at the scale."""
    student = student_lib.from_teacher(unet_lib.load(str(teacher_path)), [1, 4])
    with torch.no_grad():
        student.embedding.mlp.linear_2.weight.normal_()  # a student whose scale input matters
    labels = torch.tensor([0, 3])
    x, nfe = DDIM(25).sample(student, Distilled(2.5), torch.randn(2, 1, 28, 28), labels)
    assert nfe == 25 and torch.isfinite(x).all()
    level = student.level(999)
    x_t = torch.randn(2, 1, 28, 28)
    got = Distilled(2.5)(student, x_t, level, labels)
    expected = student.guided_output(x_t, torch.full((2,), 999), labels, 2.5)
    torch.testing.assert_close(got.eps, expected, rtol=0, atol=0)
    other = student.guided_output(x_t, torch.full((2,), 999), labels, 1.5)
    assert (other - expected).abs().max() > 1e-3


def test_distilled_sampling_of_the_mixtures_ideal_student_is_cfg_at_half_the_evaluations():
    """The optimum of Meng et al.'s stage-1 loss is the teacher's CFG itself: on the exact mixture (model=gmm_distilled)
    guidance=distilled makes CFG's trajectories, at one evaluation per step instead of two."""
    from diffguide.guidance.cfg import CFG
    from diffguide.models import gmm

    teacher, student = gmm.image(), gmm.image(distilled=True)
    x_T = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    labels = torch.tensor([0, 1, 2, 0])
    x_cfg, nfe_cfg = DDIM(6).sample(teacher, CFG(2.5), x_T, labels)
    x_student, nfe_student = DDIM(6).sample(student, Distilled(2.5), x_T, labels)
    torch.testing.assert_close(x_student, x_cfg, rtol=0, atol=1e-6)
    assert (nfe_cfg, nfe_student) == (12, 6)
    with pytest.raises(UserError, match="does not apply to a guidance-distilled student"):
        DDIM(6).check(student, CFG(2.5))
