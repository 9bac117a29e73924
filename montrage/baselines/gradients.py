"""Gradient-based data-attribution baselines (TRAK / D-TRAK, TracIn, DataInf) for a LoRA-customized UNet.

Each image gets a feature: the gradient, with respect to the trainable (LoRA) parameters only, of a diffusion
output function at fixed timesteps and fixed per-image noise (the same ε as `montrage.encode`), averaged over the
timesteps and randomly projected to `proj_dim` dimensions. Per-sample gradients come from `torch.func`
(`functional_call` + `vmap(grad(...))`) in one batched pass, so nothing is accumulated into `.grad` and the
model's flags and modes are left as they were. The scoring functions then compare query and training features.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import torch

from montrage.encode import fixed_noise, image_latents
from montrage.funcgrad import eval_without_checkpointing, vmap_safe_attention

PROJ_CHUNK_ROWS = 4096  # rows of the projection generated per seeded chunk; part of the projection's definition


def _chunk_generator(seed: int, chunk: int) -> torch.Generator:
    """An independent, reproducible stream per (seed, chunk): the projection does not depend on how it is applied."""
    state = np.random.SeedSequence([int(seed), int(chunk)]).generate_state(1)[0]
    return torch.Generator().manual_seed(int(state))


class GaussianProjection:
    """A fixed (dim, proj_dim) matrix with i.i.d. N(0, 1/proj_dim) entries, never materialised unless small.

    Rows are generated on the CPU in chunks of PROJ_CHUNK_ROWS, chunk c from its own seeded stream, so the matrix
    depends only on (seed, dim, proj_dim) and not on the device or the batch. Chunks are kept (on the gradients'
    device) while their total stays under `cache_bytes`; a bigger matrix is regenerated chunk by chunk per call.
    Inner products are preserved in expectation (Johnson-Lindenstrauss): E[<xP, yP>] = <x, y>.
    """

    def __init__(self, dim: int, proj_dim: int, seed: int = 0, cache_bytes: int = 1 << 30):
        self.dim, self.proj_dim, self.seed = int(dim), int(proj_dim), int(seed)
        self.cacheable = self.dim * self.proj_dim * 4 <= cache_bytes
        self._cache: dict[tuple[int, torch.device], torch.Tensor] = {}

    def chunk(self, c: int, device: torch.device) -> torch.Tensor:
        key = (c, torch.device(device))
        if key in self._cache:
            return self._cache[key]
        rows = min(PROJ_CHUNK_ROWS, self.dim - c * PROJ_CHUNK_ROWS)
        block = torch.randn((rows, self.proj_dim), generator=_chunk_generator(self.seed, c))
        block = block.div_(self.proj_dim**0.5).to(device)
        if self.cacheable:
            self._cache[key] = block
        return block

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """Project rows of x (B, dim) -> (B, proj_dim), in float32 on x's device."""
        if x.shape[-1] != self.dim:
            raise ValueError(f"expected vectors of dimension {self.dim}, got {x.shape[-1]}")
        x = x.float()
        out = torch.zeros((len(x), self.proj_dim), device=x.device)
        for c, start in enumerate(range(0, self.dim, PROJ_CHUNK_ROWS)):
            out += x[:, start : start + PROJ_CHUNK_ROWS] @ self.chunk(c, x.device)
        return out


def trainable_parameters(unet: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The parameters training updates (requires_grad), in module order: the LoRA weights of a peft adapter."""
    params = {n: p for n, p in unet.named_parameters() if p.requires_grad}
    if not params:
        raise ValueError("the UNet has no trainable parameters: add a LoRA adapter (unet.add_adapter) or unfreeze it.")
    return params


def lora_gradient_features(
    unet: torch.nn.Module,
    vae: torch.nn.Module | None,
    scheduler,
    pixels: torch.Tensor,
    cond: torch.Tensor,
    timesteps: list[int],
    noise_seeds: list[int],
    output: Literal["loss", "sq_norm"] = "loss",
    proj_dim: int = 512,
    proj_seed: int = 0,
    batch_size: int = 8,
) -> np.ndarray:
    """Projected per-image gradients (B, proj_dim) of a diffusion output function w.r.t. the trainable parameters.

    pixels (B, 3, H, W) in [-1, 1] are VAE-encoded (posterior mean x scaling factor); image i is noised at each
    timestep t_j with `fixed_noise(noise_seeds[i], len(timesteps), latent_shape)[j]` under the text embedding
    `cond`: one shared (1, seq, dim) or one per image (B, seq, dim), e.g. its caption or prompt. `output="loss"`
    differentiates the training loss, the MSE between the UNet prediction and its target (ε, or the velocity for a
    v-prediction scheduler), as TRAK and TracIn do; `output="sq_norm"` the mean square of the predicted noise, D-TRAK's best output function (its ||ε_θ||², divided by the latent size).
    The gradient is averaged over the timesteps, flattened over the trainable parameters in module order, and
    projected with `GaussianProjection(dim, proj_dim, proj_seed)`. Each call runs the UNet on batch_size x
    len(timesteps) latents.
    """
    from torch.func import functional_call, grad, vmap

    if len(pixels) != len(noise_seeds):
        raise ValueError(f"{len(pixels)} images but {len(noise_seeds)} noise seeds.")
    if output not in ("loss", "sq_norm"):
        raise ValueError(f"output must be 'loss' or 'sq_norm', not {output!r}")
    params = {n: p.detach() for n, p in trainable_parameters(unet).items()}
    ref = next(iter(params.values()))
    device, dtype = ref.device, ref.dtype
    projection = GaussianProjection(sum(p.numel() for p in params.values()), proj_dim, proj_seed)
    latents = image_latents(vae, pixels, batch_size)
    T = len(timesteps)
    t_all = torch.tensor(timesteps, dtype=torch.long)
    if len(cond) not in (1, len(pixels)):
        raise ValueError(f"{len(pixels)} images but {len(cond)} text conditions (give one, or one per image).")
    cond = cond.to(device, dtype)
    v_pred = scheduler.config.get("prediction_type", "epsilon") == "v_prediction"

    def objective(p: dict, noisy: torch.Tensor, target: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        # one image: its T noised latents in one UNet batch; the mean over them = the mean of per-timestep values
        kwargs = {"encoder_hidden_states": c.expand(T, -1, -1), "return_dict": False}
        pred = functional_call(unet, p, (noisy, t_all.to(device)), kwargs)[0]
        pred = pred.float()
        return ((pred - target) ** 2).mean() if output == "loss" else (pred**2).mean()

    per_sample = vmap(grad(objective), in_dims=(None, 0, 0, 0))
    feats = []
    with eval_without_checkpointing(unet), vmap_safe_attention(device):
        for i in range(0, len(latents), batch_size):
            z = latents[i : i + batch_size]
            shape = tuple(z.shape[1:])
            eps = torch.stack([fixed_noise(s, T, shape) for s in noise_seeds[i : i + batch_size]])  # (b, T, ...)
            z_rep = z[:, None].expand_as(eps).reshape(-1, *shape)
            t_rep = t_all.repeat(len(z))
            noisy = scheduler.add_noise(z_rep, eps.reshape(-1, *shape), t_rep).reshape(eps.shape)
            target = scheduler.get_velocity(z_rep, eps.reshape(-1, *shape), t_rep).reshape(eps.shape) if v_pred else eps
            c = (cond if len(cond) > 1 else cond.expand(len(pixels), -1, -1))[i : i + batch_size, None]
            g = per_sample(params, noisy.to(device, dtype), target.to(device, torch.float32), c)
            flat = torch.cat([g[n].reshape(len(z), -1).float() for n in params], dim=1)
            feats.append(projection(flat).cpu())
    return torch.cat(feats).numpy()


def trak_scores(query_feats: np.ndarray, train_feats: np.ndarray, damping: float = 1e-3) -> np.ndarray:
    """TRAK scores (Q, N): φ_q (ΦᵀΦ + λI)⁻¹ φ_iᵀ with λ = damping · mean(diag ΦᵀΦ).

    The inverse feature covariance turns raw gradient alignment into an (approximate) leave-one-out effect, so
    images with unusual gradient directions are not drowned by the common ones. Relative damping makes the score
    invariant to a rescaling of all features.
    """
    q = np.asarray(query_feats, dtype=np.float64)
    phi = np.asarray(train_feats, dtype=np.float64)
    kernel = phi.T @ phi
    kernel[np.diag_indices_from(kernel)] += damping * np.mean(np.diag(kernel))
    return q @ np.linalg.solve(kernel, phi.T)


def tracin_scores(
    query_feats_per_epoch: list[np.ndarray], train_feats_per_epoch: list[np.ndarray], lrs: list[float] | None = None
) -> np.ndarray:
    """TracInCP scores (Q, N): Σ_e lr_e · <g_q,e, g_i,e> over checkpoint snapshots e (lr_e = 1 if not given).

    Sums the first-order loss change each training image caused on the query along the training trajectory.
    """
    if len(query_feats_per_epoch) != len(train_feats_per_epoch):
        raise ValueError("query and training features must cover the same checkpoints.")
    lrs = [1.0] * len(query_feats_per_epoch) if lrs is None else list(lrs)
    if len(lrs) != len(query_feats_per_epoch):
        raise ValueError(f"{len(lrs)} learning rates for {len(query_feats_per_epoch)} checkpoints.")
    return sum(
        lr * np.asarray(q, np.float64) @ np.asarray(t, np.float64).T
        for lr, q, t in zip(lrs, query_feats_per_epoch, train_feats_per_epoch)
    )


def datainf_scores(query_grads: np.ndarray, train_grads: np.ndarray, damping: float = 0.1) -> np.ndarray:
    """DataInf scores (Q, N): g_q H̃⁻¹ g_iᵀ with DataInf's closed-form inverse (Kwon et al., ICLR 2024).

    H̃⁻¹ = (1/n) Σ_j (g_j g_jᵀ + λI)⁻¹, which Sherman-Morrison makes explicit:
    g_q H̃⁻¹ g_i = (1/λ) [<g_q, g_i> − (1/n) Σ_j <g_q, g_j> <g_j, g_i> / (λ + ||g_j||²)], with
    λ = damping · mean_j ||g_j||² as in the paper. DataInf applies this per LoRA layer; here it is applied to the
    whole (projected) gradient as one block. Sign: higher = the training image lowers the query's loss more (the
    negative of DataInf's harmfulness convention), like TRAK and TracIn.
    """
    q = np.asarray(query_grads, dtype=np.float64)
    g = np.asarray(train_grads, dtype=np.float64)
    sq = np.einsum("nk,nk->n", g, g)
    lam = damping * sq.mean()
    qg = q @ g.T  # (Q, N)
    correction = ((qg / (lam + sq)) @ g) @ g.T / len(g)
    return (qg - correction) / lam
