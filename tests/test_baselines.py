"""Attribution baselines: pixel cosine, projected per-sample LoRA gradients (vs a naive loop), TRAK, TracIn, DataInf."""

import numpy as np
import pytest
import torch

from montrage.baselines import (
    GaussianProjection,
    datainf_scores,
    lora_gradient_features,
    pixel_cosine,
    tracin_scores,
    trainable_parameters,
    trak_scores,
)
from montrage.baselines.gradients import PROJ_CHUNK_ROWS
from montrage.encode import fixed_noise, image_latents

TIMESTEPS = [100, 600]


@pytest.fixture(scope="module")
def lora_parts(tiny_model_dir):
    import peft

    from montrage.components import embed_prompts, load_components

    parts = load_components(tiny_model_dir)
    parts.unet.requires_grad_(False)
    parts.unet.add_adapter(
        peft.LoraConfig(r=2, lora_alpha=2, init_lora_weights=False, target_modules=["to_q", "to_k", "to_v", "to_out.0"])
    )
    cond = embed_prompts(parts.tokenizer, parts.text_encoder, [""])
    pixels = torch.rand(3, 3, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
    return parts, cond, pixels


def _dense_projection(proj: GaussianProjection) -> torch.Tensor:
    n_chunks = -(-proj.dim // PROJ_CHUNK_ROWS)
    return torch.cat([proj.chunk(c, torch.device("cpu")) for c in range(n_chunks)])


def _naive_features(unet, vae, scheduler, pixels, cond, seeds, output, proj_dim, proj_seed):
    """One image and one timestep per forward pass, loss.backward(), gradients read from .grad."""
    params = trainable_parameters(unet)
    proj = _dense_projection(GaussianProjection(sum(p.numel() for p in params.values()), proj_dim, proj_seed))
    latents = image_latents(vae, pixels)
    v_pred = scheduler.config.prediction_type == "v_prediction"
    rows = []
    unet.eval()
    for z, seed in zip(latents, seeds):
        eps_all = fixed_noise(seed, len(TIMESTEPS), tuple(z.shape))
        for p in params.values():
            p.grad = None
        for j, t in enumerate(TIMESTEPS):
            tt = torch.tensor([t])
            noisy = scheduler.add_noise(z[None], eps_all[j][None], tt)
            pred = unet(noisy, tt, encoder_hidden_states=cond).sample
            target = scheduler.get_velocity(z[None], eps_all[j][None], tt) if v_pred else eps_all[j][None]
            value = ((pred - target) ** 2).mean() if output == "loss" else (pred**2).mean()
            (value / len(TIMESTEPS)).backward()
        rows.append(torch.cat([p.grad.reshape(-1) for p in params.values()]))
    for p in params.values():
        p.grad = None
    return (torch.stack(rows) @ proj).numpy()


@pytest.mark.parametrize("output,prediction", [("loss", "epsilon"), ("sq_norm", "epsilon"), ("loss", "v_prediction")])
def test_gradient_features_match_naive_loop(lora_parts, output, prediction):
    from diffusers import DDPMScheduler

    parts, cond, pixels = lora_parts
    scheduler = DDPMScheduler.from_config(parts.scheduler.config, prediction_type=prediction)
    seeds = [3, 4, 5]
    fast = lora_gradient_features(
        parts.unet,
        parts.vae,
        scheduler,
        pixels,
        cond,
        TIMESTEPS,
        seeds,
        output=output,
        proj_dim=64,
        proj_seed=7,
        batch_size=2,
    )
    slow = _naive_features(parts.unet, parts.vae, scheduler, pixels, cond, seeds, output, 64, 7)
    assert fast.shape == (3, 64) and fast.dtype == np.float32
    assert np.abs(fast).max() > 0
    np.testing.assert_allclose(fast, slow, rtol=1e-4, atol=1e-5 * np.abs(slow).max())
    # an image's feature does not depend on its batch neighbours
    alone = lora_gradient_features(
        parts.unet,
        parts.vae,
        scheduler,
        pixels[2:],
        cond,
        TIMESTEPS,
        seeds[2:],
        output=output,
        proj_dim=64,
        proj_seed=7,
    )
    np.testing.assert_allclose(alone[0], fast[2], rtol=1e-4, atol=1e-6 * np.abs(fast).max())


def test_gradient_features_leave_the_model_as_it_was(lora_parts):
    parts, cond, pixels = lora_parts
    unet = parts.unet
    unet.train()
    unet.mid_block.eval()  # a mixed state must come back exactly
    unet.enable_gradient_checkpointing()  # as a memory-saving recipe would; torch.func cannot differentiate through it

    def ckpt_flags():
        return {n: m.gradient_checkpointing for n, m in unet.named_modules() if hasattr(m, "gradient_checkpointing")}

    ckpt = ckpt_flags()
    assert any(ckpt.values())
    modes = {n: m.training for n, m in unet.named_modules()}
    flags = {n: p.requires_grad for n, p in unet.named_parameters()}
    before = {n: p.detach().clone() for n, p in unet.named_parameters()}
    sentinel = {n: torch.full_like(p, 0.25) for n, p in trainable_parameters(unet).items()}
    for n, p in trainable_parameters(unet).items():
        p.grad = sentinel[n].clone()
    lora_gradient_features(unet, parts.vae, parts.scheduler, pixels[:2], cond, TIMESTEPS, [0, 1], proj_dim=8)
    assert {n: m.training for n, m in unet.named_modules()} == modes
    assert ckpt_flags() == ckpt
    assert {n: p.requires_grad for n, p in unet.named_parameters()} == flags
    for n, p in unet.named_parameters():
        assert torch.equal(p.detach(), before[n])
        if n in sentinel:
            assert torch.equal(p.grad, sentinel[n])
        else:
            assert p.grad is None
    for p in unet.parameters():
        p.grad = None
    unet.disable_gradient_checkpointing()
    unet.eval()


def test_gradient_features_with_one_condition_per_image(lora_parts):
    from montrage.components import embed_prompts

    parts, cond, pixels = lora_parts
    prompts = ["a photo of seven", "", "a photo of one"]
    per_image = embed_prompts(parts.tokenizer, parts.text_encoder, prompts)
    args = (parts.unet, parts.vae, parts.scheduler)
    mixed = lora_gradient_features(*args, pixels, per_image, TIMESTEPS, [0, 1, 2], proj_dim=16, batch_size=2)
    for i in range(3):  # equal to each image alone under its own condition
        alone = lora_gradient_features(*args, pixels[i : i + 1], per_image[i : i + 1], TIMESTEPS, [i], proj_dim=16)
        np.testing.assert_allclose(mixed[i], alone[0], rtol=1e-3, atol=1e-5)
    shared = lora_gradient_features(*args, pixels, cond, TIMESTEPS, [0, 1, 2], proj_dim=16)
    np.testing.assert_allclose(mixed[1], shared[1], rtol=1e-3, atol=1e-5)  # image 1's prompt is the shared "" one
    assert np.abs(mixed[0] - shared[0]).max() > 1e-4
    with pytest.raises(ValueError, match="text conditions"):
        lora_gradient_features(*args, pixels, per_image[:2], TIMESTEPS, [0, 1, 2], proj_dim=16)


def test_gradient_features_reject_bad_input(lora_parts):
    parts, cond, pixels = lora_parts
    with pytest.raises(ValueError, match="noise seeds"):
        lora_gradient_features(parts.unet, parts.vae, parts.scheduler, pixels, cond, TIMESTEPS, [0])
    with pytest.raises(ValueError, match="output"):
        lora_gradient_features(parts.unet, parts.vae, parts.scheduler, pixels, cond, TIMESTEPS, [0, 1, 2], output="x")
    with pytest.raises(ValueError, match="trainable"):
        trainable_parameters(torch.nn.Linear(2, 2).requires_grad_(False))


def test_projection_deterministic_and_preserves_inner_products():
    dim = 2 * PROJ_CHUNK_ROWS + 1000  # three chunks, the last partial
    x = torch.randn(6, dim, generator=torch.Generator().manual_seed(1))
    x = x / x.norm(dim=1, keepdim=True)
    a = GaussianProjection(dim, 2048, seed=3)(x)
    b = GaussianProjection(dim, 2048, seed=3, cache_bytes=0)(x)  # regenerated per call, no cache
    assert torch.equal(a, b)
    # independent of the batch (up to BLAS rounding, which depends on the matrix shapes)
    torch.testing.assert_close(a[2:3], GaussianProjection(dim, 2048, seed=3)(x[2:3]), rtol=1e-5, atol=1e-6)
    assert not torch.allclose(a, GaussianProjection(dim, 2048, seed=4)(x))
    # entries ~ N(0, 1/proj_dim); Johnson-Lindenstrauss: inner products kept up to O(1/sqrt(proj_dim)) ≈ 0.03
    m = _dense_projection(GaussianProjection(dim, 2048, seed=3))
    assert m.shape == (dim, 2048)
    assert abs(m.var().item() * 2048 - 1) < 0.01 and abs(m.mean().item()) < 1e-3
    xx = torch.cat([x, (x[0] + x[1])[None] / 2**0.5])  # include a correlated pair (<x6, x0> ≈ 0.7)
    pa = GaussianProjection(dim, 2048, seed=3)(xx)
    np.testing.assert_allclose((pa @ pa.T).numpy(), (xx @ xx.T).numpy(), atol=0.15)
    with pytest.raises(ValueError):
        GaussianProjection(dim, 8)(x[:, :10])


def test_trak_scores_direct():
    rng = np.random.default_rng(0)
    q, phi = rng.normal(size=(3, 5)), rng.normal(size=(7, 5))
    k = phi.T @ phi
    lam = 1e-3 * np.trace(k) / 5
    expected = q @ np.linalg.inv(k + lam * np.eye(5)) @ phi.T
    np.testing.assert_allclose(trak_scores(q, phi), expected, rtol=1e-10)
    np.testing.assert_allclose(trak_scores(10 * q, 10 * phi), expected, rtol=1e-8)  # scale-free
    # a training image aligned with the query, in a direction no other image has, scores highest
    assert trak_scores(phi[3:4], phi).argmax() == 3


def test_tracin_hand_made():
    q1, t1 = np.array([[1.0, 0.0]]), np.array([[2.0, 0.0], [0.0, 3.0]])
    q2, t2 = np.array([[0.0, 1.0]]), np.array([[1.0, 1.0], [0.0, -1.0]])
    assert tracin_scores([q1], [t1]).tolist() == [[2.0, 0.0]]
    assert tracin_scores([q1, q2], [t1, t2]).tolist() == [[3.0, -1.0]]
    assert tracin_scores([q1, q2], [t1, t2], lrs=[0.5, 2.0]).tolist() == [[3.0, -2.0]]
    with pytest.raises(ValueError):
        tracin_scores([q1, q2], [t1, t2], lrs=[1.0])


def test_datainf_matches_explicit_inverse():
    rng = np.random.default_rng(1)
    q, g = rng.normal(size=(2, 4)), rng.normal(size=(6, 4))
    lam = 0.1 * np.mean(np.sum(g**2, axis=1))
    h_inv = np.mean([np.linalg.inv(np.outer(gi, gi) + lam * np.eye(4)) for gi in g], axis=0)
    np.testing.assert_allclose(datainf_scores(q, g), q @ h_inv @ g.T, rtol=1e-10)


def test_pixel_cosine_hand_made():
    ramp = torch.linspace(-1, 1, 3 * 4 * 4).reshape(1, 3, 4, 4)
    train = torch.cat([ramp, -ramp, ramp * 0.5 + 0.2, torch.zeros_like(ramp), ramp.flip(-1)])
    s = pixel_cosine(ramp, train)
    assert s.shape == (1, 5) and s.dtype == np.float64
    np.testing.assert_allclose(s[0, :4], [1.0, -1.0, 1.0, 0.0], atol=1e-12)  # same, negated, affine, constant
    assert -1 < s[0, 4] < 1
    with pytest.raises(ValueError):
        pixel_cosine(ramp, torch.zeros(1, 3, 8, 8))
