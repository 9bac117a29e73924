"""Trajectory features (Tracing the Roots, Algorithm 1): per timestep t, the denoising loss L_t, ‖∇x L_t‖² and
‖∇θ L_t‖², each with its own seeded ε, for every image.

Why these: a model treats its training images, its own generations and other images differently along the whole
trajectory, not only in a "Goldilocks" window of t; gradients add curvature information the loss lacks.

Conventions (constant factors do not matter after the classifier's standardisation):
- L_t = mean over elements of (prediction - target)², target = ε (or the velocity for v-prediction models), with
  x_t = √ᾱ_t x + √(1-ᾱ_t) ε and x the image (pixel model) or its VAE posterior-mean latent (latent model).
- ∇x is taken w.r.t. the noisy input x_t (the paper's ∇ w.r.t. clean x equals √ᾱ_t ∇x_t: same up to a factor per t).
- ∇θ is per sample (torch.func: functional_call + vmap + grad) w.r.t. θ = the trainable parameters (requires_grad,
  e.g. LoRA) by default, or all UNet parameters (`params="all"`), or the parameters whose names start with given
  prefixes. Optionally the squared norm per parameter tensor is kept too (`layer_norms`, GSA-style features).
- ε for (image, t) is seeded by the image's content hash, t and `noise_seed`, so the same image always gets the
  same noise whatever batch or order it comes in; `noise="pia"` uses ε_θ(x, 0) instead (PIA's deterministic noise).
- `draws` > 1 (not in the paper, which draws one ε per (image, t)): each feature is the mean over that many seeded ε
  at the same t (draw 0 is the single-draw ε), which lowers the noise of every feature at `draws` times the cost.

Two families beyond the paper's, chosen by ablation on the origin benchmark (docs/results.md, "Origin attribution"):
- `loss_pia`: L_t with PIA's deterministic ε = ε_θ(x, 0) at every t. A random ε makes each L_t noisy; the model's
  own ε gives a low-variance trajectory (on the LoRA half it lifted the ternary AUC more than any other change).
- `loss_ref`, `grad_x_ref`: L_t and ‖∇x L_t‖² under the *reference* model, i.e. the UNet with its adapters disabled
  (the base a LoRA was trained from), with the same ε. What the fine-tune changed is what tells its members apart;
  an image's own difficulty, which the base model sees too, is the noise. Only for models with a PEFT adapter.
`default_families(model)` picks the paper's three plus these (the reference pair only where an adapter exists).

CLiD's families (Zhai et al. 2024, conditional likelihood discrepancy), for text-conditioned models and images with
their captions: `clid_null` = L_t under the image's caption minus L_t under the null (empty) caption, and
`clid_perturbed` = L_t under the caption minus L_t under a perturbed caption (`perturb_caption`: about half its
words removed), each with the same ε. A model fine-tuned on (image, caption) pairs denoises its members much better
under their own caption than without it; an image it never saw gains less from its caption.

The training trajectory, `loss_snapshots` (only a monitored run has it): L_t under the adapter of each stored snapshot
(`spec.snapshots`, store rows), with the same ε, laid out snapshot-major as (N, S x T). A member's loss falls as
training fits it; an image the run never saw moves only with its distribution. Needs a model rebuilt from a store
(`montrage.origin.from_store.store_diffusion_model`), whose own adapter is put back afterwards.

The model is put in eval mode for the extraction and every module's mode is restored afterwards; requires_grad
flags and `.grad` are never touched.
"""

from __future__ import annotations

import contextlib
import time
from typing import Sequence

import numpy as np
import torch

from montrage.components import DiffusionModel
from montrage.encode import fixed_noise, image_latents, stable_seed
from montrage.family.base import SHARED_COND_KEYS
from montrage.funcgrad import eval_without_checkpointing, vmap_safe_attention
from montrage.origin.errors import OriginError
from montrage.origin.feature_set import (
    CLID_FAMILIES,
    FAMILIES,
    REFERENCE_FAMILIES,
    SNAPSHOT_FAMILIES,
    FeatureSet,
    FeatureSpec,
    default_families,
    default_timesteps,
    has_adapter,
)
from montrage.origin.images import check_images, image_keys


def select_parameters(unet: torch.nn.Module, params: str | Sequence[str]) -> dict[str, torch.Tensor]:
    """θ for ∇θ: 'trainable' (requires_grad, e.g. a LoRA adapter), 'all', or names starting with given prefixes."""
    named = dict(unet.named_parameters())
    if params == "trainable":
        chosen = {n: p for n, p in named.items() if p.requires_grad}
        if not chosen:
            raise OriginError(
                "the UNet has no trainable parameters (none has requires_grad), so ∇θ over 'trainable' "
                "is empty: pass params='all' (--params all), or add the adapter whose parameters "
                "should count."
            )
    elif params == "all":
        chosen = named
    else:
        prefixes = tuple(params)
        chosen = {n: p for n, p in named.items() if n.startswith(prefixes)}
        if not chosen:
            raise OriginError(
                f"no UNet parameter name starts with {list(prefixes)}; names look like {list(named)[:3]}."
            )
    return chosen


def perturb_caption(caption: str, key: str) -> str:
    """The caption with about half its words removed (at least one removed, at least one kept when it has two or
    more), the choice seeded by `key` (the image's content key), so the same image always gets the same perturbation."""
    words = caption.split()
    if len(words) < 2:
        return ""
    rng = np.random.default_rng(stable_seed(f"clid|{key}"))
    drop = rng.random(len(words)) < 0.5
    if not drop.any():
        drop[rng.integers(len(words))] = True
    if drop.all():
        drop[rng.integers(len(words))] = False
    return " ".join(w for w, d in zip(words, drop) if not d)


def check_captions(spec: FeatureSpec, captions: list[str] | None, ids: list[str], conditional: bool) -> None:
    """CLiD compares an image's loss under its own caption with the null / a perturbed caption: it needs both."""
    if not spec.needs_captions:
        return
    if not conditional:
        raise OriginError(
            f"families {list(CLID_FAMILIES)} (CLiD) compare losses under different captions, but this "
            "model is unconditional: drop these families for a pixel model."
        )
    if captions is None:
        raise OriginError(
            f"families {list(CLID_FAMILIES)} (CLiD) need each image's own caption: pass captions "
            "(`--captions sidecar` or `--captions metadata.jsonl`) or drop these families."
        )
    empty = [ids[i] for i, c in enumerate(captions) if not str(c).strip()]
    if empty:
        raise OriginError(
            f"families {list(CLID_FAMILIES)} (CLiD) need a caption for every image; {len(empty)} "
            f"have an empty one: {empty[:5]}{' ...' if len(empty) > 5 else ''}. Give them their "
            "captions or drop these families."
        )


def noise_for(key: str, t: int, seed: int, shape: tuple[int, ...], draw: int = 0) -> torch.Tensor:
    tag = f"origin|{seed}|{key}|{t}" + (f"|{draw}" if draw else "")
    return fixed_noise(stable_seed(tag), 1, shape)[0]


def trajectory_features(
    model: DiffusionModel,
    images: torch.Tensor | list[str],
    spec: FeatureSpec | None = None,
    captions: list[str] | None = None,
    ids: list[str] | None = None,
    batch_size: int = 32,
    label: str | None = None,
    progress: bool = True,
) -> FeatureSet:
    """Features of images (a tensor (N, C, H, W) in [-1, 1], or image paths) under `model` at `spec.timesteps`
    (default: 20 uniform steps).

    `captions` (latent models): one condition per image; default `spec.prompt` for all (the empty prompt).
    `batch_size` counts (image, timestep) pairs per UNet call; with ∇θ it is also the vmap width, so per-sample
    gradients of batch_size x |θ| floats are held at once: lower it for large models with params='all'.
    """
    from tqdm.auto import tqdm

    spec = spec or FeatureSpec(
        tuple(default_timesteps(model.scheduler.config.num_train_timesteps)), families=default_families(model)
    )
    if isinstance(images, (list, tuple)):
        from montrage.origin.images import load_images

        ids = list(images) if ids is None else ids
        images = load_images(list(images), model.image_size, model.image_channels)
    images = check_images(images, model.image_size, model.image_channels)
    n, T = len(images), len(spec.timesteps)
    if ids is not None and len(ids) != n:
        raise OriginError(f"{n} images but {len(ids)} ids.")
    if captions is not None and len(captions) != n:
        raise OriginError(f"{n} images but {len(captions)} captions.")
    num_train = int(model.scheduler.config.num_train_timesteps)
    bad = [t for t in spec.timesteps if not 0 <= t < num_train]
    if bad:
        raise OriginError(f"timesteps {bad} are outside the model's range 0..{num_train - 1}.")
    if spec.needs_snapshots:
        check_snapshots(model, spec.snapshots)
    if spec.needs_reference and not has_adapter(model.unet):
        raise OriginError(
            f"families {list(REFERENCE_FAMILIES)} compare the model with its base (the UNet with its "
            "adapter disabled), but this UNet has no PEFT adapter (or it was fused into the weights): "
            "load the LoRA with `--lora`, or drop these families."
        )
    t0 = time.perf_counter()
    unet, device = model.unet, model.device
    dtype = next(unet.parameters()).dtype
    keys = image_keys(images)
    check_captions(spec, captions, list(ids) if ids is not None else keys, model.text_encoder is not None)
    theta = select_parameters(unet, spec.params) if spec.needs_theta else {}
    theta = {k: v.detach() for k, v in theta.items()}
    rest = {k: v.detach() for k, v in unet.named_parameters() if k not in theta}
    scheduler = model.scheduler
    v_pred = scheduler.config.get("prediction_type", "epsilon") == "v_prediction"
    fam = model.family
    net = FamilyNet(fam) if fam is not None else unet  # SDXL / SD3 / Flux: the family's call, one module
    prefix = "model." if fam is not None else ""
    net_theta, net_rest = ({prefix + k: v for k, v in d.items()} for d in (theta, rest))

    D = spec.draws
    main = tuple(f for f in spec.families if f in FAMILIES)
    prompts = list(captions) if captions is not None else [spec.prompt]
    own_caption = torch.arange(n)  # each image's row in `prompts` under its own caption (CLiD)
    caption_rows = own_caption if captions is not None else torch.zeros(n, dtype=torch.long)
    if captions is not None and spec.captions_for == "clid":  # the other families under spec.prompt
        prompts.append(spec.prompt)
        caption_rows = torch.full((n,), n, dtype=torch.long)
    clid_own = captions is not None and spec.captions_for == "all" and "loss" in main  # reuse the main loss
    # passes over (image, t, draw) pairs: families computed, noise, weights (None: the model's; "reference": adapters
    # off; a store row: that snapshot's adapter), output name per family, draws, per-tensor norms kept?, each image's
    # row in `prompts`
    passes = []
    if main or spec.layer_norms:
        passes.append((main, spec.noise, None, {f: f for f in main}, D, spec.layer_norms, caption_rows))
    if "loss_pia" in spec.families:
        passes.append((("loss",), "pia", None, {"loss": "loss_pia"}, 1, False, caption_rows))
    ref = tuple(f for f in spec.families if f in REFERENCE_FAMILIES)
    if ref:
        passes.append(
            (tuple(f[:-4] for f in ref), spec.noise, "reference", {f[:-4]: f for f in ref}, D, False, caption_rows)
        )
    hidden = []  # CLiD's losses under the caption, the null and the perturbed caption (differences at the end)
    if spec.needs_captions:
        if not clid_own:
            passes.append((("loss",), spec.noise, None, {"loss": "_clid_caption"}, D, False, own_caption))
            hidden.append("_clid_caption")
        others = {"clid_null": [""] * n, "clid_perturbed": [perturb_caption(c, k) for c, k in zip(captions, keys)]}
        for f in CLID_FAMILIES:
            if f in spec.families:
                passes.append(
                    (
                        ("loss",),
                        spec.noise,
                        None,
                        {"loss": "_" + f},
                        D,
                        False,
                        torch.arange(len(prompts), len(prompts) + n),
                    )
                )
                prompts += others[f]
                hidden.append("_" + f)
    # the training trajectory: the loss under each stored adapter, same ε; the model's own snapshot is the main loss
    own_row = model.snapshots.row if spec.needs_snapshots and "loss" in main else None
    snapshot_out = {r: "loss" if r == own_row else f"_snapshot{r}" for r in spec.snapshots}
    for r, name in snapshot_out.items():
        if name != "loss":
            passes.append((("loss",), spec.noise, r, {"loss": name}, D, False, caption_rows))
            hidden.append(name)
    out = {
        f: np.zeros((n, T), np.float64) for f in tuple(spec.families) + tuple(hidden) if f not in SNAPSHOT_FAMILIES
    }  # sums over draws
    layers = np.zeros((n, T, len(theta)), np.float64) if spec.layer_norms else None
    with eval_without_checkpointing(unet, model.vae, model.text_encoder), vmap_safe_attention(device):
        latents = (
            fam.latents(images, batch_size) if fam is not None else image_latents(model.vae, images, batch_size)
        ).float()
        unique = sorted(set(prompts))
        conds = model.condition(unique)  # one embedding per distinct prompt, indexed per pair
        where = {p: k for k, p in enumerate(unique)}
        to_unique = torch.tensor([where[p] for p in prompts])
        pia = None
        if any(p[1] == "pia" for p in passes):
            pia = _pia_noise(model, latents, conds, to_unique[caption_rows], batch_size)
        bar = tqdm(total=sum(n * T * p[4] for p in passes), desc="origin features", unit="pair", disable=not progress)
        for families, noise, weights, names, draws, keep_layers, rows_of in passes:
            prompt_index = to_unique[rows_of]
            pairs = [(i, j, d) for i in range(n) for j in range(T) for d in range(draws)]
            with _weights(model, weights):
                pass_conds = model.condition(unique) if isinstance(weights, int) else conds  # text adapters change too
                for start in range(0, len(pairs), batch_size):
                    chunk = pairs[start : start + batch_size]
                    ii = torch.tensor([p[0] for p in chunk])
                    tt = torch.tensor([spec.timesteps[p[1]] for p in chunk], dtype=torch.long)
                    z = latents[ii]
                    shape = tuple(z.shape[1:])
                    if noise == "pia":
                        eps = pia[ii]
                    else:
                        eps = torch.stack(
                            [noise_for(keys[p[0]], spec.timesteps[p[1]], spec.noise_seed, shape, p[2]) for p in chunk]
                        )
                    if fam is not None:
                        noisy, target = fam.noise(z, eps, tt), fam.target(z, eps, tt)
                    else:
                        noisy = scheduler.add_noise(z, eps, tt)
                        target = scheduler.get_velocity(z, eps, tt) if v_pred else eps
                    cond = _take(pass_conds, prompt_index[ii], device, dtype)
                    res = _pair_features(
                        net,
                        families,
                        keep_layers,
                        net_theta,
                        net_rest,
                        noisy.to(device, dtype),
                        tt.to(device),
                        target.to(device, torch.float32),
                        cond,
                    )
                    rows, cols = ii.numpy(), np.array([p[1] for p in chunk])
                    for f, v in res.items():  # unbuffered adds: a chunk may hold several draws of one (image, t)
                        np.add.at(layers if f == "layers" else out[names[f]], (rows, cols), v)
                    bar.update(len(chunk))
            for f in names.values():
                out[f] /= draws
        bar.close()
    for f in CLID_FAMILIES:
        if f in spec.families:
            out[f] = out["loss" if clid_own else "_clid_caption"] - out["_" + f]
    if spec.needs_snapshots:
        out["loss_snapshots"] = np.concatenate([out[snapshot_out[r]] for r in spec.snapshots], axis=1)
    values = {f: out[f].astype(np.float32) for f in spec.families}
    if layers is not None:
        layers = (layers / D).astype(np.float32)
    return FeatureSet(
        spec=spec,
        identity=model.identity(),
        ids=list(ids) if ids is not None else keys,
        values=values,
        layer_norms=layers,
        layer_names=list(theta) if spec.layer_norms else None,
        label=label,
        seconds=time.perf_counter() - t0,
    )


def _adapters_enabled(unet: torch.nn.Module) -> bool:
    from peft.tuners.tuners_utils import BaseTunerLayer

    return any(isinstance(m, BaseTunerLayer) and not m.disable_adapters for m in unet.modules())


def check_snapshots(model: DiffusionModel, rows: Sequence[int]) -> None:
    """Refuse training-time features for a model that was not rebuilt from a store with adapter snapshots."""
    snapshots = model.snapshots
    if snapshots is None or not snapshots.lora:
        raise OriginError(
            "the loss_snapshots family reads the fine-tune's adapter at every stored snapshot, but this "
            "model "
            + (
                "was not built from a montrage store"
                if snapshots is None
                else f"comes from store {snapshots.store.path!r}, which holds no adapter snapshots"
            )
            + ": record them with MontrageCallback(save_lora_snapshots=True) on a LoRA run and use "
            "`montrage origin fit STORE` (or `store_diffusion_model`), or drop the family."
        )
    held = snapshots.store.adapter_snapshots
    bad = [r for r in rows if not 0 <= r < held]
    if bad:
        raise OriginError(
            f"snapshot rows {bad} are not in store {snapshots.store.path!r}, which holds adapter "
            f"snapshots 0..{held - 1}."
        )


@contextlib.contextmanager
def _weights(model: DiffusionModel, weights):
    """Inside the block: the model as is (None), its base with adapters disabled ("reference"; afterwards they are
    enabled again only if they were enabled before), or the adapter of store row `weights` (then the model's own)."""
    if weights is None:
        yield
        return
    if isinstance(weights, int):
        own = model.snapshots.row
        model.snapshots.set_epoch(weights)
        try:
            yield
        finally:
            model.snapshots.set_epoch(own)
        return
    unet = model.unet
    was_enabled = _adapters_enabled(unet)
    unet.disable_adapters()
    try:
        yield
    finally:
        if was_enabled:
            unet.enable_adapters()


class FamilyNet(torch.nn.Module):
    """A family's denoiser call (SDXL added conditions, SD3/Flux joint transformers, Flux packing) as one module, so
    that `functional_call` and per-sample gradients treat every family like a UNet."""

    def __init__(self, family):
        super().__init__()
        self.model = family.denoiser
        self.family = family

    def forward(self, x, t, cond=None, return_dict=False):
        return (self.family.denoise(x, t, cond),)


def _take(conds, index: torch.Tensor, device, dtype):
    """The conditions of rows `index` (a tensor, or a family's dict of tensors), on the model's device."""
    if conds is None:
        return None
    if isinstance(conds, dict):
        return {
            k: v.to(device, dtype) if k in SHARED_COND_KEYS else v[index.to(v.device)].to(device, dtype)
            for k, v in conds.items()
        }
    return conds[index.to(conds.device)].to(device, dtype)


def _cond_one(c):
    """One sample's condition with its batch axis back (inside vmap)."""
    if c is None:
        return None
    if isinstance(c, dict):
        return {k: v if k in SHARED_COND_KEYS else v[None] for k, v in c.items()}
    return c[None]


def _cond_dims(cond):
    if cond is None:
        return None
    if isinstance(cond, dict):
        return {k: None if k in SHARED_COND_KEYS else 0 for k in cond}
    return 0


def _unet_kwargs(cond) -> dict:
    kw = {"return_dict": False}
    if isinstance(cond, dict):
        kw["cond"] = cond
    elif cond is not None:
        kw["encoder_hidden_states"] = cond
    return kw


@torch.no_grad()
def _pia_noise(
    model: DiffusionModel, latents: torch.Tensor, conds, prompt_index: torch.Tensor, batch_size: int
) -> torch.Tensor:
    """PIA's deterministic noise: the model's prediction at t = 0 on the clean input, ε = ε_θ(x, 0)."""
    device = model.device
    dtype = next(model.unet.parameters()).dtype
    fam = model.family
    out = []
    for i in range(0, len(latents), batch_size):
        z = latents[i : i + batch_size].to(device, dtype)
        cond = _take(conds, prompt_index[i : i + batch_size], device, dtype)
        t0 = torch.zeros(len(z), dtype=torch.long, device=device)
        if fam is not None:
            pred = fam.denoise(z, t0, cond)
            if fam.noise_kind == "flow":  # a velocity eps - x: the model's eps at sigma = 0 is v + x
                pred = pred + z
        else:
            pred = model.unet(z, t0, **_unet_kwargs(cond))[0]
        out.append(pred[:, : z.shape[1]].float().cpu())
    return torch.cat(out)


def _pair_features(
    unet,
    families: tuple[str, ...],
    layer_norms: bool,
    theta: dict,
    rest: dict,
    noisy: torch.Tensor,
    t: torch.Tensor,
    target: torch.Tensor,
    cond: torch.Tensor | None,
) -> dict[str, np.ndarray]:
    """Loss and squared gradient norms (of the paper's `families`) for a batch of (image, t) pairs, each pair its
    own sample; `layers`, the per-tensor ‖∇θ L‖², too when `layer_norms`."""
    from torch.func import functional_call, grad, vmap

    dims = tuple(range(1, noisy.ndim))
    want_x = "grad_x" in families
    if "grad_theta" in families or layer_norms:

        def loss_one(th, x, tt, tgt, c):
            kw = _unet_kwargs(_cond_one(c))
            pred = functional_call(unet, (th, rest), (x[None], tt[None]), kw)[0][:, : x.shape[0]]
            loss = ((pred.float() - tgt[None]) ** 2).mean()
            return loss, loss

        def one(th, x, tt, tgt, c):
            (g_th, g_x), loss = grad(loss_one, argnums=(0, 1), has_aux=True)(th, x, tt, tgt, c)
            per_tensor = torch.stack([(g.float() ** 2).sum() for g in g_th.values()])
            return loss, (g_x.float() ** 2).sum(), per_tensor

        in_dims = (None, 0, 0, 0, _cond_dims(cond))
        loss, gx, per_tensor = vmap(one, in_dims=in_dims)(theta, noisy, t, target, cond)
        res = {"loss": loss, "grad_x": gx, "grad_theta": per_tensor.sum(dim=1)}
        if layer_norms:
            res["layers"] = per_tensor
    elif want_x:
        params = {**theta, **rest}
        x = noisy.detach().requires_grad_(True)
        with torch.enable_grad():
            pred = functional_call(unet, params, (x, t), _unet_kwargs(cond))[0][:, : x.shape[1]]
            loss = ((pred.float() - target) ** 2).mean(dim=dims)
            (g_x,) = torch.autograd.grad(loss.sum(), x)
        res = {"loss": loss.detach(), "grad_x": (g_x.float() ** 2).sum(dim=dims)}
    else:
        with torch.no_grad():
            pred = functional_call(unet, {**theta, **rest}, (noisy, t), _unet_kwargs(cond))[0][:, : noisy.shape[1]]
            res = {"loss": ((pred.float() - target) ** 2).mean(dim=dims)}
    return {k: v.detach().float().cpu().numpy() for k, v in res.items() if k in families or k == "layers"}
