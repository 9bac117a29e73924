"""Family adapters (SD1, SD2-v, SDXL, SD3, Flux) against the way diffusers' training scripts and pipelines do it, on
tiny random-weight models saved with save_pretrained and loaded like real ones."""

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import loops
from montrage import Monitor
from montrage.components import resolve_components
from montrage.family import FamilyError, make_family
from montrage.probes import ProbeSet
from montrage.recipes.tiny_families import FAMILY_NAMES, load_family, save_family
from montrage.store import StoreMismatchError, StoreReader

FAMILY = {"sd": "sd", "sd2v": "sd", "sdxl": "sdxl", "sd3": "sd3", "flux": "flux"}


@pytest.fixture(scope="module")
def family_dirs(tmp_path_factory):
    return {name: save_family(name, str(tmp_path_factory.mktemp(name) / "model")) for name in FAMILY_NAMES}


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    return loops.write_digit_folder(tmp_path_factory.mktemp("digits"), per_concept=2)


def adapter(pipe):
    return make_family(resolve_components(pipe).parts, pipe, resolution=16)


@pytest.mark.parametrize("name", FAMILY_NAMES)
def test_noising_and_denoiser_call_match_the_training_scripts(family_dirs, name):
    pipe = load_family(family_dirs[name])
    fam = adapter(pipe)
    assert fam.name == FAMILY[name]
    torch.manual_seed(0)
    x, eps = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    sched = pipe.scheduler
    if fam.noise_kind == "ddpm":
        t = torch.tensor([100, 750])
        torch.testing.assert_close(fam.noise(x, eps, t), sched.add_noise(x, eps, t))
    else:  # the flow scripts: timesteps from the scheduler's table, sigma from its sigmas, (1 - s) x + s eps
        k = torch.tensor([3, 600])
        t, sigma = sched.timesteps[k], sched.sigmas[k].view(-1, 1, 1, 1)
        torch.testing.assert_close(fam.noise(x, eps, t), (1.0 - sigma) * x + sigma * eps)
    prompts = ["a photo of one", "a photo of seven"]
    cond = fam.condition(prompts)
    t = torch.tensor([100, 750])
    with torch.no_grad():
        mine = fam.denoise(x, t, cond)
        if name == "sdxl":  # compute_time_ids(original_size, crops_coords_top_left) for a 16 px centre crop
            embeds, _, pooled, _ = pipe.encode_prompt(prompts, device="cpu", do_classifier_free_guidance=False)
            time_ids = torch.tensor([[16, 16, 0, 0, 16, 16]], dtype=torch.float32).repeat(2, 1)
            theirs = pipe.unet(
                x, t, encoder_hidden_states=embeds, added_cond_kwargs={"time_ids": time_ids, "text_embeds": pooled}
            ).sample
        elif name == "flux":  # pack, img_ids, timestep / 1000, embedded guidance, unpack
            embeds, pooled, text_ids = pipe.encode_prompt(
                prompts, prompt_2=None, max_sequence_length=fam.max_sequence_length
            )
            packed = type(pipe)._pack_latents(x, 2, 4, 8, 8)
            img_ids = type(pipe)._prepare_latent_image_ids(2, 4, 4, x.device, x.dtype)
            pred = pipe.transformer(
                hidden_states=packed,
                timestep=t.float() / 1000,
                guidance=torch.full((2,), 3.5),
                pooled_projections=pooled,
                encoder_hidden_states=embeds,
                txt_ids=text_ids,
                img_ids=img_ids,
                return_dict=False,
            )[0]
            theirs = type(pipe)._unpack_latents(pred, height=16, width=16, vae_scale_factor=2)
        elif name == "sd3":
            embeds, _, pooled, _ = pipe.encode_prompt(
                prompts,
                prompts,
                prompts,
                do_classifier_free_guidance=False,
                max_sequence_length=fam.max_sequence_length,
            )
            theirs = pipe.transformer(
                hidden_states=x,
                timestep=t.float(),
                encoder_hidden_states=embeds,
                pooled_projections=pooled,
                return_dict=False,
            )[0]
        else:
            ids = pipe.tokenizer(
                prompts,
                padding="max_length",
                max_length=pipe.tokenizer.model_max_length,
                truncation=True,
                return_tensors="pt",
            ).input_ids
            theirs = pipe.unet(x, t, pipe.text_encoder(ids)[0]).sample
    torch.testing.assert_close(mine, theirs)


@pytest.mark.parametrize("name", ["sdxl", "sd3", "flux"])
def test_hooked_features_are_the_image_tokens(family_dirs, name):
    pipe = load_family(family_dirs[name])
    fam = adapter(pipe)
    layer = fam.default_layers()[0]
    module = dict(fam.denoiser.named_modules())[layer]
    seen = []
    handle = module.register_forward_hook(lambda m, i, out: seen.append(fam.select_stream(m, out)))
    with torch.no_grad():
        fam.denoise(torch.randn(1, 4, 8, 8), torch.tensor([500]), fam.condition(["a photo of one"]))
    handle.remove()
    stream = seen[0]
    if name == "sdxl":
        assert stream.dim() == 4  # a UNet block: (B, C, h, w)
    else:  # (B, tokens, C): the latent tokens (SD3: 8 x 8 patches; Flux: 4 x 4 packed), not the text's
        assert stream.shape[1] == {"sd3": 64, "flux": 16}[name]
        assert stream.shape[1] != fam.condition(["a photo of one"])["prompt_embeds"].shape[1]


@pytest.mark.parametrize("name", FAMILY_NAMES)
def test_probes_equal_the_family_pipeline_and_leave_the_scheduler(family_dirs, name):
    pipe = load_family(family_dirs[name])
    fam = adapter(pipe)
    before = (
        copy.deepcopy(pipe.scheduler.__dict__.get("timesteps")),
        copy.deepcopy(getattr(pipe.scheduler, "sigmas", None)),
    )
    probes = ProbeSet(("a photo of one", "a photo of seven"), ({}, {}), (3,))
    mine = fam.generate(probes, 16, 3, 2.0)
    direct = type(pipe)(**{**pipe.components, "scheduler": type(fam.sampler()).from_config(pipe.scheduler.config)})
    direct.set_progress_bar_config(disable=True)
    kw = fam.sample_kwargs(3, 2.0)
    images = [
        direct(p, height=16, width=16, latents=fam.initial_latents(s, 16), output_type="pt", **kw).images
        for p, s in probes.items()
    ]
    torch.testing.assert_close(mine, torch.cat(images) * 2 - 1, rtol=1e-4, atol=1e-4)
    after = pipe.scheduler.__dict__.get("timesteps"), getattr(pipe.scheduler, "sigmas", None)
    for b, a in zip(before, after):
        assert (b is None and a is None) or torch.equal(torch.as_tensor(b), torch.as_tensor(a))


def family_loop(model_dir, data_root, store=None, steps=3, text_lora=False, **monitor_kw):
    """A short LoRA run of the family's training objective; with `store`, monitored. Returns (losses, lora, monitor)."""
    from peft import LoraConfig

    pipe = load_family(model_dir)
    for m in pipe.components.values():
        if isinstance(m, torch.nn.Module):
            m.requires_grad_(False)
    fam = adapter(pipe)
    torch.manual_seed(0)
    fam.denoiser.add_adapter(
        LoraConfig(
            r=2,
            lora_alpha=2,
            init_lora_weights="gaussian",
            lora_dropout=0.1,
            target_modules=["to_q", "to_k", "to_v", "to_out.0"],
        )
    )
    if text_lora:  # as the SDXL scripts' --train_text_encoder (peft injects, whatever the transformers version)
        from peft import inject_adapter_in_model

        for part in ("text_encoder", "text_encoder_2"):
            inject_adapter_in_model(
                LoraConfig(
                    r=2,
                    lora_alpha=2,
                    init_lora_weights="gaussian",
                    target_modules=["q_proj", "k_proj", "v_proj", "out_proj"],
                ),
                pipe.components[part],
            )
    dataset = loops.DiskDataset(data_root)
    monitor = None
    if store is not None:
        monitor = Monitor(
            str(store),
            pipe,
            dataset,
            every_n_steps=2,
            max_steps=steps,
            resolution=16,
            **loops.monitor_args(**monitor_kw),
        )
        monitor.start()
    params = [
        p for m in pipe.components.values() if isinstance(m, torch.nn.Module) for p in m.parameters() if p.requires_grad
    ]
    opt = torch.optim.AdamW(params, lr=1e-2)
    fam.denoiser.train()
    sched, losses = pipe.scheduler, []
    for step in range(1, steps + 1):
        idx = [(2 * step) % len(dataset), (2 * step + 1) % len(dataset)]
        batch = loops.train_collate([dataset[i] for i in idx])
        z = fam.latents(batch["pixel_values"], sample=True)
        noise = torch.randn_like(z)
        t = torch.randint(0, 1000, (len(z),))
        cond = fam.embed(batch["caption"])  # with gradients, as the scripts do each step
        pred = fam.denoise(fam.noise(z, noise, t), t, cond)
        target = (
            noise - z
            if fam.noise_kind == "flow"
            else (sched.get_velocity(z, noise, t) if sched.config.prediction_type == "v_prediction" else noise)
        )
        torch.testing.assert_close(fam.target(z, noise, t), target)
        loss = F.mse_loss(pred.float(), target.float())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
        if monitor is not None:
            monitor.on_batch(idx, step)
            monitor.maybe_snapshot(step)
    if monitor is not None:
        monitor.close(steps)
    lora = {n: p.detach().clone() for n, p in fam.denoiser.named_parameters() if p.requires_grad}
    return losses, lora, monitor


@pytest.mark.parametrize("name", FAMILY_NAMES)
def test_monitored_lora_run_is_bit_identical_per_family(family_dirs, data_root, tmp_path, name):
    plain, plain_lora, _ = family_loop(family_dirs[name], data_root)
    losses, lora, monitor = family_loop(family_dirs[name], data_root, tmp_path / "s.h5")
    assert losses == plain
    for k in plain_lora:
        assert torch.equal(plain_lora[k], lora[k]), k
    with StoreReader(str(tmp_path / "s.h5")) as r:
        assert list(r.global_steps) == [0, 2, 3]
        assert r.spec["model"]["family"] == FAMILY[name] and r.run.family == FAMILY[name]
        assert r.layers == monitor.family.default_layers()
        feats = r.train_features(r.layers[0])
        assert feats.shape[:2] == (3, 4) and np.isfinite(feats).all()
        assert not np.allclose(feats[0], feats[-1])  # the adapter moved the representations
        if FAMILY[name] in ("sd3", "flux"):
            assert r.run.noise_points == [0.3, 0.7]  # sigmas of timesteps 300 and 700
    # offline: the store rebuilds its model from model_index.json + the adapter snapshots and re-encodes a stored
    # image to its stored features; attribution fits and answers a query
    from montrage.attribution import Attributor, fit_attribution
    from montrage.encode import stable_seed
    from montrage.store_model import StoreModel

    ex = [monitor.source.examples[i] for i in monitor.monitored]
    px = monitor.source.pixels(monitor.monitored, 16)
    with StoreReader(str(tmp_path / "s.h5")) as r:
        sm = StoreModel(r)
        assert sm.family.name == FAMILY[name]
        # one wrapper: the store's model is the class the Monitor resolved, over the same denoiser architecture
        assert type(sm.model) is type(monitor.model)
        assert sm.model.identity()["unet_config_sha"] == monitor.model.identity()["unet_config_sha"]
        assert sm.model.snapshots is sm and sm.model.image_size == monitor.resolution
        again = sm.trajectory(px, [stable_seed(e.id) for e in ex], rows=[r.num_epochs - 1])
        layer = r.layers[0]
        np.testing.assert_allclose(again[layer][0], r.train_features(layer)[-1], rtol=2e-2, atol=2e-3)
    fit_attribution(str(tmp_path / "s.h5"), steps=5)
    att = Attributor.from_store(str(tmp_path / "s.h5"))
    try:
        result = att.query(px[:1], top_k=2)[0]
    finally:
        att.close()
    assert len(result["top_images"]) == 2 and set(result["concepts"]) == {"digit1", "digit7"}


def test_text_encoder_lora_is_snapshotted(family_dirs, data_root, tmp_path):
    _, _, monitor = family_loop(family_dirs["sdxl"], data_root, tmp_path / "s.h5", text_lora=True)
    with StoreReader(str(tmp_path / "s.h5")) as r:
        first, last = r.lora_params(0), r.lora_params(r.num_epochs - 1)
        te = [k for k in first if k.startswith("text_encoder::")]
        te2 = [k for k in first if k.startswith("text_encoder_2::")]
        assert te and te2 and any(not k.startswith("text_encoder") for k in first)
        assert any(not np.allclose(first[k], last[k]) for k in te + te2)  # the text encoders' adapters trained
        assert {"unet", "text_encoder", "text_encoder_2"} <= set(r.run.adapters)
        from montrage.store_model import StoreModel

        sm = StoreModel(r)  # restored offline: the text encoders carry the last snapshot's adapters
        sm.set_epoch(r.num_epochs - 1)
        from peft.utils import get_peft_model_state_dict

        restored = get_peft_model_state_dict(sm.model.parts["text_encoder_2"])
        for k in te2:
            np.testing.assert_array_equal(restored[k.split("::", 1)[1]].numpy(), last[k])


def test_unknown_model_and_other_family_store_are_refused(family_dirs, data_root, tmp_path):
    class Odd(torch.nn.Module):
        config = type("C", (), {"in_channels": 4, "sample_size": 8})()

    pipe = load_family(family_dirs["sd"])
    parts = dict(
        unet=Odd(), vae=pipe.vae, text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer, scheduler=pipe.scheduler
    )
    with pytest.raises(FamilyError, match="subclass montrage.family.Family"):
        Monitor(
            str(tmp_path / "x.h5"), parts, loops.DiskDataset(data_root), every_n_steps=1, **loops.monitor_args()
        ).start()
    family_loop(family_dirs["sd3"], data_root, tmp_path / "s.h5", steps=2)
    with pytest.raises(StoreMismatchError, match="family"):
        family_loop(family_dirs["flux"], data_root, tmp_path / "s.h5", steps=2)


@pytest.mark.parametrize("name", ["sdxl", "flux"])
def test_recipe_fine_tunes_the_family_with_the_callback(family_dirs, tmp_path, name):
    """DiffusionFineTune on SDXL and Flux (what sdxl-lora.yaml / flux-lora.yaml run), monitored, saving diffusers LoRA."""
    import helpers

    store = tmp_path / "s.h5"
    module = helpers.module(family_dirs[name], output_dir=str(tmp_path / "lora"), learning_rate=1e-2)
    assert module.family.name == name
    helpers.trainer(-1, [helpers.callback(store, every_n_steps=1)], max_steps=2).fit(module, helpers.data(batch_size=2))
    with StoreReader(str(store)) as r:
        assert list(r.global_steps) == [0, 1, 2] and r.spec["model"]["family"] == name
        assert any(not np.allclose(r.lora_params(0)[k], r.lora_params(2)[k]) for k in r.lora_params(0))
    assert (tmp_path / "lora" / "pytorch_lora_weights.safetensors").stat().st_size > 0


@pytest.mark.parametrize("name", ["sdxl", "sd3", "flux"])
def test_origin_features_through_the_family(family_dirs, data_root, tmp_path, name):
    """`montrage origin features` on a fine-tune of each family: loss and gradient families (the flow-matching loss
    for SD3/Flux), PIA noise and the base-model reference, from the LoRA the recipe saved."""
    import os

    import helpers
    from montrage.cli import main
    from montrage.origin.featurefile import read_features

    module = helpers.module(family_dirs[name], output_dir=str(tmp_path / "lora"), learning_rate=1e-2)
    helpers.trainer(-1, [], max_steps=2).fit(module, helpers.data(batch_size=2))
    images = [os.path.join(data_root, "digit7", f"{k}.png") for k in range(2)]
    out = tmp_path / "f.h5"
    assert (
        main(
            [
                "origin",
                "features",
                *images,
                "--model",
                family_dirs[name],
                "--lora",
                str(tmp_path / "lora"),
                "--out",
                str(out),
                "--t-grid",
                "100,600",
                "--resolution",
                "16",
                "--quiet",
            ]
        )
        == 0
    )
    fs = read_features(str(out))
    assert set(fs.values) >= {"loss", "grad_x", "grad_theta", "loss_pia", "loss_ref", "grad_x_ref"}
    for f, v in fs.values.items():
        assert v.shape == (2, 2) and np.isfinite(v).all() and (v > 0).all(), f
    assert not np.allclose(fs.values["loss"], fs.values["loss_ref"])  # the adapter changes the loss


@pytest.mark.parametrize("name", ["sdxl", "flux"])
def test_origin_model_from_the_store_per_family(family_dirs, data_root, tmp_path, name):
    """`store_diffusion_model` rebuilds an SDXL / Flux fine-tune from its store: its features equal those under the
    base + the LoRA file the recipe saved, and the training trajectory reads every stored adapter."""
    import os

    import helpers
    from montrage.origin.feature_set import FeatureSpec
    from montrage.origin.features import trajectory_features
    from montrage.origin.from_store import store_diffusion_model, store_feature_spec
    from montrage.origin.images import load_images
    from montrage.origin.model import load_diffusion_model

    store = tmp_path / "s.h5"
    module = helpers.module(family_dirs[name], output_dir=str(tmp_path / "lora"), learning_rate=1e-2)
    helpers.trainer(-1, [helpers.callback(store, every_n_steps=1)], max_steps=2).fit(module, helpers.data(batch_size=2))
    model = store_diffusion_model(str(store))
    pixels = load_images(
        [os.path.join(data_root, "digit7", f"{k}.png") for k in range(2)], model.image_size, resize=True
    )
    spec = FeatureSpec((100, 600), families=("loss", "grad_x", "loss_ref"))
    from_store = trajectory_features(model, pixels, spec, progress=False)
    from_file = trajectory_features(
        load_diffusion_model(family_dirs[name], lora=str(tmp_path / "lora"), resolution=model.image_size),
        pixels,
        spec,
        progress=False,
    )
    for f in spec.families:
        np.testing.assert_allclose(from_store.values[f], from_file.values[f], rtol=1e-4, err_msg=f)
    snap = store_feature_spec(model, ["loss", "loss_snapshots"], timesteps=2)
    fs = trajectory_features(model, pixels, snap, progress=False)
    assert snap.snapshots == (0, 1, 2) and fs.values["loss_snapshots"].shape == (2, 6)
    np.testing.assert_allclose(fs.values["loss_snapshots"][:, 4:], fs.values["loss"], rtol=1e-5)
