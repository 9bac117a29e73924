"""The framework-free Monitor: plain and accelerate loops, any image source, stable subsets, the latent cache, the
schedule and its errors."""

import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import loops
from montrage import Monitor
from montrage.components import ModelLoadError
from montrage.data import DataError
from montrage.monitor import MontrageConfigError
from montrage.store import StoreReader


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    return loops.write_digit_folder(tmp_path_factory.mktemp("digits"), per_concept=3)


def test_plain_loop_is_bit_identical_and_its_store_answers_queries(tiny_model_dir, data_root, tmp_path):
    plain_losses, plain_lora, _ = loops.plain_loop(tiny_model_dir, data_root)
    store = tmp_path / "store.h5"
    losses, lora, monitor = loops.plain_loop(
        tiny_model_dir, data_root, store, every_n_steps=2, max_steps=5, monitor_images=4
    )
    assert losses == plain_losses
    for k in plain_lora:
        assert torch.equal(plain_lora[k], lora[k]), k
    with StoreReader(str(store)) as r:
        assert list(r.global_steps) == [0, 2, 4, 5]  # step 0, every 2 steps, the final step
        assert len(r.all_train) == 6 and r.num_train == 4 and len(r.train) == 4  # a stable subset of 4 of 6
        assert r.probe_features("mid_block").shape[:2] == (4, 3)
        assert r.train_features("mid_block").shape[:2] == (4, 4)
        order = r.training_order()
        ids = [e.id for e in r.all_train]
        assert order["global_step"].tolist() == sorted(order["global_step"].tolist())
        assert np.bincount(order["global_step"]).tolist()[1:] == [2, 2, 2, 2, 2]  # each step saw its batch of 2
        assert sorted(order["example_index"][:6].tolist()) == list(range(6))  # epoch 1: every image once
        assert all(ids[i].startswith("digit") for i in order["example_index"])
    from montrage.cli import main

    assert main(["attribute", "fit", str(store), "--steps", "20"]) == 0
    query = os.path.join(data_root, "digit7", "0.png")
    assert main(["attribute", "query", str(store), query, "--json", "--plot", str(tmp_path / "q.png")]) == 0
    assert (tmp_path / "q.png").stat().st_size > 0


def test_accelerate_loop_order_and_resume(tiny_model_dir, data_root, tmp_path):
    """Gradient accumulation 2: each micro-batch is recorded at the optimizer step it counts toward; a run resumed
    from `save_state` after a crash keeps every snapshot and order row once."""
    full_store = tmp_path / "full.h5"
    seen, _ = loops.accelerate_loop(tiny_model_dir, data_root, full_store, tmp_path / "a", every_n_steps=1)
    with StoreReader(str(full_store)) as r:
        order = r.training_order()
        assert list(zip(order["global_step"].tolist(), order["example_index"].tolist())) == sorted(seen)
        assert list(r.global_steps) == [0, 1, 2, 3, 4]
        assert order["epoch"].tolist() == [0] * 6 + [1] * 6

    store = tmp_path / "crash.h5"
    first, _ = loops.accelerate_loop(
        tiny_model_dir, data_root, store, tmp_path / "b", every_n_steps=1, save_at=2, stop_at=3
    )
    with StoreReader(str(store)) as r:
        assert list(r.global_steps) == [0, 1, 2, 3]  # the crashed run got past its checkpoint
    second, _ = loops.accelerate_loop(
        tiny_model_dir,
        data_root,
        store,
        tmp_path / "c",
        every_n_steps=1,
        resume_from=str(tmp_path / "b" / "checkpoint-2"),
    )
    with StoreReader(str(store)) as r:
        assert list(r.global_steps) == [0, 1, 2, 3, 4]  # step 3 once, from the resumed run
        order = r.training_order()
        got = list(zip(order["global_step"].tolist(), order["example_index"].tolist()))
    assert got == sorted([row for row in first if row[0] <= 2] + second)
    assert sorted(i for s, i in got if s > 2) == list(range(6))
    # without register_for_checkpointing the resumed monitor cuts the store back by step: the same result here
    store2 = tmp_path / "crash2.h5"
    first, _ = loops.accelerate_loop(
        tiny_model_dir, data_root, store2, tmp_path / "d", every_n_steps=1, save_at=2, stop_at=3, register=False
    )
    second, _ = loops.accelerate_loop(
        tiny_model_dir,
        data_root,
        store2,
        tmp_path / "e",
        every_n_steps=1,
        resume_from=str(tmp_path / "d" / "checkpoint-2"),
        register=False,
    )
    with StoreReader(str(store2)) as r:
        assert list(r.global_steps) == [0, 1, 2, 3, 4]
        order = r.training_order()
        assert list(zip(order["global_step"].tolist(), order["example_index"].tolist())) == sorted(
            [row for row in first if row[0] <= 2] + second
        )


def test_two_process_accelerate_run_stores_what_one_process_computes(tiny_model_dir, data_root, tmp_path):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    store = tmp_path / "ddp.h5"
    script = os.path.join(os.path.dirname(__file__), "accelerate_fit.py")
    procs = []
    for rank in range(2):
        env = dict(
            os.environ,
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=str(port),
            WORLD_SIZE="2",
            RANK=str(rank),
            LOCAL_RANK=str(rank),
            LOCAL_WORLD_SIZE="2",
            OMP_NUM_THREADS="1",
            PYTHONUNBUFFERED="1",
        )
        procs.append(
            subprocess.Popen(
                [sys.executable, script, tiny_model_dir, data_root, str(store), str(tmp_path)],
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
                env=env,
            )
        )
    outs = [p.communicate(timeout=600)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), "\n".join(o[-3000:] for o in outs)
    assert "rank 0 done" in outs[0] and "rank 1 done" in outs[1]
    assert sorted(p.name for p in tmp_path.iterdir() if p.suffix == ".h5") == ["ddp.h5"]  # one writer
    with StoreReader(str(store)) as r:
        assert list(r.global_steps) == [0, 2, 4]  # 3 batches split over 2 ranks: 2 steps per epoch
        order = r.training_order()
        for e in (0, 1):  # the two ranks together saw every image each epoch
            assert set(order["example_index"][order["epoch"] == e].tolist()) == set(range(6))
        rows = [
            (r.lora_params(k), r.probe_features("mid_block")[k], r.train_features("mid_block")[k]) for k in range(3)
        ]
    assert any(not np.allclose(rows[0][0][k], rows[2][0][k]) for k in rows[0][0])  # the adapter trained
    from peft import set_peft_model_state_dict

    for k, (lora, probe, train) in enumerate(rows):
        pipe = loops.lora_pipeline(tiny_model_dir, dropout=0.0)
        set_peft_model_state_dict(pipe.unet, {n: torch.from_numpy(np.ascontiguousarray(v)) for n, v in lora.items()})
        single = Monitor(
            str(tmp_path / f"single{k}.h5"),
            pipe,
            loops.DiskDataset(data_root),
            every_n_steps=1,
            **loops.monitor_args(probe_seeds=[0, 1]),
        )
        single.start()
        single.close()
        with StoreReader(str(tmp_path / f"single{k}.h5")) as s:
            np.testing.assert_allclose(s.probe_features("mid_block")[0], probe, rtol=1e-2, atol=1e-3)
            np.testing.assert_allclose(s.train_features("mid_block")[0], train, rtol=1e-2, atol=1e-3)


def test_vae_encodes_each_monitored_image_once(tiny_model_dir, data_root, tmp_path):
    pipe = loops.lora_pipeline(tiny_model_dir)
    calls = []
    real = pipe.vae.encode

    def counting(x, *a, **k):
        calls.append(len(x))
        return real(x, *a, **k)

    pipe.vae.encode = counting
    m = Monitor(str(tmp_path / "s.h5"), pipe, loops.DiskDataset(data_root), every_n_steps=1, **loops.monitor_args())
    m.start()
    for step in (1, 2, 3):
        m.maybe_snapshot(step)
    m.close()
    probes = len(m.probes)
    assert sum(calls) == 6 + 4 * probes  # the 6 images once (the cache), the probe generations at each of 4 snapshots
    assert os.listdir(tmp_path / "s_latents")
    # a second run with the same VAE and images reuses the cache: only probes are encoded
    calls.clear()
    m2 = Monitor(
        str(tmp_path / "s.h5"),
        pipe,
        loops.DiskDataset(data_root),
        every_n_steps=1,
        overwrite=True,
        **loops.monitor_args(),
    )
    m2.start()
    m2.close()
    assert sum(calls) == probes


def test_sources_folder_paths_dicts_and_hf(tmp_path):
    from montrage.sources import image_source

    root = loops.write_digit_folder(tmp_path / "f", per_concept=3, odd_sizes=True)
    src = image_source(root)
    assert [e.id for e in src.examples][:2] == ["digit1/0.png", "digit1/1.png"] and src.examples[0].concept == "digit1"
    assert src.examples[0].caption == "a photo of one"
    px = src.pixels([0, 1, 2], 16)  # square 16, square 32 and a non-square image: all 16 x 16 in [-1, 1]
    assert px.shape == (3, 3, 16, 16) and px.min() >= -1 and px.max() <= 1
    flat = tmp_path / "flat"
    flat.mkdir()
    for name in ("a.png", "b.png"):
        os.link(os.path.join(root, "digit7", "0.png"), flat / name)
    (flat / "a.txt").write_text("a sidecar caption")
    fs = image_source(str(flat))
    assert [(e.id, e.caption, e.concept) for e in fs.examples] == [
        ("a.png", "a sidecar caption", "flat"),
        ("b.png", "", "flat"),
    ]
    ps = image_source([str(flat / "b.png")])
    assert ps.examples[0].id == str(flat / "b.png") and ps.examples[0].concept == "flat"
    # dict items with tensors and no id: content ids, stable and distinct
    tensors = [torch.rand(3, 20, 24) * 2 - 1 for _ in range(3)]
    ds = [{"img": t, "text": f"cap {i}"} for i, t in enumerate(tensors)]
    d1, d2 = (
        image_source(ds, image_key="img", caption_key="text"),
        image_source(list(ds), image_key="img", caption_key="text"),
    )
    assert [e.id for e in d1.examples] == [e.id for e in d2.examples] and len({e.id for e in d1.examples}) == 3
    assert d1.examples[1].caption == "cap 1" and d1.pixels([1], 8).shape == (1, 3, 8, 8)
    import datasets

    hf = datasets.Dataset.from_dict(
        {
            "image": [os.path.join(root, "digit7", f"{k}.png") for k in range(3)],
            "text": ["x", "y", "z"],
            "who": ["a", "b", "a"],
        }
    ).cast_column("image", datasets.Image())
    hs = image_source(hf, concept_key="who")
    assert [e.caption for e in hs.examples] == ["x", "y", "z"] and [e.concept for e in hs.examples] == ["a", "b", "a"]
    assert hs.examples[0].id.endswith("0.png") and hs.pixels([2], 16).shape == (1, 3, 16, 16)


def test_stable_subset_across_orders_and_appends():
    from montrage.data import TrainExample
    from montrage.sources import select_monitored

    ex = [TrainExample(f"c{i % 3}/{i}.png", f"c{i % 3}", "") for i in range(60)]
    rng = np.random.default_rng(0)
    shuffled = [ex[i] for i in rng.permutation(60)]
    for spec in (12, 0.3, ["c0/0.png", "c1/4.png"]):
        a = {ex[i].id for i in select_monitored(ex, spec, seed=3)}
        b = {shuffled[i].id for i in select_monitored(shuffled, spec, seed=3)}
        assert a == b
    counts = np.bincount([int(ex[i].concept[1]) for i in select_monitored(ex, 12, seed=3)])
    assert counts.tolist() == [4, 4, 4]  # stratified by concept
    assert {ex[i].id for i in select_monitored(ex, 12, seed=3)} != {ex[i].id for i in select_monitored(ex, 12, seed=4)}
    more = ex + [TrainExample(f"c{i % 3}/{i}.png", f"c{i % 3}", "") for i in range(60, 90)]
    before = {ex[i].id for i in select_monitored(ex, 0.3)}
    after = {more[i].id for i in select_monitored(more, 0.3)}
    assert before < after  # appending images only adds members
    with pytest.raises(DataError, match="larger than the image source"):
        select_monitored(ex, 61)
    with pytest.raises(DataError, match="does not hold"):
        select_monitored(ex, ["nope.png"])


def test_bad_input_fails_before_training_and_keeps_the_store(tiny_model_dir, data_root, tmp_path):
    pipe = loops.lora_pipeline(tiny_model_dir)
    store = tmp_path / "s.h5"
    m = Monitor(str(store), pipe, loops.DiskDataset(data_root), every_n_steps=1, **loops.monitor_args())
    m.start()
    m.close(1)
    size, mtime = store.stat().st_size, store.stat().st_mtime_ns

    def start(images=None, pipeline=pipe, **kw):
        args = {**loops.monitor_args(), "every_n_steps": 1, **kw}
        Monitor(str(store), pipeline, images if images is not None else loops.DiskDataset(data_root), **args).start()

    with pytest.raises(ModelLoadError, match="denoiser"):
        start(
            pipeline={
                "vae": pipe.vae,
                "text_encoder": pipe.text_encoder,
                "tokenizer": pipe.tokenizer,
                "scheduler": pipe.scheduler,
            }
        )
    with pytest.raises(ModelLoadError, match="vae, text_encoder"):
        start(pipeline={"unet": pipe.unet, "tokenizer": pipe.tokenizer, "scheduler": pipe.scheduler})
    empty = tmp_path / "empty"
    (empty / "c").mkdir(parents=True)
    with pytest.raises(DataError, match="holds no images"):
        start(str(empty))
    with pytest.raises(DataError, match="yields no images"):
        start([{"image": None}][:0])
    bad = tmp_path / "bad"
    loops.write_digit_folder(bad, per_concept=2)
    (bad / "digit7" / "1.png").write_bytes(b"not an image")
    with pytest.raises(DataError, match=r"digit7/1\.png"):
        start(str(bad))
    with pytest.raises(DataError, match="larger than the image source"):
        start(monitor_images=7)
    with pytest.raises(MontrageConfigError, match="never fires"):
        start(every_n_steps=None)
    with pytest.raises(MontrageConfigError, match="never fires before the final step"):
        start(every_n_steps=None, at_steps=[50], max_steps=10)
    from montrage.capture import UnknownModuleError

    with pytest.raises(UnknownModuleError, match="up_blocks.1"):
        start(layers=["mid_blok"])
    assert (store.stat().st_size, store.stat().st_mtime_ns) == (size, mtime)  # nothing written, nothing lost
    with StoreReader(str(store)) as r:
        assert list(r.global_steps) == [0, 1]
    m = Monitor(str(tmp_path / "t.h5"), pipe, loops.DiskDataset(data_root), every_n_steps=1, **loops.monitor_args())
    m.start()
    with pytest.raises(MontrageConfigError, match="out of range"):
        m.on_batch([0, 6])
    with pytest.raises(MontrageConfigError, match="not in the image source"):
        m.on_batch(ids=["digit1/9.png"])
    m.close()


def test_wrapped_loader_keeps_the_users_batches_and_sampler(data_root):
    from montrage.training_order import INDEX_KEY, wrap_dataloader

    ds = loops.DiskDataset(data_root)

    def make():
        return torch.utils.data.DataLoader(
            ds, batch_size=4, shuffle=True, collate_fn=loops.train_collate, generator=torch.Generator().manual_seed(1)
        )

    torch.manual_seed(5)
    plain = [b for b in make()]
    torch.manual_seed(5)
    wrapped = [b for b in wrap_dataloader(make())]
    assert len(plain) == len(wrapped) == 2
    for p, w in zip(plain, wrapped):
        assert torch.equal(p["pixel_values"], w["pixel_values"]) and p["caption"] == w["caption"]
        assert set(w) == {"pixel_values", "caption", INDEX_KEY}
        assert [ds[i]["caption"] for i in w[INDEX_KEY].tolist()] == w["caption"]


def test_wrapped_denoisers_and_prefixed_layer_names(tiny_model_dir, data_root, tmp_path, caplog):
    """DataParallel, torch.compile and PeftModel wrappers are looked through; 'module.'-style names resolve."""
    import logging

    from peft import LoraConfig, get_peft_model

    from montrage.components import unwrap

    pipe = loops.lora_pipeline(tiny_model_dir)
    compiled = torch.compile(torch.nn.DataParallel(pipe.unet))
    assert unwrap(compiled) is pipe.unet
    plain = loops.lora_pipeline(tiny_model_dir, dropout=0.0).unet
    peft_wrapped = get_peft_model(plain, LoraConfig(r=2, target_modules=["to_q"]))
    assert unwrap(peft_wrapped) is plain
    parts = dict(
        unet=compiled, vae=pipe.vae, text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer, scheduler=pipe.scheduler
    )
    m = Monitor(
        str(tmp_path / "s.h5"),
        parts,
        loops.DiskDataset(data_root),
        every_n_steps=1,
        layers=["_orig_mod.module.mid_block", "up_blocks.0"],
        **loops.monitor_args(),
    )
    with caplog.at_level(logging.INFO, logger="montrage.monitor"):
        m.start()
    m.close()
    assert "denoiser forwards" in caplog.text and "6 monitored images x 2 timesteps" in caplog.text  # the cost
    with StoreReader(str(tmp_path / "s.h5")) as r:
        assert r.layers == ["mid_block", "up_blocks.0"] and r.lora_params(0)  # the adapter seen through the wrappers
