"""PAG, SEG and SLG (diffguide/guidance/pag.py, seg.py, slg.py; shared code in perturbation.PerturbationGuidance): each rule
against a step worked by hand on a tiny random pixel DiT (the perturbed forward written without the hooks), against
diffusers' guiders fed the same three predictions, the network left as it was, the evaluations counted, the window
of steps, and the refusals."""

import copy
import math

import pytest
import torch
from diffusers import AutoencoderKL, DDPMScheduler, DiTTransformer2DModel
from diffusers.guiders import PerturbedAttentionGuidance, SkipLayerGuidance, SmoothedEnergyGuidance
from torch import nn
from torchvision.transforms.v2.functional import gaussian_blur

from diffguide.models import hooks
from diffguide.errors import UserError
from diffguide.guidance import perturbation
from diffguide.guidance.pag import PAG
from diffguide.guidance.seg import SEG
from diffguide.guidance.slg import SLG
from diffguide.models import dit, gmm, unet as unet_lib
from diffguide.models.hooks import Perturbation
from diffguide.samplers.ddim import DDIM
from tests.helpers import SCHEDULE, ToyDenoiser

#: a 3-block pixel DiT on 1x8x8 images in 2x2 patches: a 4x4 token grid
TINY_DIT = dict(sample_size=8, in_channels=1, out_channels=1, patch_size=2, num_layers=3, num_attention_heads=2,
                attention_head_dim=8, norm_type="ada_norm_zero")
X = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(1))
LABELS, T = torch.tensor([1, 2]), 400


def randomise(net: nn.Module) -> nn.Module:
    """DiT's initialisation zeroes the adaLN gates and the output layer (the network is the zero map): give every
    all-zero tensor random weights, as tests/models/test_hooks.py's tiny_dit does."""
    for p in net.parameters():
        if p.abs().sum() == 0:
            p.data.normal_(0, 0.3)
    return net


@pytest.fixture(scope="module")
def model() -> dit.PixelDiT:
    torch.manual_seed(0)
    m = dit.build(TINY_DIT, 3, SCHEDULE)
    randomise(m.transformer)
    return m.eval().requires_grad_(False)


def attention(attn, hidden, query):
    """Multi-head softmax attention of `query` over the keys and values of `hidden`, then the output projection."""
    batch, heads = hidden.shape[0], attn.heads

    def split(t):
        return t.view(batch, -1, heads, t.shape[-1] // heads).transpose(1, 2)

    q, k, v = split(query), split(attn.to_k(hidden)), split(attn.to_v(hidden))
    weights = torch.softmax(q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5, dim=-1)
    return attn.to_out[1](attn.to_out[0]((weights @ v).transpose(1, 2).reshape(batch, -1, heads * v.shape[-1])))


def identity_attention(attn):
    """PAG's perturbed self-attention by hand: the map is the identity, so the output is to_out(to_v(h))."""
    return lambda hidden_states, *args, **kwargs: attn.to_out[1](attn.to_out[0](attn.to_v(hidden_states)))


def blurred_attention(attn, sigma):
    """SEG's perturbed self-attention by hand: the queries blurred over the 4x4 grid (inf: all the mean query)."""
    def forward(hidden_states, *args, **kwargs):
        q = attn.to_q(hidden_states)
        if math.isinf(sigma):
            q = q.mean(dim=1, keepdim=True).expand_as(q)
        else:
            grid = q.transpose(1, 2).reshape(q.shape[0], -1, 4, 4)
            q = gaussian_blur(grid, kernel_size=[3, 3], sigma=[sigma, sigma])
            q = q.reshape(q.shape[0], -1, 16).transpose(1, 2)
        return attention(attn, hidden_states, q)
    return forward


def skipped_block(block):
    """SLG's perturbed block by hand: it returns its input (it stays in place: DiT's final layer reads block 0's
    conditioning embedder)."""
    return lambda hidden_states, *args, **kwargs: hidden_states


def by_hand(model, k, make):
    """eps of a copy of `model` whose block k (make(block)) or its attn1 (make(attn1)) is replaced by hand."""
    other = copy.deepcopy(model)
    block = other.transformer.transformer_blocks[k]
    if make is skipped_block:
        block.forward = make(block)
    else:
        block.attn1.forward = make(block.attn1)
    with torch.no_grad():
        return other.predict(X, T, LABELS).eps


def eps(model, labels=LABELS):
    with torch.no_grad():
        return model.predict(X, T, labels).eps


METHODS = [  # (method, hand-made perturbed forward)
    (lambda s, **kw: PAG(s, **kw), identity_attention),
    (lambda s, **kw: SEG(s, **kw), lambda attn: blurred_attention(attn, math.inf)),
    (lambda s, **kw: SEG(s, blur_sigma=0.5, **kw), lambda attn: blurred_attention(attn, 0.5)),
    (lambda s, **kw: SLG(s, start=0.0, stop=1.0, **kw), skipped_block),
]
IDS = ["pag", "seg-inf", "seg-0.5", "slg"]


@pytest.mark.parametrize("method, make", METHODS, ids=IDS)
@pytest.mark.parametrize("k", [0, 2])
def test_each_rule_equals_a_step_worked_by_hand(model, method, make, k):
    """PAG (arXiv 2403.17377, Eq. 10): eps = eps_c + s (eps_c - eps_pert), the perturbed map the identity; SEG (arXiv
    2408.00760): the same with the queries Gaussian-blurred (sigma = inf: the mean query); SLG: with block k skipped.
    With CFG, eps_u + w (eps_c - eps_u) + s (eps_c - eps_pert) (diffusers 0.42.1 pipelines/pag/pag_utils.py lines
    119-127, `_apply_perturbed_attention_guidance`). eps_pert computed here with no hook at all."""
    s, w = 2.5, 3.0
    eps_c, eps_u, eps_p = eps(model), eps(model, model.null_labels(LABELS)), by_hand(model, k, make)
    assert not torch.allclose(eps_p, eps_c, atol=1e-3)  # the perturbation changes the prediction
    pred = method(s, blocks=[k])(model, X, T, LABELS)
    torch.testing.assert_close(pred.eps, eps_c + s * (eps_c - eps_p), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(pred.x0, model.x0_from_eps(X, T, pred.eps), atol=1e-5, rtol=1e-5)
    with_cfg = method(s, blocks=[k], cfg_scale=w)(model, X, T, LABELS)
    torch.testing.assert_close(with_cfg.eps, eps_u + w * (eps_c - eps_u) + s * (eps_c - eps_p), atol=1e-5, rtol=1e-5)
    zero = method(0.0, blocks=[k])(model, X, T, LABELS)  # s = 0: the conditional model
    assert torch.equal(zero.eps, eps_c) and zero.nfe == 1


def test_the_scale_is_read_through_weight(model):
    """The PAG scale at a step is `weight(denoiser, t)` (the weight schedule's hook in base.py), not `scale`."""
    pag = PAG(2.0, blocks=[1])
    pag.weight = lambda denoiser, t: 0.5
    eps_c, eps_p = eps(model), by_hand(model, 1, identity_attention)
    torch.testing.assert_close(pag(model, X, T, LABELS).eps, eps_c + 0.5 * (eps_c - eps_p), atol=1e-5, rtol=1e-5)


GUIDERS = [  # (our method, diffusers' guider, its perturbed scale keyword and layers keyword, hand forward)
    (PAG, PerturbedAttentionGuidance, "perturbed_guidance_scale", "perturbed_guidance_layers", identity_attention),
    (SEG, SmoothedEnergyGuidance, "seg_guidance_scale", "seg_guidance_layers",
     lambda attn: blurred_attention(attn, math.inf)),
    (SLG, SkipLayerGuidance, "skip_layer_guidance_scale", "skip_layer_guidance_layers", skipped_block),
]


@pytest.mark.parametrize("ours, guider_class, scale_key, layers_key, make", GUIDERS, ids=["pag", "seg", "slg"])
def test_equals_diffusers_guider(model, ours, guider_class, scale_key, layers_key, make):
    """diffusers 0.42.1 guiders' `forward` (perturbed_attention_guidance.py lines 221-235, smoothed_energy_guidance.py
    lines 205-219, skip_layer_guidance.py lines 216-230), fed our pred_cond, pred_uncond and perturbed prediction at
    a step inside their window (step 5 of 10, start 0, stop 1). The mapping:
      with CFG:    guidance_scale = our cfg_scale w, <perturbed scale> = our s, use_original_formulation=False
                   -> pred_uncond + w (pred_cond - pred_uncond) + s (pred_cond - pred_perturbed);
      without CFG: use_original_formulation=True, guidance_scale=0 (CFG off), <perturbed scale> = s
                   -> pred_cond + s (pred_cond - pred_perturbed);
                   the default formulation with CFG off (guidance_scale=1) gives pred_perturbed + s' (pred_cond -
                   pred_perturbed), the official PAG code's form (sunovivid/Perturbed-Attention-Guidance
                   issue #9): s' = s + 1."""
    s, w, k = 2.0, 4.0, 1
    eps_c, eps_u, eps_p = eps(model), eps(model, model.null_labels(LABELS)), by_hand(model, k, make)
    window = {scale_key.replace("scale", "start"): 0.0, scale_key.replace("scale", "stop"): 1.0}

    def theirs(**kwargs):
        guider = guider_class(**{layers_key: [k]}, **window, **kwargs)
        guider.set_state(step=5, num_inference_steps=10, timestep=torch.tensor(T))
        return guider.forward(eps_c, eps_u, eps_p).pred

    kw = dict(blocks=[k], start=0.0, stop=1.0)
    with_cfg = theirs(guidance_scale=w, **{scale_key: s}, use_original_formulation=False)
    torch.testing.assert_close(ours(s, cfg_scale=w, **kw)(model, X, T, LABELS).eps, with_cfg, atol=1e-5, rtol=1e-5)
    alone = ours(s, **kw)(model, X, T, LABELS).eps
    torch.testing.assert_close(alone, theirs(guidance_scale=0.0, **{scale_key: s}, use_original_formulation=True),
                               atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(alone, theirs(guidance_scale=1.0, **{scale_key: s + 1}), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("start, stop", [(0.01, 0.2), (0.1, 0.5), (0.3, 1.0), (0.0, 0.3)])
def test_window_is_diffusers_skip_layer_guidance_window(start, stop):
    """The perturbed term's steps: diffusers 0.42.1 skip_layer_guidance.py lines 268-280 (`_is_slg_enabled`:
    int(start N) < step < int(stop N)) for every step of 10, 25 and 28-step trajectories; the one difference is
    start = 0, which here includes step 0 (diffusers, and SD3's pipeline `i > num_inference_steps *
    skip_layer_guidance_start`, never guide step 0)."""
    toy = ToyDenoiser()
    for n in (10, 25, 28):
        levels = torch.linspace(999, 0, n).round().long().tolist()
        slg = SLG(2.8, start=start, stop=stop)
        slg.begin(toy, torch.tensor([0]), levels)
        guider = SkipLayerGuidance(skip_layer_guidance_layers=[0], skip_layer_guidance_start=start,
                                   skip_layer_guidance_stop=stop)
        for i, t in enumerate(levels):
            guider.set_state(step=i, num_inference_steps=n, timestep=torch.tensor(t))
            expected = guider._is_slg_enabled() or (start == 0.0 and i == 0 and int(stop * n) > 0)
            assert slg.active(toy, t) == expected, (n, i)
    assert SLG(2.8).start == 0.01 and SLG(2.8).stop == 0.2  # SD3.5 Medium's, diffusers' defaults


def test_sampler_spends_the_perturbed_forward_only_inside_the_window(model):
    """NFE through a DDIM run of 10 steps: 1 per step outside SLG's window, 2 inside (steps 1 and 2 of 10 with
    start 0.1, stop 0.3: int(1) < i < int(3)); with CFG 2 and 3."""
    sampler = DDIM(10, clip_x0=False)
    x_T = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(3))
    _, nfe = sampler.sample(model, SLG(2.0, blocks=[1], start=0.1, stop=0.3), x_T, LABELS)
    assert nfe == 10 + 1
    _, nfe = sampler.sample(model, SLG(2.0, blocks=[1], start=0.1, stop=0.3, cfg_scale=2.0), x_T, LABELS)
    assert nfe == 2 * 10 + 1
    _, nfe = sampler.sample(model, PAG(2.0), x_T, LABELS)
    assert nfe == 2 * 10


def module_state(net: nn.Module):
    """What a perturbation could leave behind: each module's attributes (a hook registry, an instance forward), its
    processor, and its parameters and buffers (the very tensors)."""
    return ({name: (sorted(vars(m)), getattr(m, "processor", None)) for name, m in net.named_modules()},
            dict(net.state_dict(keep_vars=True)))


@pytest.mark.parametrize("method", [PAG(3.0, blocks=[0, 2]), SEG(3.0, blur_sigma=0.5), SLG(2.8, start=0.0, stop=1.0),
                                    PAG(3.0, cfg_scale=2.0)], ids=["pag", "seg", "slg", "pag-cfg"])
def test_the_network_is_unchanged_after_a_guided_prediction_and_after_an_exception(model, method):
    """The perturbation leaves no trace (diffguide/models/hooks.py): the plain output is bit-identical after a guided
    prediction, and after one that raised inside the perturbed forward; no hook registry or forward left behind."""
    net = model.transformer
    before, state = eps(model), module_state(net)
    values = {name: t.detach().clone() for name, t in state[1].items()}
    with torch.no_grad():
        method(model, X, T, LABELS)

    class Raised(Exception):
        pass

    def fail(module, args, output):
        if any("_diffusers_hook" in vars(m) for m in net.modules()):
            raise Raised  # only inside the perturbed forward, while its hooks are installed

    handle = net.transformer_blocks[-1].register_forward_hook(fail)
    try:
        with pytest.raises(Raised), torch.no_grad():
            method(model, X, T, LABELS)
    finally:
        handle.remove()
    after = module_state(net)
    assert after[0] == state[0]
    assert all(after[1][name] is t and torch.equal(t, values[name]) for name, t in state[1].items())
    assert not any("_diffusers_hook" in vars(m) or "forward" in vars(m) for m in net.modules())
    assert torch.equal(eps(model), before)


@pytest.mark.parametrize("cfg_scale, nfe, calls", [(None, 2, [2, 2]), (1.0, 2, [2, 2]), (2.0, 3, [2, 4])])
def test_nfe_counts_every_forward(model, cfg_scale, nfe, calls):
    """2 forwards per sample without CFG (conditional and perturbed), 3 with (the CFG pair in one batched forward):
    the network's calls (their batch sizes) and GuidedPrediction.nfe agree. cfg_scale 1 is no CFG term."""
    seen = []
    handle = model.transformer.register_forward_pre_hook(lambda module, args: seen.append(args[0].shape[0]))
    try:
        pred = PAG(3.0, cfg_scale=cfg_scale)(model, X, T, LABELS)
    finally:
        handle.remove()
    assert pred.nfe == nfe and seen == calls


def test_the_perturbed_forward_runs_before_the_plain_conditional_one():
    """A sampler with learned variance (sampler.variance=learned) takes it from the last conditional forward
    (Denoiser.captured_variance): that must be the unperturbed network's, so the perturbed forward runs first."""
    torch.manual_seed(0)
    net = randomise(DiTTransformer2DModel(num_layers=2, attention_head_dim=8, num_attention_heads=2, in_channels=4,
                                          out_channels=8, sample_size=8, patch_size=2, num_embeds_ada_norm=10,
                                          norm_type="ada_norm_zero", norm_elementwise_affine=False)).eval()
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 2,
                        up_block_types=["UpDecoderBlock2D"] * 2, block_out_channels=[8, 16], latent_channels=4,
                        norm_num_groups=4, sample_size=16)
    latent = dit.LatentDiT(net, vae, DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear").config).eval()
    x, labels = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(4)), torch.tensor([1, 3])
    assert latent.learned_variance
    with torch.no_grad():
        latent.capture_variance(True)
        latent.predict(x, T, labels)
        plain = latent.captured_variance(labels, 2)
        for method in (PAG(3.0, blocks=[0]), SLG(2.8, blocks=[0], start=0.0, stop=1.0)):
            latent.capture_variance(True)
            method(latent, x, T, labels)
            assert torch.equal(latent.captured_variance(labels, 2), plain)
    latent.capture_variance(False)


def test_on_the_network_output_of_a_v_model_and_the_unet_default_block():
    """On a v-prediction UNet (down, mid and up attention layers): the default block is the mid block's attention
    (index 1 of 4; PAG's "mid" on Stable Diffusion, diffusers pipeline_pag_sd.py pag_applied_layers="mid"); the rule
    holds on the network's own v, and, its weights summing to 1, on eps and x0 alike."""
    torch.manual_seed(0)
    config = dict(sample_size=8, in_channels=1, out_channels=1, block_out_channels=[8, 16], layers_per_block=1,
                  down_block_types=["AttnDownBlock2D", "DownBlock2D"], up_block_types=["UpBlock2D", "AttnUpBlock2D"],
                  norm_num_groups=4, attention_head_dim=4)
    model = unet_lib.build(config, 10, SCHEDULE, parameterisation="v").eval()
    assert perturbation.default_blocks(model) == (1,) and model.parts().blocks[1] is model.unet.mid_block.attentions[0]
    s = 2.0
    with torch.no_grad():
        cond = model.predict(X, T, LABELS)
        with hooks.network_perturbed(model, Perturbation("skip_block", (1,))):
            pert = model.predict(X, T, LABELS)
        pred = SLG(s, start=0.0, stop=1.0)(model, X, T, LABELS)
    v = lambda p: model.output(p, X, T)  # noqa: E731
    torch.testing.assert_close(v(pred), v(cond) + s * (v(cond) - v(pert)), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(pred.eps, cond.eps + s * (cond.eps - pert.eps), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(pred.x0, cond.x0 + s * (cond.x0 - pert.x0), atol=1e-4, rtol=1e-4)


def test_default_block_of_a_dit_is_its_middle(model):
    """len(blocks) // 2: 1 of the tiny DiT's 3, 3 of fmnist_dit's 6, 14 of DiT-XL/2's 28 (diffusers' PAG examples for
    28-block transformers: pipeline_pag_hunyuandit.py pag_applied_layers=[14])."""
    assert perturbation.default_blocks(model) == (1,)
    six = dit.build({**TINY_DIT, "num_layers": 6}, 3, SCHEDULE)
    assert perturbation.default_blocks(six) == (3,)
    pert = by_hand(model, 1, identity_attention)
    eps_c = eps(model)
    torch.testing.assert_close(PAG(1.0)(model, X, T, LABELS).eps, 2 * eps_c - pert, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("method", [PAG(3.0), SEG(3.0), SLG(2.8)], ids=["pag", "seg", "slg"])
def test_refusals_are_one_line_before_sampling(model, method):
    """model=gmm (the exact Gaussian mixture: no network, so no closed-form meaning), a model without blocks, and a
    block index out of range: each a one-line UserError from `check`, before any forward."""
    with pytest.raises(UserError) as err:
        method.check(gmm.image())
    assert "\n" not in str(err.value) and "model=gmm" in str(err.value) and "no network" in str(err.value)
    with pytest.raises(UserError, match="ToyDenoiser declares no network blocks"):
        method.check(ToyDenoiser())
    bad = type(method)(method.scale, blocks=[0, 3])
    seen = []
    handle = model.transformer.register_forward_pre_hook(lambda module, args: seen.append(1))
    try:
        with pytest.raises(UserError, match=r"^guidance.blocks=\[0, 3\]: block 3 is out of range; model PixelDiT has 3 "
                                            r"blocks \(0\.\.2\)$"):
            bad.check(model)
        method.check(model)  # the default block is in range
    finally:
        handle.remove()
    assert not seen


def test_bad_settings_are_refused_at_construction():
    for kwargs, message in [(dict(blocks=[-1]), "guidance.blocks"), (dict(blocks="mid"), "guidance.blocks"),
                            (dict(blocks=[]), "guidance.blocks"), (dict(cfg_scale=math.nan), "guidance.cfg_scale"),
                            (dict(start=0.5, stop=0.2), "start <= stop"), (dict(stop=1.5), "guidance.stop")]:
        with pytest.raises(UserError, match=message):
            PAG(3.0, **kwargs)
    with pytest.raises(UserError, match="scale must be >= 0"):
        SLG(-1.0)
    with pytest.raises(UserError, match="blur_sigma must be > 0"):
        SEG(3.0, blur_sigma=0.0)
    assert SEG(3.0, blur_sigma=1e7).blur_sigma == math.inf and SEG(3.0, blur_sigma=100.0).blur_sigma == 100.0


def test_defaults_and_their_sources():
    """PAG s = 3 (diffusers' PAG pipelines' pag_scale), SEG s = 3 with infinite blur (SEG-SDXL's README; diffusers'
    seg_blur_sigma 9999999), SLG s = 2.8 on steps 0.01-0.2 (SD3.5 Medium; diffusers' SkipLayerGuidance); middle block;
    no CFG term."""
    from diffguide.command.checks import compose_point
    from hydra.utils import instantiate

    made = {name: instantiate(compose_point([f"guidance={name}", "out_dir=/tmp/unused"]).guidance)
            for name in ("pag", "seg", "slg")}
    assert (made["pag"].scale, made["seg"].scale, made["slg"].scale) == (3.0, 3.0, 2.8)
    assert made["seg"].blur_sigma == math.inf
    assert (made["slg"].start, made["slg"].stop) == (0.01, 0.2) and (made["pag"].start, made["pag"].stop) == (0.0, 1.0)
    assert all(m.blocks is None and m.cfg_scale is None and m.schedule is None for m in made.values())
