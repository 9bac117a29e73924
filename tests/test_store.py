import h5py
import numpy as np
import pytest

from helpers import epoch_arrays, make_spec
from montrage.store import StoreError, StoreMismatchError, StoreReader, StoreWriter


def test_append_read_roundtrip(tmp_path):
    spec, path = make_spec(), str(tmp_path / "s.h5")
    w = StoreWriter(path, spec)
    for e in range(3):
        w.append_epoch(e, e * 10, *epoch_arrays(spec, float(e)))
    w.append_order(0, np.array([1, 1, 2]), np.array([4, 0, 3]))
    w.close()
    with StoreReader(path) as r:
        assert list(r.epochs) == [0, 1, 2]
        assert list(r.global_steps) == [0, 10, 20]
        assert r.probe_features("mid_block").shape == (3, 4, 2, 6)
        assert r.train_features("mid_block")[2, 0, 0, 0] == pytest.approx(2.5)
        assert r.probe_images()[1, 0, 0, 0, 0] == 1
        assert [e.id for e in r.train] == [f"digits/{i}" for i in range(5)]
        assert r.training_order()["example_index"].tolist() == [4, 0, 3]
        lora = r.lora_params(2)
        assert lora["a"].shape == (2, 3) and lora["b"].tolist() == [8.0, 9.0, 10.0]
        s = r.summary()
        assert s["epochs"] == [0, 1, 2] and s["num_probes"] == 4 and s["num_train_images"] == 5
        assert s["concepts"] == ["digit1", "digit7"] and s["layers"] == ["mid_block"]
        assert r.f["probes/weights"][0].tolist() == [1.0, 0.0]


def test_partial_epoch_is_ignored_and_overwritten(tmp_path):
    spec, path = make_spec(), str(tmp_path / "s.h5")
    w = StoreWriter(path, spec)
    w.append_epoch(0, 0, *epoch_arrays(spec, 0.0))
    # a crash mid-write: rows grown but the commit counter not advanced
    w.f["epoch"].resize(2, axis=0)
    w.f["train/features/mid_block"].resize(2, axis=0)
    w.close()
    with StoreReader(path) as r:
        assert list(r.epochs) == [0]
        assert r.train_features("mid_block").shape[0] == 1
    w = StoreWriter(path, spec, truncate_to=(1, 0))
    w.append_epoch(1, 5, *epoch_arrays(spec, 1.0))
    w.close()
    with StoreReader(path) as r:
        assert list(r.epochs) == [0, 1] and r.f["epoch"].shape == (2,)


def test_truncate_for_resume(tmp_path):
    spec, path = make_spec(), str(tmp_path / "s.h5")
    w = StoreWriter(path, spec)
    for e in range(4):
        w.append_epoch(e, e, *epoch_arrays(spec, float(e)))
    w.append_order(0, np.zeros(3, int), np.arange(3))
    w.append_order(1, np.ones(3, int), np.arange(3))
    w.close()
    w = StoreWriter(path, spec, truncate_to=(2, 3))
    w.append_epoch(2, 99, *epoch_arrays(spec, 7.0))
    w.close()
    with StoreReader(path) as r:
        assert list(r.epochs) == [0, 1, 2] and list(r.global_steps) == [0, 1, 99]
        assert r.training_order()["epoch"].tolist() == [0, 0, 0]


@pytest.mark.parametrize("change", ["probes", "model", "layers"])
def test_refuses_store_of_another_run(tmp_path, change):
    path = str(tmp_path / "s.h5")
    spec = make_spec()
    w = StoreWriter(path, spec)
    w.append_epoch(0, 0, *epoch_arrays(spec, 0.0))
    w.close()
    other = {
        "probes": make_spec(prompts=("a photo of one",)),
        "model": make_spec(model_id="other"),
        "layers": make_spec(layers=("up_blocks.0",)),
    }[change]
    before = open(path, "rb").read()
    with pytest.raises(StoreMismatchError, match=change if change != "probes" else "probes"):
        StoreWriter(path, other, truncate_to=(1, 0))
    assert open(path, "rb").read() == before  # untouched


def test_refuses_to_append_to_a_finished_run_without_resume(tmp_path):
    spec, path = make_spec(), str(tmp_path / "s.h5")
    w = StoreWriter(path, spec)
    w.append_epoch(0, 0, *epoch_arrays(spec, 0.0))
    w.close()
    with pytest.raises(StoreError, match="already holds 1 epoch"):
        StoreWriter(path, spec)
    StoreWriter(path, spec, overwrite=True).close()
    with StoreReader(path) as r:
        assert r.num_epochs == 0


def test_refuses_non_finite_features_without_writing(tmp_path):
    spec, path = make_spec(), str(tmp_path / "s.h5")
    w = StoreWriter(path, spec)
    probe, train, thumbs, lora = epoch_arrays(spec, 0.0)
    train["mid_block"][0, 0, 0] = np.nan
    with pytest.raises(StoreError, match="not finite"):
        w.append_epoch(0, 0, probe, train, thumbs, lora)
    w.close()
    with StoreReader(path) as r:
        assert r.num_epochs == 0


def test_reader_errors(tmp_path):
    with pytest.raises(StoreError, match="does not exist"):
        StoreReader(str(tmp_path / "missing.h5"))
    junk = tmp_path / "junk.h5"
    junk.write_bytes(np.random.default_rng(0).bytes(4096))
    with pytest.raises(StoreError, match="not a readable HDF5"):
        StoreReader(str(junk))
    other = tmp_path / "other.h5"
    with h5py.File(other, "w") as f:
        f["x"] = 1
    with pytest.raises(StoreError, match="not a montrage store"):
        StoreReader(str(other))
    spec, path = make_spec(), str(tmp_path / "s.h5")
    StoreWriter(path, spec).close()
    with h5py.File(path, "a") as f:
        f.attrs["schema_version"] = 99
    with pytest.raises(StoreError, match="schema_version 99"):
        StoreReader(path)


def test_the_guide_lists_every_dataset_of_the_schema():
    import pathlib

    from montrage.store.schema import DATASETS, required

    guide = (pathlib.Path(__file__).resolve().parents[1] / "docs" / "guide.md").read_text()
    missing = [
        ds.name
        for ds in DATASETS
        if f"`{ds.name.replace('{layer}', '<layer>')}`" not in guide and f"`{ds.name.split('/')[-1]}`" not in guide
    ]
    assert not missing, f"docs/guide.md's store table lacks {missing}"
    # what each file must hold follows from the table
    assert "adapter_check" in required("features", ["mid"]) and "adapter_check" not in required("all", ["mid"])
    assert "train/features/mid" not in required("adapter", ["mid"]) and "order/epoch" in required("adapter", ["mid"])


def test_run_description_round_trips_and_refuses_missing_or_unknown_fields():
    import dataclasses

    import pytest

    from montrage.store import AdapterSetup, RunDescription, StoreError

    run = RunDescription(
        model_path="/m",
        resolution=16,
        family="sd",
        noise_kind="epsilon",
        denoiser_class="UNet2DConditionModel",
        noise_points=[0.1],
        layers=["mid_block"],
        adapters={"unet": AdapterSetup(r=8, lora_alpha=8.0, target_modules=["to_q"])},
        timesteps=[200],
        pooling="mean",
        encode_prompt="",
        num_inference_steps=10,
        guidance_scale=3.0,
        thumbnail_size=16,
    )
    assert RunDescription.from_dict(run.to_dict()) == run
    without_rank = {**run.to_dict(), "adapters": {"unet": {"lora_alpha": 8.0, "target_modules": ["to_q"]}}}
    with pytest.raises(StoreError, match="'adapters' does not read"):  # never a silent default rank
        RunDescription.from_dict(without_rank)
    partial = {k: v for k, v in run.to_dict().items() if k != "resolution"}
    with pytest.raises(StoreError, match=r"s\.h5.*missing field\(s\) \['resolution'\]"):
        RunDescription.from_dict(partial, where="store 's.h5'")
    with pytest.raises(StoreError, match=r"unknown field\(s\) \['lora_config'\]"):
        RunDescription.from_dict({**run.to_dict(), "lora_config": {}})
    assert {f.name for f in dataclasses.fields(RunDescription)} >= {"model_path", "adapters", "encode_prompt"}
