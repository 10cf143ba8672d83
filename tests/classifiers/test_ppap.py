"""PPAP experts (Go et al. 2023, "Towards Practical Plug-and-Play Diffusion Models", CVPR 2023).

The paper's method (Sec. 4): the timesteps [0, T) are split into N ranges, expert i is the off-the-shelf classifier
fine-tuned (parameter-efficiently: LoRA, Hu et al. 2021) on x_t with t in its range, by knowledge transfer from the
clean classifier on the diffusion model's own unlabelled samples, and guidance at step t uses "the expert
responsible for t". These tests check the routing, the LoRA start (Hu et al. 2021, Sec. 4.1: "We use a random
Gaussian initialization for A and zero for B, so dW = BA is zero at the beginning of training"; peft's
`init_lora_weights=True` default), the transfer loss worked by hand, that training touches only the expert's own
parameters, the file round trip, and the classifier guidance it plugs into.
"""

import math

import pytest
import torch
from omegaconf import OmegaConf

from diffguide.classifiers import ppap as ppap_lib
from diffguide.guidance.classifier import ClassifierGuidance
from diffguide.models.schedules import Level
from diffguide.classifiers import evaluator as evaluator_lib
from diffguide.training.ppap import train_ppap, transfer_loss
from tests.helpers import SCHEDULE


def _experts(tuning="lora", k=5, seed=0):
    torch.manual_seed(seed)
    backbone = evaluator_lib.Evaluator("test_resnet")
    return ppap_lib.PPAPExperts(backbone, ppap_lib.uniform_boundaries(k, 1000), SCHEDULE, tuning)


def _perturb(experts, seed=1):
    """Give every expert different, non-zero parameters (as training would)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for k in range(experts.num_experts):
            for p in experts.expert_parameters(k):
                p.add_(0.05 * torch.randn(p.shape, generator=g))


def test_uniform_boundaries_and_routing():
    """N = 5 experts over T = 1000 timesteps: expert i holds [200 i, 200 (i + 1)) (the paper's uniform split)."""
    assert ppap_lib.uniform_boundaries(5, 1000) == [0, 200, 400, 600, 800, 1000]
    assert ppap_lib.uniform_boundaries(3, 1000) == [0, 333, 667, 1000]
    experts = _experts()
    for t, k in [(0, 0), (199, 0), (200, 1), (399, 1), (400, 2), (799, 3), (800, 4), (999, 4), (1000, 4), (-1, 0),
                 (199.5, 0), (200.0, 1)]:
        assert experts.expert_of(t) == k, t


def test_log_prob_uses_the_expert_of_each_level():
    """log p(y | x_t, t) is the log-softmax of the logits of the expert whose range holds t, for the DDIM grid of a
    discrete model (its Levels carry integer timesteps)."""
    experts = _experts()
    _perturb(experts)
    x = torch.randn(3, 1, 28, 28)
    outputs = [torch.log_softmax(experts.logits_of(x, k).float(), 1) for k in range(5)]
    assert all(not torch.allclose(outputs[0], o) for o in outputs[1:])  # the experts differ
    for t in (999, 801, 600, 420, 250, 61, 0):
        level = Level(0.5, math.sqrt(0.75), t)
        torch.testing.assert_close(experts.log_prob(x, level), outputs[t // 200], rtol=0, atol=0)
        torch.testing.assert_close(experts.log_prob(x, t), outputs[t // 200], rtol=0, atol=0)


def test_continuous_level_maps_to_the_timestep_of_its_sigma():
    """A flow/EDM Level: the VP state of the same sigma, x / sqrt(alpha^2 + noise^2), at the fractional timestep of
    that sigma on the experts' schedule (as the noise-aware classifier routes it)."""
    experts = _experts()
    _perturb(experts)
    t = 650
    a = float(experts.schedule.alphas_cumprod[t])
    sigma = math.sqrt((1 - a) / a)
    level = Level(0.7 / math.sqrt(1 + sigma ** 2), 0.7 * sigma / math.sqrt(1 + sigma ** 2), 0.4)
    x = torch.randn(2, 1, 28, 28)
    expected = torch.log_softmax(experts.logits_of(x / level.norm, 3).float(), 1)
    torch.testing.assert_close(experts.log_prob(x, level), expected, rtol=1e-5, atol=1e-5)


def test_lora_experts_start_as_the_clean_classifier():
    """LoRA's B = 0 start (Hu et al. 2021, Sec. 4.1): every expert equals the off-the-shelf classifier before
    training, on the same (x + 1) / 2 input."""
    torch.manual_seed(0)
    backbone = evaluator_lib.Evaluator("test_resnet").eval()
    x = torch.rand(4, 1, 28, 28) * 2 - 1
    reference = backbone((x + 1) / 2)
    experts = ppap_lib.PPAPExperts(backbone, [0, 500, 1000], SCHEDULE, "lora")
    for k in range(2):
        torch.testing.assert_close(experts.logits_of(x, k), reference, rtol=0, atol=0)


def test_transfer_loss_by_hand():
    """KL(q || p) = sum_y q (log q - log p): q = (0.5, 0.5, 0), p = (0.25, 0.25, 0.5) gives 0.5 log 2 + 0.5 log 2
    = log 2 (the zero entry of q adds nothing); 0 when p = q."""
    q = torch.tensor([[0.5, 0.5, 0.0]])
    p = torch.tensor([[0.25, 0.25, 0.5]])
    assert transfer_loss(p.log(), q).item() == pytest.approx(math.log(2), rel=1e-6)
    assert transfer_loss(q.clamp_min(1e-30).log(), q).item() == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize("tuning", ["lora", "last"])
def test_training_moves_only_each_experts_own_parameters(tuning, tiny_unet_path, tmp_path):
    """Expert k's training changes its own parameters and nothing shared: the backbone's weights (and, with LoRA,
    its frozen base layers) are bit-identical afterwards; the file written loads to the same log-probabilities (its
    weights in fp16, as every checkpoint stores them)."""
    torch.manual_seed(0)
    backbone = evaluator_lib.Evaluator("test_resnet")
    clean_path = tmp_path / "clean.safetensors"
    evaluator_lib.save(backbone, clean_path)
    before = {k: v.clone() for k, v in evaluator_lib.load(clean_path).net.state_dict().items()}
    cfg = OmegaConf.create({
        "out": str(tmp_path / "ppap.safetensors"), "model_weights": str(tiny_unet_path),
        "classifier_weights": str(clean_path), "num_generated": 8, "gen_steps": 2, "gen_batch_size": 8,
        "temperature": 1.0, "num_experts": 2, "boundaries": None, "tuning": tuning, "lora_rank": 2, "last_blocks": 2,
        "softplus_beta": None, "steps": 3, "batch_size": 4, "lr": 1e-2, "warmup_steps": 0, "weight_decay": 0.0,
        "precision": "fp32", "seed": 0, "log_every": 10, "eval_timesteps": [0], "eval_images": 4})
    experts, stats = train_ppap(cfg, None, None, torch.device("cpu"), log=lambda *_: None)
    assert [e["timesteps"] for e in stats["experts"]] == [[0, 500], [500, 1000]]
    fresh = ppap_lib.PPAPExperts(evaluator_lib.load(clean_path), [0, 500, 1000], SCHEDULE, tuning, 2, 2)
    for k in range(2):
        moved = [not torch.equal(a, b) for a, b in zip(experts.expert_parameters(k), fresh.expert_parameters(k))]
        assert any(moved), f"expert {k} did not train"
    shared = {name.replace("base_model.model.", "").replace(".base_layer", ""): p
              for name, p in experts.net.state_dict().items() if "lora_" not in name}
    for name, value in before.items():
        if tuning == "last" and name.split(".")[0] in experts.tuned:
            continue  # the experts hold their own copies of these
        torch.testing.assert_close(shared[name], value, rtol=0, atol=0)
    loaded = ppap_lib.load(cfg.out)
    # the file stores floats in fp16 (diffguide/store/checkpoint.py): the same network with its weights so rounded
    experts.load_state_dict({k: v.half().float() if v.is_floating_point() else v
                             for k, v in experts.state_dict().items()})
    x = torch.randn(2, 1, 28, 28)
    for t in (10, 700):
        torch.testing.assert_close(loaded.log_prob(x, t), experts.log_prob(x, t), rtol=0, atol=0)


def test_classifier_guidance_takes_the_routed_experts_gradient(tiny_unet_path):
    """guidance=classifier with the experts: the score is s * grad_x log p_k(y | x_t) of the expert k of t (Dhariwal
    & Nichol's condition_score term, diffguide/guidance/classifier.py), computed here with autograd on expert k
    directly."""
    from diffguide.models import unet as unet_lib

    denoiser = unet_lib.load(str(tiny_unet_path))
    experts = _experts(k=2)
    _perturb(experts)
    guidance = ClassifierGuidance(experts, scale=2.0)
    guidance.check(denoiser)
    x = torch.randn(2, 1, 28, 28)
    labels = torch.tensor([1, 7])
    level = denoiser.level(750)
    with torch.enable_grad():
        x_in = x.clone().requires_grad_(True)
        selected = torch.log_softmax(experts.logits_of(x_in, 1).float(), 1).gather(1, labels.view(-1, 1)).sum()
        (grad,) = torch.autograd.grad(selected, x_in)
    pred = guidance(denoiser, x, level, labels)
    torch.testing.assert_close(pred.score, 2.0 * grad, rtol=0, atol=0)


def test_load_refuses_a_missing_file(tmp_path):
    from diffguide.errors import UserError

    with pytest.raises(UserError, match="no such file"):
        ppap_lib.load(str(tmp_path / "none.safetensors"))
