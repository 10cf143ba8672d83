"""ICG and TSG (Sadat et al. 2025, arXiv 2407.02687): guidance without a null class. ICG worked by hand with a known
random class, on the toy denoiser and the exact mixture, never asking for the null class; TSG's perturbed forward
against a forward whose time embedding output is replaced by hand (tiny UNet, tiny DiT), the network as it was
afterwards; their evaluations; refusals in one line."""

import copy

import pytest
import torch

from diffguide.errors import UserError
from diffguide.guidance.cfg import CFG
from diffguide.guidance.icg import ICG, random_classes
from diffguide.guidance.tsg import TSG
from diffguide.models import dit as dit_lib, gmm, hooks, unet as unet_lib
from diffguide.samplers.ddim import DDIM
from diffguide.samplers.ddpm import DDPM
from tests.helpers import SCHEDULE, ToyDenoiser


def constant_noise(z: torch.Tensor):
    """A noise source that returns z at every draw (and counts the draws)."""
    draws = []

    def noise():
        draws.append(1)
        return z.clone()

    noise.draws = draws
    return noise


def generators(seeds):
    return [torch.Generator().manual_seed(s) for s in seeds]


# --- ICG --------------------------------------------------------------------------------------------------------


def test_random_classes_are_uniform_quantiles_of_a_normal():
    """y_hat = floor(K Phi(z)): z = 0 is the median (class 1 of 3), far tails the first and last class."""
    assert random_classes(torch.tensor([0.0, -10.0, 10.0, -0.5, 0.5]), 3).tolist() == [1, 0, 2, 0, 2]
    z = torch.randn(30000, generator=torch.Generator().manual_seed(0))
    counts = torch.bincount(random_classes(z, 10), minlength=10).float() / 30000
    assert torch.allclose(counts, torch.full((10,), 0.1), atol=0.01)


def test_icg_step_by_hand_with_a_known_random_class(toy):
    """eps(x, t, y) = 0.5 x + 0.1 (y + 1) + t / 1000. x = 0.4, t = 300, y = (0, 2), y_hat = 1 (z = 0 in both
    samples): eps(y_hat) = 0.2 + 0.2 + 0.3 = 0.7, eps(y) = 0.6, 0.8; w = 3: 0.7 + 3 (-0.1) = 0.4 and 0.7 + 3 (0.1) = 1.0."""
    x, labels = torch.full((2, 1, 2, 2), 0.4), torch.tensor([0, 2])
    guidance = ICG(3.0)
    guidance.begin(toy, labels, [300], constant_noise(torch.zeros(2, 1, 2, 2)))
    assert guidance.independent_labels(labels, 3).tolist() == [1, 1]
    toy.calls.clear()
    pred = guidance(toy, x, 300, labels)
    assert torch.allclose(pred.eps[0], torch.full((1, 2, 2), 0.4)) and torch.allclose(pred.eps[1], torch.full((1, 2, 2), 1.0))
    a = float(toy.alphas_cumprod[300])
    assert torch.allclose(pred.x0, (x - (1 - a) ** 0.5 * pred.eps) / a ** 0.5)
    assert pred.nfe == 2 and toy.calls == [4], "y_hat and y go through one batched forward"


def test_icg_at_weight_one_is_the_conditional_model_and_draws_nothing(toy):
    x, labels = torch.randn(3, 1, 2, 2), torch.tensor([0, 1, 2])
    noise = constant_noise(torch.zeros(3, 1, 2, 2))
    guidance = ICG(3.0, schedule="linear")
    guidance.begin(toy, labels, [700, 300], noise)
    pred = guidance(toy, x, 700, labels)  # p = 0: w_t = 1
    assert torch.allclose(pred.eps, toy(x, 700, labels)) and pred.nfe == 1 and not noise.draws


class NoNullToy(ToyDenoiser):
    """The toy denoiser of a model trained without label dropout: no null class; it records every label it sees."""

    def __init__(self):
        super().__init__()
        self.null_class = None
        self.seen = []

    def _output(self, x, t, labels):
        self.seen.append(labels.clone())
        y = labels.to(x.dtype).view(-1, 1, 1, 1)
        return 0.5 * x + 0.1 * (y + 1) + t.to(x.dtype).view(-1, 1, 1, 1) / 1000


def test_icg_guides_a_model_without_a_null_class_and_never_asks_for_one():
    model = NoNullToy()
    labels = torch.tensor([0, 1, 2, 2])
    with pytest.raises(UserError, match="needs a model with a null class"):
        CFG(2.0).check(model)
    guidance = ICG(2.0)
    guidance.check(model)
    x0, nfe = DDIM(8, clip_x0=False).sample(model, guidance, torch.randn(4, 1, 2, 2), labels, generators(range(4)))
    assert torch.isfinite(x0).all() and nfe == 16
    seen = torch.cat(model.seen)
    assert ((seen >= 0) & (seen < 3)).all(), "only real classes, never a null label"
    assert len(set(seen.tolist())) == 3


def test_icg_samples_do_not_depend_on_the_batch():
    """y_hat comes from each sample's own noise source: sample 5 alone equals sample 5 in a batch (DDPM, so the
    sampler draws from the same sources as well)."""
    model = gmm.image(num_classes=3)
    sampler = DDPM(6, clip_x0=False)
    x_T = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    labels = torch.tensor([0, 1, 2])
    batch, _ = sampler.sample(model, ICG(3.0), x_T, labels, generators([4, 5, 6]))
    alone, _ = sampler.sample(model, ICG(3.0), x_T[1:2], labels[1:2], generators([5]))
    assert torch.allclose(batch[1:2], alone, atol=1e-6)


def test_icg_on_the_exact_mixture_is_another_classes_prediction():
    """On model=gmm, D(y_hat) is the exact class-y_hat denoiser: D = D_yhat + w (D_y - D_yhat)."""
    model = gmm.image(num_classes=3)
    x, labels, t = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(1)), torch.tensor([0, 1, 2, 0]), 400
    z = torch.tensor([-3.0, 0.0, 3.0, 0.0]).view(4, 1, 1, 1).expand(4, 1, 8, 8)
    guidance = ICG(2.5)
    guidance.check(model)
    guidance.begin(model, labels, [t], constant_noise(z))
    pred = guidance(model, x, t, labels)
    y_hat = torch.tensor([0, 1, 2, 1])
    level = model.level(t)
    d_hat, d_y = model.exact(x, level, y_hat), model.exact(x, level, labels)
    assert torch.allclose(pred.eps.double(), d_hat.eps + 2.5 * (d_y.eps - d_hat.eps), atol=1e-5)


def test_icg_refuses_a_model_without_classes_in_one_line(toy):
    unconditional = ToyDenoiser()
    unconditional.conditional = False  # as PretrainedUNet without class embeddings
    for model in (ToyDenoiser(num_classes=1), unconditional):
        with pytest.raises(UserError, match="guidance=icg guides a class-conditional model") as caught:
            ICG(2.0).check(model)
        assert "\n" not in str(caught.value)
    with pytest.raises(RuntimeError, match="begin.. needs the sampler's per-sample noise"):
        ICG(2.0)(toy, torch.zeros(1, 1, 2, 2), 300, torch.tensor([0]))


# --- TSG --------------------------------------------------------------------------------------------------------


def tiny_unet() -> unet_lib.UNetDenoiser:
    torch.manual_seed(0)
    config = dict(sample_size=8, in_channels=1, out_channels=1, block_out_channels=[8, 16], layers_per_block=1,
                  down_block_types=["DownBlock2D", "DownBlock2D"], up_block_types=["UpBlock2D", "UpBlock2D"],
                  norm_num_groups=4)
    return unet_lib.build(config, 10, SCHEDULE).eval()


def tiny_pixel_dit() -> dit_lib.PixelDiT:
    torch.manual_seed(0)
    model = dit_lib.build(dict(sample_size=8, in_channels=1, out_channels=1, patch_size=2, num_layers=2,
                               num_attention_heads=2, attention_head_dim=8, norm_type="ada_norm_zero"), 10, SCHEDULE)
    for p in model.parameters():  # DiT's initialisation zeroes the adaLN and output layers: give them weights
        if p.abs().sum() == 0:
            p.data.normal_(0, 0.3)
    return model.eval()


def hooks_left(model) -> bool:
    return any("_diffusers_hook" in vars(m) or "forward" in vars(m) for m in model.modules())


def add_to_output(module, delta):
    """Make `module` (of a copy) return its own output plus delta: the perturbation written by hand."""
    original = module.forward
    module.forward = lambda *args, **kwargs: original(*args, **kwargs) + delta


def test_unet_declares_its_time_embedding_and_dit_its_timestep_embedders():
    model = tiny_unet()
    assert model.time_embeddings() == [model.unet.time_embedding]
    dit = tiny_pixel_dit()
    embedders = dit.time_embeddings()
    assert embedders == [block.norm1.emb.timestep_embedder for block in dit.transformer.transformer_blocks]
    assert not any(block.norm1.emb.class_embedder is m for block in dit.transformer.transformer_blocks
                   for m in embedders)
    assert ToyDenoiser().time_embeddings() == [] and gmm.image().time_embeddings() == []


@pytest.mark.parametrize("alpha, t, factor", [(0.0, 500, 0.7), (1.0, 500, 0.7 * 0.5), (2.0, 250, 0.7 * 0.0625)])
def test_tsg_perturbed_forward_on_a_unet_equals_the_time_embedding_replaced_by_hand(alpha, t, factor):
    """At w = 0, TSG's prediction is the perturbed forward alone: the UNet whose time_embedding output gets
    s t^alpha n added (t = timestep / 1000, n = the first 32 entries of the sample's noise draw), class embedding
    untouched. The network is as it was afterwards."""
    model = tiny_unet()
    x = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    labels = torch.tensor([3, 7])
    z = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        before = model.predict(x, t, labels).eps
        guidance = TSG(0.0, noise_scale=0.7, alpha=alpha)
        guidance.check(model)
        guidance.begin(model, labels, [t], constant_noise(z))
        pred = guidance(model, x, t, labels)
        by_hand = copy.deepcopy(model)
        add_to_output(by_hand.unet.time_embedding, factor * z.flatten(1)[:, :32])
        expected = by_hand.predict(x, t, labels).eps
        assert torch.allclose(pred.eps, expected, atol=1e-5)
        assert not torch.allclose(pred.eps, before, atol=1e-3)
        assert pred.nfe == 2
        assert not hooks_left(model) and torch.equal(model.predict(x, t, labels).eps, before)


def test_tsg_combines_the_two_forwards_as_cfg_does():
    """w = 2.5: D = D_pert + 2.5 (D - D_pert), the unperturbed half exactly the plain forward."""
    model = tiny_unet()
    x, labels, t = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(3)), torch.tensor([0, 4, 9]), 300
    z = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        plain = model.predict(x, t, labels).eps
        perturbed = TSG(0.0)
        perturbed.begin(model, labels, [t], constant_noise(z))
        d_pert = perturbed(model, x, t, labels).eps
        guidance = TSG(2.5)
        guidance.begin(model, labels, [t], constant_noise(z))
        pred = guidance(model, x, t, labels)
    assert torch.allclose(pred.eps, d_pert + 2.5 * (plain - d_pert), atol=1e-5)
    assert torch.allclose(TSG(1.0)(model, x, t, labels).eps, plain, atol=1e-6)  # w = 1: no draw, one evaluation


def test_tsg_on_a_dit_perturbs_every_blocks_timestep_embedder_alike():
    """diffusers' DiT: each block's norm1.emb.timestep_embedder output gets the same s n (block 0's also for the
    final layer, which calls it again); the label embedders are untouched."""
    model = tiny_pixel_dit()
    x, labels, t = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(5)), torch.tensor([1, 8]), 600
    z = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(6))
    width = model.transformer.transformer_blocks[0].norm1.emb.timestep_embedder.linear_2.out_features
    draws = z.flatten(1)
    while draws.shape[1] < width:
        draws = torch.cat([draws, z.flatten(1)], 1)
    with torch.no_grad():
        before = model.predict(x, t, labels).eps
        guidance = TSG(0.0, noise_scale=0.5)
        guidance.check(model)
        guidance.begin(model, labels, [t], constant_noise(z))
        pred = guidance(model, x, t, labels)
        by_hand = copy.deepcopy(model)
        for block in by_hand.transformer.transformer_blocks:
            add_to_output(block.norm1.emb.timestep_embedder, 0.5 * draws[:, :width])
        assert torch.allclose(pred.eps, by_hand.predict(x, t, labels).eps, atol=1e-5)
        assert not torch.allclose(pred.eps, before, atol=1e-3)
        assert not hooks_left(model) and torch.equal(model.predict(x, t, labels).eps, before)


def test_tsg_spends_two_evaluations_per_step_and_guides_an_unconditional_network():
    """DDIM over 5 steps: 10 evaluations; a UNet without class embeddings (ddpm_cifar10's kind) is guided, ICG
    refuses it."""
    from diffusers import UNet2DModel

    torch.manual_seed(0)
    unet = UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=[8, 16], layers_per_block=1,
                       down_block_types=["DownBlock2D", "DownBlock2D"], up_block_types=["UpBlock2D", "UpBlock2D"],
                       norm_num_groups=4)
    model = unet_lib.PretrainedUNet(unet, SCHEDULE, num_classes=10).eval()
    assert model.time_embeddings() == [unet.time_embedding]
    with pytest.raises(UserError, match="takes no class labels"):
        ICG(2.0).check(model)
    guidance = TSG(2.0)
    guidance.check(model)
    labels = torch.tensor([0, 1])
    x0, nfe = DDIM(5).sample(model, guidance, torch.randn(2, 1, 8, 8), labels, generators([0, 1]))
    assert nfe == 10 and torch.isfinite(x0).all() and not hooks_left(model)
    x0_cond, nfe_cond = DDIM(5).sample(model, TSG(1.0), torch.randn(2, 1, 8, 8), labels, generators([0, 1]))
    assert nfe_cond == 5


def test_tsg_refusals_are_one_line():
    for model, match in ((gmm.image(), "no closed-form meaning"), (ToyDenoiser(), "declares none")):
        with pytest.raises(UserError, match=match) as caught:
            TSG(2.0).check(model)
        assert "\n" not in str(caught.value)
    for bad in ({"noise_scale": -1.0}, {"alpha": float("nan")}, {"noise_scale": True}):
        with pytest.raises(UserError, match="must be a finite number >= 0"):
            TSG(2.0, **bad)
    with pytest.raises(UserError, match="schedule kind 'bogus'"):
        TSG(2.0, schedule="bogus")


def test_outputs_perturbed_leaves_no_trace_and_refuses_no_modules():
    model = tiny_unet()
    x, labels = torch.randn(1, 1, 8, 8), torch.tensor([2])
    with torch.no_grad():
        before = model.predict(x, 100, labels).eps
        try:
            with hooks.outputs_perturbed([model.unet.time_embedding] * 2, lambda out: out * 2.0):
                assert not torch.allclose(model.predict(x, 100, labels).eps, before, atol=1e-3)
                raise KeyError
        except KeyError:
            pass
        assert not hooks_left(model) and torch.equal(model.predict(x, 100, labels).eps, before)
    with pytest.raises(UserError, match="declares none") as caught:
        hooks.outputs_perturbed([], lambda out: out, name="ToyDenoiser", what="guidance=tsg")
    assert "\n" not in str(caught.value)
