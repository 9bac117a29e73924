"""The counterfactual benchmark's retraining: the LoRA customization as a lean loop, coupled with the full run.

Every run starts from the same adapter and replays the full run's batches, latent samples, noise and timesteps,
dropping the removed images' samples (common random numbers), so a query's loss rise is the removed images' doing
and not a reshuffle's. Queries are scored at fixed (t, epsilon) points shared by every run."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

POINTS = 16  # fixed (t, epsilon) pairs per query
BATCH = 32
RETRAINING = "coupled: the full run's batches, noise and timesteps, the removed images' samples dropped"


def fixed_points(shape: tuple, n: int = POINTS, seed: int = 0, num_train_timesteps: int = 1000) -> list:
    """n (t, epsilon) pairs shared by every model: t evenly spread over the schedule, epsilon seeded."""
    g = torch.Generator().manual_seed(seed)
    ts = np.linspace(num_train_timesteps * 0.05, num_train_timesteps * 0.95, n).round().astype(int)
    return [(int(t), torch.randn(shape, generator=g)) for t in ts]


class Retrainer:
    """The benchmark's LoRA customization as a lean loop: latent distributions and caption embeddings computed once,
    then `steps` AdamW steps on batches drawn from the weighted image list, reshuffled per pass (seeded).
    `hparams`: the monitored run's DiffusionFineTune settings (default: the benchmark's `FINE_TUNE`)."""

    def __init__(
        self,
        base: str,
        examples: list,
        weights: list[int],
        resolution: int,
        steps: int,
        seed: int,
        hparams: dict | None = None,
    ):
        from peft import LoraConfig

        from montrage.bench.attribution_setup import FINE_TUNE
        from montrage.components import load_model
        from montrage.data import ConceptImageDataset
        from montrage.family import make_family
        from montrage.recipes.fine_tune import DiffusionFineTune, resolve_pretrained

        hp = {**_defaults(DiffusionFineTune), **FINE_TUNE, **(hparams or {})}  # the monitored run's own settings
        self.base, self.steps, self.seed = resolve_pretrained(base), steps, seed
        self.lr, self.wd = hp["learning_rate"], hp["weight_decay"]
        self.parts = load_model(self.base).parts
        self.family = make_family(self.parts)
        pixels = ConceptImageDataset(examples, resolution).pixels
        with torch.no_grad():
            vae = self.parts["vae"]
            dist = torch.cat([vae.encode(pixels[i : i + 64]).latent_dist.parameters for i in range(0, len(pixels), 64)])
            self.cond = torch.cat(
                [self.family.embed([e.caption for e in examples[i : i + 64]]) for i in range(0, len(examples), 64)]
            )
        self.mean, logvar = dist.chunk(2, dim=1)
        self.std = torch.exp(0.5 * logvar.clamp(-30.0, 20.0))
        self.scale = float(vae.config.scaling_factor)
        self.ids = [e.id for e in examples]
        self.weights = list(weights)
        unet = self.parts["unet"]
        unet.requires_grad_(False)
        torch.manual_seed(seed)
        unet.add_adapter(
            LoraConfig(
                r=hp["lora_rank"],
                lora_alpha=hp["lora_alpha"],
                init_lora_weights="gaussian",
                target_modules=list(hp["lora_target_modules"]),
            )
        )
        self.params = [p for p in unet.parameters() if p.requires_grad]
        self._init = [p.detach().clone() for p in self.params]  # every retraining starts from the same adapter

    def train(self, removed: set[str] = frozenset()):
        """The denoiser after the customization without the images `removed` (by id).

        Coupled with the run on every image (common random numbers): every run draws the full run's batches, latent
        samples, noise and timesteps, and drops the removed images' samples from them, so the images it keeps are
        seen exactly as in the full run and the loss rise is theirs to answer for, not a reshuffle's. Same steps
        (a batch left empty is skipped)."""
        unet = self.parts["unet"]
        with torch.no_grad():
            for p, p0 in zip(self.params, self._init):
                p.copy_(p0)
        opt = torch.optim.AdamW(self.params, lr=self.lr, weight_decay=self.wd)
        dropped = torch.as_tensor([x in removed for x in self.ids])
        pool = np.repeat(np.arange(len(self.ids)), self.weights)
        rng = np.random.default_rng(self.seed)
        g = torch.Generator().manual_seed(self.seed)
        order = np.empty(0, np.int64)
        T = self.parts["scheduler"].config.num_train_timesteps
        unet.train()
        for _ in range(self.steps):
            if len(order) < BATCH:
                order = np.concatenate([order, rng.permutation(pool)])
            pick, order = torch.as_tensor(order[:BATCH]), order[BATCH:]
            z = (self.mean[pick] + self.std[pick] * torch.randn(self.mean[pick].shape, generator=g)) * self.scale
            noise = torch.randn(z.shape, generator=g)
            t = torch.randint(0, T, (len(z),), generator=g)
            kept = ~dropped[pick]
            if not bool(kept.any()):
                continue
            pick, z, noise, t = pick[kept], z[kept], noise[kept], t[kept]
            pred = self.family.denoise(self.family.noise(z, noise, t), t, self.cond[pick])
            loss = F.mse_loss(pred.float(), self.family.target(z, noise, t).float())
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        unet.eval()
        return unet

    @torch.no_grad()
    def query_loss(self, pixels: torch.Tensor, prompts: list[str], points: list) -> np.ndarray:
        """(Q,) mean diffusion loss of each query image under its prompt at the fixed (t, epsilon) points."""
        z = self.family.latents(pixels)
        cond = self.family.embed(list(prompts))
        out = np.zeros(len(z))
        for t, eps in points:
            tt = torch.full((len(z),), t, dtype=torch.long)
            e = eps.expand_as(z)
            pred = self.family.denoise(self.family.noise(z, e, tt), tt, cond)
            out += (
                F.mse_loss(pred.float(), self.family.target(z, e, tt).float(), reduction="none")
                .mean(dim=(1, 2, 3))
                .numpy()
            )
        return out / len(points)


def _defaults(cls) -> dict:
    import inspect

    return {
        k: p.default
        for k, p in inspect.signature(cls.__init__).parameters.items()
        if p.default is not inspect.Parameter.empty
    }
