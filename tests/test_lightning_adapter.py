"""MontrageCallback on LightningModules that name their parts their own way, with a dict dataset and max_steps."""

import os

import numpy as np
import pytest
import pytorch_lightning as pl
import torch

import helpers
import loops
from montrage.callbacks import MontrageConfigError
from montrage.store import StoreReader


class PipeModule(pl.LightningModule):
    """Holds a diffusers pipeline as `self.pipe` (or its parts under `self.model`, with `nested=True`)."""

    def __init__(self, model_dir, nested=False, wrap=None):
        super().__init__()
        pipe = loops.lora_pipeline(model_dir)
        if nested:
            self.model = torch.nn.Module()
            self.model.unet, self.model.vae, self.model.text_encoder = pipe.unet, pipe.vae, pipe.text_encoder
            self.model.tokenizer, self.model.sched = pipe.tokenizer, pipe.scheduler
        else:
            self.pipe = pipe
        self._pipe, self.wrap = pipe, wrap

    def training_step(self, batch, batch_idx):
        return loops.loss_of(self._pipe, batch)

    def configure_optimizers(self):
        return torch.optim.AdamW([p for p in self._pipe.unet.parameters() if p.requires_grad], lr=1e-2)

    def train_dataloader(self):
        loader = torch.utils.data.DataLoader(
            loops.DiskDataset(self.data_root), batch_size=2, shuffle=True, collate_fn=loops.train_collate
        )
        return self.wrap(loader) if self.wrap is not None else loader


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    return loops.write_digit_folder(tmp_path_factory.mktemp("digits"), per_concept=3)


def fit(module, data_root, cb, max_steps=5):
    module.data_root = data_root
    helpers.trainer(-1, [cb], max_steps=max_steps).fit(module)


@pytest.mark.parametrize("layout", ["pipe", "nested"])
def test_parts_found_by_pipeline_or_dotted_paths_snapshot_at_steps(tiny_model_dir, data_root, tmp_path, layout, caplog):
    store = tmp_path / "s.h5"
    components = None
    if layout == "nested":
        components = {
            k: f"model.{v}"
            for k, v in (
                ("unet", "unet"),
                ("vae", "vae"),
                ("text_encoder", "text_encoder"),
                ("tokenizer", "tokenizer"),
                ("scheduler", "sched"),
            )
        }
    cb = helpers.callback(store, every_n_steps=2, components=components)
    module = PipeModule(
        tiny_model_dir, nested=layout == "nested", wrap=cb.wrap_dataloader if layout == "pipe" else None
    )
    fit(module, data_root, cb)
    with StoreReader(str(store)) as r:
        assert list(r.global_steps) == [0, 2, 4, 5]  # max_steps=5 with max_epochs=-1: step 0, every 2, the final
        order = r.training_order()
        if layout == "pipe":  # the wrapped loader gives the order although the collate drops every key
            assert np.bincount(order["global_step"]).tolist()[1:] == [2, 2, 2, 2, 2]
            assert sorted(order["example_index"][:6].tolist()) == list(range(6))
        else:
            assert len(order["example_index"]) == 0
    if layout == "nested":
        assert caplog.text.count("carry no dataset indices") == 1  # warned once


def test_module_without_a_denoiser_is_refused_naming_the_fix(tiny_model_dir, tmp_path, data_root):
    module = PipeModule(tiny_model_dir, nested=True)
    with pytest.raises(MontrageConfigError, match="lacks denoiser.*components: \\{unet: model.unet"):
        fit(module, data_root, helpers.callback(tmp_path / "s.h5"))
    with pytest.raises(MontrageConfigError, match="no attribute path 'model.unett'"):
        fit(module, data_root, helpers.callback(tmp_path / "s.h5", components={"unet": "model.unett"}))
    assert not (tmp_path / "s.h5").exists()
    with pytest.raises(MontrageConfigError, match="never fires before the final step 5"):  # known at train start
        fit(PipeModule(tiny_model_dir), data_root, helpers.callback(tmp_path / "s.h5", at_steps=[10]))


def test_subset_store_serves_guard_curves_and_report(tiny_model_dir, tmp_path):
    from montrage.callbacks import AttributionCurves, MemorizationGuard
    from montrage.report import build_report

    store = tmp_path / "s.h5"
    guard, curves = MemorizationGuard(pixel_threshold=0.5), AttributionCurves(fit_steps=5)
    cb = helpers.callback(store, monitor_images=4, every_n_steps=1)
    helpers.trainer(2, [cb, guard, curves]).fit(helpers.module(tiny_model_dir), helpers.data())
    with StoreReader(str(store)) as r:
        assert list(r.global_steps) == [0, 1, 2, 3, 4] and r.num_train == 4 and len(r.all_train) == 6
        monitored = [e.id for e in r.train]
    assert [h["global_step"] for h in guard.history] == [0, 1, 2, 3, 4]  # every step-scheduled snapshot checked
    assert all(a["train_id"] in monitored for a in guard.alerts)
    assert curves.last is not None and curves.last["scores"].shape[-1] == 2  # two concepts
    build_report(str(store), str(tmp_path / "r.html"))
    assert os.path.getsize(tmp_path / "r.html") > 1000
