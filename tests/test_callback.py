import os
import time

import numpy as np
import pytest
import pytorch_lightning as pl
import torch

import helpers
from montrage.callbacks import MontrageCallback, MontrageConfigError
from montrage.capture import UnknownModuleError
from montrage.store import StoreMismatchError, StoreReader


class LossRecorder(pl.Callback):
    def __init__(self):
        self.losses = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.losses.append(float(outputs["loss"]))


def test_fit_writes_a_complete_store(tiny_model_dir, tmp_path):
    store = tmp_path / "store.h5"
    pl.seed_everything(0)
    helpers.trainer(2, [helpers.callback(store, layers=["mid_block", "up_blocks.0"])]).fit(
        helpers.module(tiny_model_dir), helpers.data()
    )
    with StoreReader(str(store)) as r:
        assert list(r.epochs) == [0, 1, 2]  # epoch 0 is before any update
        assert list(r.global_steps) == [0, 2, 4]
        assert len(r.probes) == 3  # 2 concepts + 1 mixture, 1 seed
        assert r.probe_features("mid_block").shape == (3, 3, 2, 64)
        assert r.train_features("up_blocks.0").shape[:3] == (3, 6, 2)
        order = r.training_order()
        assert len(order["example_index"]) == 12 and sorted(order["example_index"][:6]) == list(range(6))
        assert r.probe_images().shape == (3, 3, 8, 8, 3)
        first, last = r.lora_params(0), r.lora_params(2)
        assert first and any(not np.allclose(first[k], last[k]) for k in first)  # the adapter moved
        # training images are encoded with a fixed epsilon: the untrained base sees the same features each epoch
        assert not np.allclose(r.train_features("mid_block")[0], r.train_features("mid_block")[2])


def test_training_is_bit_identical_with_and_without_callback(tiny_model_dir, tmp_path):
    def run(with_callback):
        pl.seed_everything(123)
        rec = LossRecorder()
        cbs = [rec] + ([helpers.callback(tmp_path / "s.h5", overwrite=True)] if with_callback else [])
        m = helpers.module(tiny_model_dir, lora_dropout=0.1)
        helpers.trainer(2, cbs).fit(m, helpers.data())
        return rec.losses, {k: v.detach().clone() for k, v in m.unet.named_parameters() if v.requires_grad}

    plain, params_plain = run(False)
    monitored, params_monitored = run(True)
    assert len(plain) == 4 and plain == monitored
    for k in params_plain:
        assert torch.equal(params_plain[k], params_monitored[k])


def test_resume_truncates_store_to_checkpoint(tiny_model_dir, tmp_path):
    store, ckpts = tmp_path / "s.h5", tmp_path / "ckpt"
    pl.seed_everything(0)
    saver = pl.callbacks.ModelCheckpoint(dirpath=str(ckpts), save_top_k=-1, every_n_epochs=1, filename="{epoch}")
    helpers.trainer(3, [helpers.callback(store), saver], enable_checkpointing=True).fit(
        helpers.module(tiny_model_dir), helpers.data()
    )
    with StoreReader(str(store)) as r:
        assert list(r.epochs) == [0, 1, 2, 3]
    ckpt = torch.load(ckpts / "epoch=0.ckpt", weights_only=False)
    assert all(k.endswith("weight") and "lora" in k for k in ckpt["state_dict"])  # only the adapter is checkpointed
    # resume after epoch 1 (store snapshots 0 and 1); the store's later rows must be replaced, not duplicated
    helpers.trainer(4, [helpers.callback(store)], enable_checkpointing=False).fit(
        helpers.module(tiny_model_dir), helpers.data(), ckpt_path=str(ckpts / "epoch=0.ckpt")
    )
    with StoreReader(str(store)) as r:
        assert list(r.epochs) == [0, 1, 2, 3, 4]
        order = r.training_order()
        assert order["epoch"].tolist() == sorted(order["epoch"].tolist())
        assert np.bincount(order["epoch"]).tolist() == [6, 6, 6, 6]


def test_refuses_store_made_by_another_run(tiny_model_dir, tmp_path):
    store = tmp_path / "s.h5"
    helpers.trainer(1, [helpers.callback(store)]).fit(helpers.module(tiny_model_dir), helpers.data())
    size = os.path.getsize(store)
    with pytest.raises(StoreMismatchError, match="probes"):
        helpers.trainer(1, [helpers.callback(store, probe_seeds=[5, 6])]).fit(
            helpers.module(tiny_model_dir), helpers.data()
        )
    with StoreReader(str(store)) as r:
        assert list(r.epochs) == [0, 1]
    assert os.path.getsize(store) == size


def test_unknown_hooked_module_fails_before_training(tiny_model_dir, tmp_path):
    with pytest.raises(UnknownModuleError, match="mid_blok"):
        helpers.trainer(1, [helpers.callback(tmp_path / "s.h5", layers=["mid_blok"])]).fit(
            helpers.module(tiny_model_dir), helpers.data()
        )
    assert not (tmp_path / "s.h5").exists()


def test_module_without_diffusers_parts_is_refused(tmp_path):
    class Plain(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.layer = torch.nn.Linear(2, 2)

    with pytest.raises(MontrageConfigError, match="unet"):
        helpers.callback(tmp_path / "s.h5").setup(None, Plain(), "fit")
    with pytest.raises(MontrageConfigError, match="every_n_epochs"):
        MontrageCallback(every_n_epochs=0)


def test_probe_prompts_get_concept_weights_from_tokens(tiny_model_dir, tmp_path):
    store = tmp_path / "s.h5"
    cb = helpers.callback(
        store, probe_prompts=["a photo of seven", "one and seven", "a photo of a digit"], every_n_epochs=2
    )
    helpers.trainer(1, [cb]).fit(helpers.module(tiny_model_dir), helpers.data())
    with StoreReader(str(store)) as r:
        assert r.f["probes/weights"][...].tolist() == [[0.0, 1.0], [0.5, 0.5], [0.0, 0.0]]
        assert list(r.epochs) == [0, 1]  # every_n_epochs=2, but the last epoch is always kept


def test_wandb_offline_logging(tiny_model_dir, tmp_path, monkeypatch):
    import wandb
    from pytorch_lightning.loggers import WandbLogger

    monkeypatch.setenv("WANDB_MODE", "offline")
    logger = WandbLogger(project="montrage-test", save_dir=str(tmp_path), offline=True)
    store = tmp_path / "s.h5"
    cb = helpers.callback(store, log_to_wandb=True)
    helpers.trainer(2, [cb], logger=logger).fit(helpers.module(tiny_model_dir), helpers.data())
    logger.experiment.finish()
    # finish() can return before wandb's service has closed the run's transaction log (it is written in blocks):
    # teardown stops the service, and the log is read until its records are there or a minute has passed.
    wandb.teardown()
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert runs, "no offline W&B run written"
    deadline = time.monotonic() + 60
    while True:
        blob = b"".join(p.read_bytes() for run in runs for p in run.rglob("*.wandb"))
        if b"montrage-store" in blob or time.monotonic() > deadline:
            break
        time.sleep(1)
    assert b"montrage/similarity/digit1/digit7" in blob
    assert b"montrage-store" in blob  # the store artifact


def test_lora_weights_reload_into_a_pipeline_and_change_outputs(tiny_model_dir, tmp_path):
    from diffusers import StableDiffusionPipeline

    from montrage.generate import build_pipeline, generate_probes
    from montrage.probes import ProbeSet

    pl.seed_everything(0)
    m = helpers.module(tiny_model_dir, learning_rate=5e-2, output_dir=str(tmp_path / "lora"))
    helpers.trainer(2).fit(m, helpers.data())
    assert (tmp_path / "lora" / "pytorch_lora_weights.safetensors").is_file()
    probes = ProbeSet(("a photo of one",), ({},), (3,))
    pipe = StableDiffusionPipeline.from_pretrained(tiny_model_dir, safety_checker=None, requires_safety_checker=False)
    p = build_pipeline(pipe.tokenizer, pipe.text_encoder, pipe.vae, pipe.unet, pipe.scheduler)
    base = generate_probes(p, probes, 16, 4, 2.0)
    pipe.load_lora_weights(str(tmp_path / "lora"))
    p = build_pipeline(pipe.tokenizer, pipe.text_encoder, pipe.vae, pipe.unet, pipe.scheduler)
    adapted = generate_probes(p, probes, 16, 4, 2.0)
    m.eval()
    mine = generate_probes(m.pipeline(), probes, 16, 4, 2.0)
    assert (adapted - base).abs().max() > 1e-3
    torch.testing.assert_close(adapted, mine, rtol=1e-4, atol=1e-4)
