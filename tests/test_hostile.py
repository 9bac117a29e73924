"""Hostile inputs: damaged stores, failures and non-finite values during training, odd images, empty probe lists.

Each gives a clear error (naming file or field, and the fix) or a logged skip, and never a corrupted store; a
monitoring failure does not stop training unless strict=True.
"""

import logging
import os
import shutil
import subprocess
import sys

import h5py
import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from PIL import Image

import helpers
from helpers import epoch_arrays, make_spec
from montrage import monitor as cb_mod  # where the callback's monitoring work lives
from montrage.callbacks import MontrageCallback, MontrageConfigError
from montrage.data import DataError, load_image
from montrage.probes import ProbeError, load_probe_file
from montrage.store import StoreError, StoreReader, StoreWriter


class LossRecorder(pl.Callback):
    def __init__(self):
        self.losses = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.losses.append(float(outputs["loss"]))


def all_finite(path) -> bool:
    with StoreReader(str(path)) as r:
        arrays = [r.probe_features(layer) for layer in r.layers] + [r.train_features(layer) for layer in r.layers]
        arrays += [r.f["lora/params"][: r.num_epochs]]
    return all(np.isfinite(a).all() for a in arrays)


# --- failures during training ----------------------------------------------------------------------------------
def fail_second_call(monkeypatch):
    """generate_probes (the SD family's sampler) raises on its second call: the snapshot of epoch 1."""
    from montrage import generate

    real, calls = generate.generate_probes, []

    def flaky(*args, **kw):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("injected probe failure")
        return real(*args, **kw)

    monkeypatch.setattr(generate, "generate_probes", flaky)


def test_monitoring_failure_is_logged_and_training_goes_on(tiny_model_dir, tmp_path, monkeypatch, caplog):
    fail_second_call(monkeypatch)
    store, rec = tmp_path / "s.h5", LossRecorder()
    with caplog.at_level(logging.WARNING, logger=cb_mod.__name__):
        helpers.trainer(2, [rec, helpers.callback(store)]).fit(helpers.module(tiny_model_dir), helpers.data())
    assert len(rec.losses) == 4  # both epochs trained
    assert "the snapshot of epoch 1 failed and was skipped" in caplog.text and "injected probe failure" in caplog.text
    with StoreReader(str(store)) as r:
        assert list(r.epochs) == [0, 2]  # the failed snapshot is missing, the next one is there
        assert np.bincount(r.training_order()["epoch"]).tolist() == [6, 6]


def test_strict_monitoring_failure_stops_training(tiny_model_dir, tmp_path, monkeypatch):
    fail_second_call(monkeypatch)
    store, rec = tmp_path / "s.h5", LossRecorder()
    with pytest.raises(RuntimeError, match="injected probe failure"):
        helpers.trainer(2, [rec, helpers.callback(store, strict=True)]).fit(
            helpers.module(tiny_model_dir), helpers.data()
        )
    assert len(rec.losses) == 2  # stopped after the first epoch
    with StoreReader(str(store)) as r:  # closed cleanly, what was written is intact
        assert list(r.epochs) == [0]


class PoisonMidBlock(pl.Callback):
    """Makes the UNet's mid_block output NaN during the snapshot after the first epoch (not during training)."""

    def on_fit_start(self, trainer, pl_module):
        self.on = False
        pl_module.unet.mid_block.register_forward_hook(lambda m, i, out: out * float("nan") if self.on else None)

    def on_train_epoch_start(self, trainer, pl_module):
        self.on = False

    def on_train_epoch_end(self, trainer, pl_module):  # runs before MontrageCallback's (listed first)
        self.on = trainer.current_epoch == 0


@pytest.mark.parametrize("strict", [False, True])
def test_non_finite_activations_are_never_written(tiny_model_dir, tmp_path, caplog, strict):
    store, rec = tmp_path / "s.h5", LossRecorder()
    trainer = helpers.trainer(2, [PoisonMidBlock(), rec, helpers.callback(store, strict=strict)])
    with caplog.at_level(logging.WARNING, logger=cb_mod.__name__):
        if strict:
            with pytest.raises(cb_mod.MontrageSnapshotError, match="non-finite values, nothing written for epoch 1"):
                trainer.fit(helpers.module(tiny_model_dir), helpers.data())
        else:
            trainer.fit(helpers.module(tiny_model_dir), helpers.data())
    with StoreReader(str(store)) as r:
        assert list(r.epochs) == ([0] if strict else [0, 2])
    assert all_finite(store)
    if not strict:
        assert len(rec.losses) == 4 and np.isfinite(rec.losses).all()
        assert "layer 'mid_block', probes 3 of 3" in caplog.text and "training images 6 of 6" in caplog.text


def test_order_write_failure_is_skipped(tiny_model_dir, tmp_path, monkeypatch, caplog):
    def broken(self, *a, **kw):
        raise OSError("injected disk error")

    monkeypatch.setattr(StoreWriter, "append_order", broken)
    store = tmp_path / "s.h5"
    with caplog.at_level(logging.WARNING, logger=cb_mod.__name__):
        helpers.trainer(1, [helpers.callback(store)]).fit(helpers.module(tiny_model_dir), helpers.data())
    assert "recording the training order of epoch 0 failed" in caplog.text
    with StoreReader(str(store)) as r:
        assert list(r.epochs) == [0, 1] and len(r.training_order()["epoch"]) == 0


# --- configuration errors: raised before the first training step ----------------------------------------------
def test_empty_probe_lists_are_named(tmp_path):
    with pytest.raises(MontrageConfigError, match="probe_seeds is empty"):
        MontrageCallback(probe_seeds=[])
    with pytest.raises(MontrageConfigError, match="probe_prompts is empty"):
        MontrageCallback(probe_prompts=[])
    probe_file = tmp_path / "probes.yaml"
    probe_file.write_text("probes: []\n")
    with pytest.raises(ProbeError, match="probes.yaml.*field 'probes' is empty"):
        load_probe_file(str(probe_file), [0])
    probe_file.write_text("probes: [{prompt: a photo of one}]\nseeds: []\n")
    with pytest.raises(ProbeError, match="field 'seeds' is empty"):
        load_probe_file(str(probe_file))


@pytest.mark.parametrize("strategy", ["fsdp", "model_parallel", "deepspeed3"])
def test_sharded_strategies_are_refused_before_training(tmp_path, strategy):
    from types import SimpleNamespace

    from pytorch_lightning.strategies import DeepSpeedStrategy, FSDPStrategy, ModelParallelStrategy

    class ZeRO3(DeepSpeedStrategy):  # without the deepspeed package: only the stage matters here
        zero_stage_3 = True

        def __init__(self):
            pass

    made = {"fsdp": FSDPStrategy, "model_parallel": ModelParallelStrategy, "deepspeed3": ZeRO3}[strategy]()
    with pytest.raises(
        MontrageConfigError, match="does not support (FSDPStrategy|ModelParallelStrategy|ZeRO3).*strategy=.ddp."
    ):
        helpers.callback(tmp_path / "s.h5").setup(SimpleNamespace(strategy=made), None, "fit")
    assert not (tmp_path / "s.h5").exists()


@pytest.mark.parametrize("damage", ["nan", "grey"])
def test_bad_training_pixels_fail_before_training(tiny_model_dir, tmp_path, damage):
    """The monitor reads images from the source, not a pixel tensor: a non-finite image fails before training with
    its id named; a one-channel (grey) image is read as RGB."""
    from montrage.data import digits_pixels

    items = [
        {"image": digits_pixels([i], 16)[0], "caption": "a photo of one", "concept": "digit1", "id": f"d{i}"}
        for i in range(6)
    ]  # one per training example: the batches' `index` refers to them
    if damage == "nan":
        items[2]["image"][0, 2, 2] = float("nan")
    else:
        items[2]["image"] = items[2]["image"][:1]
    cb = helpers.callback(tmp_path / "s.h5", images=None)
    cb.images = items
    trainer = helpers.trainer(1, [cb])
    if damage == "nan":
        with pytest.raises(DataError, match="item 2: the image holds non-finite values"):
            trainer.fit(helpers.module(tiny_model_dir), helpers.data())
        assert not (tmp_path / "s.h5").exists()
    else:
        trainer.fit(helpers.module(tiny_model_dir), helpers.data())
        with StoreReader(str(tmp_path / "s.h5")) as r:
            assert r.num_train == 6 and np.isfinite(r.train_features("mid_block")).all()


def test_store_with_wrong_schema_version_is_refused_untouched(tiny_model_dir, tmp_path):
    store = tmp_path / "s.h5"
    helpers.trainer(1, [helpers.callback(store)]).fit(helpers.module(tiny_model_dir), helpers.data())
    with h5py.File(store, "a") as f:
        f.attrs["schema_version"] = 0
    before = store.read_bytes()
    with pytest.raises(StoreError, match="schema_version 0"):
        helpers.trainer(2, [helpers.callback(store)]).fit(helpers.module(tiny_model_dir), helpers.data())
    assert store.read_bytes() == before


# --- damaged store files ---------------------------------------------------------------------------------------
@pytest.fixture
def good_store(tmp_path):
    spec, path = make_spec(), tmp_path / "good.h5"
    w = StoreWriter(str(path), spec)
    for e in range(3):
        w.append_epoch(e, e, *epoch_arrays(spec, float(e)))
    w.close()
    return path


def damaged_copy(src, dst, at, data):
    shutil.copy(src, dst)
    with open(dst, "r+b") as fh:
        fh.seek(at)
        fh.write(data)
    return str(dst)


def test_truncated_store_is_named_for_reader_and_writer(good_store, tmp_path):
    for fraction in (0.9, 0.5, 0.05):
        cut = tmp_path / "cut.h5"
        shutil.copy(good_store, cut)
        os.truncate(cut, int(os.path.getsize(good_store) * fraction))
        with pytest.raises(StoreError, match="cut.h5.*is truncated"):
            StoreReader(str(cut))
        with pytest.raises(StoreError, match="is truncated"):
            StoreWriter(str(cut), make_spec(), truncate_to=(3, 0))
    cut.write_bytes(good_store.read_bytes()[:30])  # not even a whole superblock
    with pytest.raises(StoreError, match="not a readable HDF5 file"):
        StoreReader(str(cut))


def test_damaged_metadata_and_data_are_named(good_store, tmp_path):
    with h5py.File(good_store, "r") as f:
        chunk = f["train/features/mid_block"].id.get_chunk_info(1)
    bad = damaged_copy(good_store, tmp_path / "data.h5", chunk.byte_offset + 4, b"\xff" * 8)
    with StoreReader(bad) as r:  # metadata is fine; the damaged chunk fails its checksum when read
        with pytest.raises(StoreError, match="cannot read 'train/features/mid_block'.*damaged"):
            r.train_features("mid_block")
        assert r.probe_features("mid_block").shape[0] == 3  # the rest is readable
    # random bytes over the object headers after the superblock
    bad = damaged_copy(good_store, tmp_path / "meta.h5", 48, np.random.default_rng(0).bytes(400))
    with pytest.raises(StoreError, match="meta.h5.*(damaged|not a readable HDF5)"):
        StoreReader(bad)
    missing = tmp_path / "missing.h5"
    shutil.copy(good_store, missing)
    with h5py.File(missing, "a") as f:
        del f["order/example_index"]
    with pytest.raises(StoreError, match="lacks the dataset 'order/example_index'"):
        StoreReader(str(missing))


def test_random_bytes_with_an_hdf5_signature(tmp_path):
    junk = tmp_path / "junk.h5"
    junk.write_bytes(b"\x89HDF\r\n\x1a\n" + np.random.default_rng(1).bytes(4000))
    with pytest.raises(StoreError, match="junk.h5"):
        StoreReader(str(junk))
    with pytest.raises(StoreError, match="junk.h5"):
        StoreWriter(str(junk), make_spec(), truncate_to=(1, 0))


def test_a_reader_in_another_process_blocks_the_writer_with_a_clear_error(good_store):
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time, h5py; f = h5py.File(sys.argv[1], 'r'); print('open', flush=True); time.sleep(60)",
            str(good_store),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "open"
        with pytest.raises(StoreError, match="is open in another process"):
            StoreWriter(str(good_store), make_spec(), truncate_to=(3, 0))
    finally:
        holder.kill()
        holder.wait()
    with StoreReader(str(good_store)) as r:
        assert list(r.epochs) == [0, 1, 2]


# --- odd images ------------------------------------------------------------------------------------------------
def save(img, path, **kw):
    img.save(path, **kw)
    return str(path)


def test_images_of_any_mode_and_size_load_as_rgb(tmp_path):
    palette = Image.new("P", (20, 20), 0)
    palette.putpalette([255, 0, 0] + [0, 0, 0] * 255)  # index 0 is red
    cases = {
        "grey": (save(Image.new("L", (20, 20), 128), tmp_path / "l.png"), (128, 128, 128)),
        "grey-alpha": (save(Image.new("LA", (20, 20), (0, 0)), tmp_path / "la.png"), (255, 255, 255)),
        "transparent": (save(Image.new("RGBA", (20, 20), (255, 0, 0, 0)), tmp_path / "rgba.png"), (255, 255, 255)),
        "opaque-alpha": (save(Image.new("RGBA", (20, 20), (0, 0, 0, 255)), tmp_path / "opaque.png"), (0, 0, 0)),
        "palette": (save(palette, tmp_path / "p.png"), (255, 0, 0)),
        "palette-transparent": (save(palette, tmp_path / "pt.png", transparency=0), (255, 255, 255)),
        "16-bit": (save(Image.fromarray(np.full((20, 20), 32896, np.uint16)), tmp_path / "i16.png"), (128, 128, 128)),
        "cmyk": (save(Image.new("CMYK", (20, 20), (0, 255, 255, 0)), tmp_path / "c.jpg", quality=100), (255, 0, 0)),
        "1-bit": (save(Image.new("1", (20, 20), 1), tmp_path / "one.png"), (255, 255, 255)),
        "1x1": (save(Image.new("RGB", (1, 1), (0, 0, 255)), tmp_path / "tiny.png"), (0, 0, 255)),
        "wide": (save(Image.new("RGB", (3000, 40), (0, 255, 0)), tmp_path / "wide.png"), (0, 255, 0)),
    }
    for name, (path, rgb) in cases.items():
        x = load_image(path, 8)
        assert x.shape == (3, 8, 8) and torch.isfinite(x).all(), name
        got = ((x.mean(dim=(1, 2)) + 1) * 127.5).round().tolist()
        assert np.allclose(got, rgb, atol=3), (name, got)


def test_exif_rotation_is_applied(tmp_path):
    im = Image.new("RGB", (40, 20), (0, 0, 0))
    im.paste((255, 255, 255), (0, 0, 20, 20))  # white left half
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display": the white half ends up on top
    path = save(im, tmp_path / "rot.jpg", exif=exif, quality=100)
    x = load_image(path, 20)  # the centre crop of the 20x40 displayed image spans both halves
    assert x[:, :5].mean() > 0.8 and x[:, -5:].mean() < -0.8


def test_unreadable_images_are_named(tmp_path, monkeypatch):
    (tmp_path / "empty.png").write_bytes(b"")
    full = save(Image.new("RGB", (64, 64), (10, 20, 30)), tmp_path / "full.png")
    (tmp_path / "cut.png").write_bytes(open(full, "rb").read()[:60])
    for name in ("empty.png", "cut.png"):
        with pytest.raises(DataError, match=f"cannot read image .*{name}"):
            load_image(str(tmp_path / name), 8)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # a decompression bomb, scaled down
    with pytest.raises(DataError, match="full.png.*too large.*MAX_IMAGE_PIXELS"):
        load_image(full, 8)
