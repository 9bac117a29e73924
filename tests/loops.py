"""Training loops as users write them, without Lightning: a plain PyTorch loop and a diffusers-script-shaped
accelerate loop, each over a dict dataset streamed from disk whose collate drops every key but the tensors."""

import os
import time

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from montrage.data import digits_pixels, to_thumbnails

LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]


def write_digit_folder(root, per_concept=3, digits=(1, 7), size=16, odd_sizes=False) -> str:
    """root/<digitK>/<i>.png with a sidecar caption; with `odd_sizes` some images are non-square or larger."""
    from montrage.data import digit_token, sklearn_digits

    target = sklearn_digits()[1]
    for d in digits:
        folder = os.path.join(root, f"digit{d}")
        os.makedirs(folder, exist_ok=True)
        for k, i in enumerate(np.flatnonzero(target == d)[:per_concept]):
            side = size * (2 if odd_sizes and k % 2 else 1)
            im = Image.fromarray(to_thumbnails(digits_pixels([int(i)], side), side)[0])
            if odd_sizes and k % 3 == 2:
                im = im.resize((side + 6, side))  # non-square
            im.save(os.path.join(folder, f"{k}.png"))
            with open(os.path.join(folder, f"{k}.txt"), "w") as fh:
                fh.write(f"a photo of {digit_token(d)}")
    return str(root)


class DiskDataset(torch.utils.data.Dataset):
    """Dict items read from disk at each access: {'image': PIL, 'caption', 'id', 'concept'}."""

    def __init__(self, root):
        self.items = []
        for concept in sorted(os.listdir(root)):
            for f in sorted(os.listdir(os.path.join(root, concept))):
                if f.endswith(".png"):
                    self.items.append((os.path.join(root, concept, f), concept))

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        path, concept = self.items[i]
        with open(os.path.splitext(path)[0] + ".txt") as fh:
            caption = fh.read().strip()
        return {
            "image": Image.open(path),
            "caption": caption,
            "id": os.path.relpath(path, os.path.dirname(os.path.dirname(path))),
            "concept": concept,
        }


def train_collate(items, size=16):
    """What a diffusers script's collate does: transformed pixels (with a random flip: it draws from the global RNG)
    and the captions; every other key is dropped."""
    pixels = []
    for it in items:
        x = torch.from_numpy(np.asarray(it["image"].convert("RGB").resize((size, size)), dtype=np.float32).copy())
        x = x.permute(2, 0, 1) / 127.5 - 1.0
        if torch.rand(()) < 0.5:
            x = x.flip(-1)
        pixels.append(x)
    return {"pixel_values": torch.stack(pixels), "caption": [it["caption"] for it in items]}


def lora_pipeline(model_dir, dropout=0.1):
    from diffusers import StableDiffusionPipeline
    from peft import LoraConfig

    pipe = StableDiffusionPipeline.from_pretrained(model_dir, safety_checker=None, requires_safety_checker=False)
    for part in (pipe.unet, pipe.vae, pipe.text_encoder):
        part.requires_grad_(False)
    torch.manual_seed(0)
    pipe.unet.add_adapter(
        LoraConfig(r=4, lora_alpha=4, init_lora_weights="gaussian", target_modules=LORA_TARGETS, lora_dropout=dropout)
    )
    return pipe


def loss_of(pipe, batch, unet=None):
    """The diffusers text-to-image LoRA loss of one batch (`unet`: the prepared, e.g. DDP-wrapped, denoiser)."""
    from montrage.components import embed_prompts

    unet, vae, sched = unet or pipe.unet, pipe.vae, pipe.scheduler
    with torch.no_grad():
        latents = vae.encode(batch["pixel_values"]).latent_dist.sample() * vae.config.scaling_factor
        cond = embed_prompts(pipe.tokenizer, pipe.text_encoder, batch["caption"])
    noise = torch.randn_like(latents)
    t = torch.randint(0, sched.config.num_train_timesteps, (len(latents),))
    pred = unet(sched.add_noise(latents, noise, t), t, encoder_hidden_states=cond).sample
    return F.mse_loss(pred.float(), noise.float())


def monitor_args(**kw):
    args = dict(
        probe_seeds=[0],
        num_inference_steps=2,
        guidance_scale=1.0,
        timesteps=[300, 700],
        thumbnail_size=8,
        log_to_wandb=False,
        progress=False,
        mode="inline",
    )
    args.update(kw)
    return args


def plain_loop(model_dir, data_root, store=None, steps=5, seed=0, batch_size=2, pause=0.0, **monitor_kw):
    """A plain PyTorch LoRA loop; with `store`, monitored with the six lines of the README snippet. Returns (losses, lora, monitor)."""
    from montrage import Monitor

    torch.manual_seed(seed)
    pipe = lora_pipeline(model_dir)
    dataset = DiskDataset(data_root)
    loader = torch.utils.data.DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=True,
        collate_fn=train_collate,
        generator=torch.Generator().manual_seed(seed),
    )
    monitor = None
    if store is not None:
        monitor = Monitor(str(store), pipe, dataset, **monitor_args(**monitor_kw))
        loader = monitor.wrap_dataloader(loader)
        monitor.start()
    params = [p for p in pipe.unet.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-2)
    pipe.unet.train()
    losses, step = [], 0
    while step < steps:
        for batch in loader:
            loss = loss_of(pipe, batch)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(float(loss))
            step += 1
            if monitor is not None:
                monitor.on_batch(batch, step)
                monitor.maybe_snapshot(step)
            time.sleep(pause)  # a slower run, for tests that follow it from another process
            if step >= steps:
                break
    if monitor is not None:
        monitor.close(step)
    lora = {n: p.detach().clone() for n, p in pipe.unet.named_parameters() if p.requires_grad}
    return losses, lora, monitor


class EpochSampler(torch.utils.data.Sampler):
    """A random permutation per epoch, fixed by (seed, epoch): the order a resumed run sees can be predicted."""

    def __init__(self, n, seed=0):
        self.n, self.seed, self.epoch = n, seed, 0

    def set_epoch(self, epoch):
        self.epoch = epoch

    def permutation(self, epoch):
        return torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed * 1000 + epoch)).tolist()

    def __iter__(self):
        self.last = self.permutation(self.epoch)  # what this pass yields (accelerate sets the epoch as it iterates)
        return iter(self.last)

    def __len__(self):
        return self.n


def accelerate_loop(
    model_dir,
    data_root,
    store,
    out_dir,
    epochs=2,
    accumulation=2,
    batch_size=2,
    resume_from=None,
    save_at=None,
    stop_at=None,
    lr=1e-2,
    register=True,
    **monitor_kw,
):
    """The shape of diffusers' train_text_to_image_lora.py with montrage's six added lines (marked)."""
    from accelerate import Accelerator

    from montrage import Monitor

    accelerator = Accelerator(cpu=True, gradient_accumulation_steps=accumulation)
    torch.manual_seed(0)
    pipe = lora_pipeline(model_dir, dropout=0.0)
    dataset = DiskDataset(data_root)
    sampler = EpochSampler(len(dataset))
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, sampler=sampler, collate_fn=train_collate)
    monitor = Monitor(str(store), pipe, dataset, **monitor_args(**monitor_kw))  # montrage (1)
    loader = monitor.wrap_dataloader(loader)
    opt = torch.optim.AdamW([p for p in pipe.unet.parameters() if p.requires_grad], lr=lr)
    unet, opt, loader = accelerator.prepare(pipe.unet, opt, loader)
    if register:
        accelerator.register_for_checkpointing(monitor)  # montrage (2): exact resume (without it: cut by step)
    global_step, first_epoch, skip = 0, 0, 0
    steps_per_epoch = -(-len(loader) // accumulation)
    if resume_from is not None:
        accelerator.load_state(resume_from)
        global_step = int(os.path.basename(resume_from).split("-")[1])
        first_epoch, done = divmod(global_step, steps_per_epoch)
        skip = done * accumulation
    monitor.start(step=global_step, epoch=first_epoch)  # montrage (3)
    seen = []  # (step, dataset index) as the test knows them: the sampler's permutation
    for epoch in range(first_epoch, epochs):
        sampler.set_epoch(epoch)
        active = accelerator.skip_first_batches(loader, skip) if epoch == first_epoch and skip else loader
        for k, batch in enumerate(active, start=skip if epoch == first_epoch else 0):
            with accelerator.accumulate(unet):
                loss = loss_of(pipe, batch, unet)
                accelerator.backward(loss)
                opt.step()
                opt.zero_grad()
            monitor.on_batch(batch)  # montrage (4)
            step_of_batch = epoch * steps_per_epoch + k // accumulation + 1
            seen += [(step_of_batch, i) for i in sampler.last[k * batch_size : (k + 1) * batch_size]]
            if accelerator.sync_gradients:
                global_step += 1
                monitor.maybe_snapshot(global_step, epoch=epoch + 1 if k + 1 == len(loader) else None)  # montrage (5)
                if save_at is not None and global_step == save_at:
                    accelerator.save_state(os.path.join(out_dir, f"checkpoint-{global_step}"))
                if stop_at is not None and global_step == stop_at:
                    monitor.close()  # a crash: the store is closed without a final snapshot
                    return seen, monitor
    monitor.close(global_step)  # montrage (6)
    accelerator.end_training()
    return seen, monitor
