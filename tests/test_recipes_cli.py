import json
import os

import pytest
import pytorch_lightning as pl
import yaml

import helpers
from montrage.cli import main
from montrage.recipes import DreamBoothDataModule
from montrage.recipes.cli import config_path
from montrage.store import SCHEMA_VERSION, StoreReader


@pytest.fixture(scope="module")
def small_store(tiny_model_dir, tmp_path_factory):
    store = tmp_path_factory.mktemp("inspect") / "store.h5"
    helpers.trainer(2, [helpers.callback(store)]).fit(helpers.module(tiny_model_dir), helpers.data())
    return str(store)


def test_inspect_json(small_store, capsys):
    assert main(["inspect", small_store, "--json"]) == 0
    s = json.loads(capsys.readouterr().out)
    assert s["schema_version"] == SCHEMA_VERSION == 3 and s["epochs"] == [0, 1, 2]
    assert s["num_probes"] == 3 and s["num_train_images"] == 6
    assert s["layers"] == ["mid_block"] and s["concepts"] == ["digit1", "digit7"]
    assert s["datasets"]["train/features/mid_block"]["shape"] == [3, 6, 2, 64]
    assert main(["inspect", small_store]) == 0
    text = capsys.readouterr().out
    assert "epochs       [0, 1, 2]" in text and "train/features/mid_block" in text


def test_inspect_follow_of_a_finished_store_prints_its_epochs_and_ends(small_store, capsys):
    assert main(["inspect", small_store, "--follow", "--json", "--interval", "0.1", "--timeout", "30"]) == 0
    events = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [e["epoch"] for e in events if e["event"] == "epoch"] == [0, 1, 2]
    assert events[-1] == {"event": "end", "reason": "closed", "epochs": 3}  # closed writer: no waiting


def test_inspect_bad_file_is_a_clear_error(tmp_path, capsys):
    bad = tmp_path / "bad.h5"
    bad.write_bytes(b"\x89HDF\r\n" + os.urandom(500))
    assert main(["inspect", str(bad)]) == 2
    assert "not a readable HDF5 file" in capsys.readouterr().err


def test_demo_writes_its_files(tmp_path, capsys):
    from montrage.recipes.demo import run_demo
    from montrage.recipes.tiny_base import TinyBaseConfig

    out = tmp_path / "demo"
    result = run_demo(
        str(out),
        digits=[1, 4, 7, 9],
        images_per_concept=2,
        epochs=5,
        repeats=1,
        progress=False,
        base_config=TinyBaseConfig(vae_steps=1, unet_steps=1),
    )
    for name in ("store.h5", "demo_summary.json", "curves.png", "query.png", "report.html"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0
    summary = json.loads((out / "demo_summary.json").read_text())
    assert summary["epochs"] == [0, 1, 2, 3, 4, 5] and summary["concepts"] == ["digit1", "digit4", "digit7", "digit9"]
    assert len(summary["probe_concept_accuracy_per_epoch"]) == 6
    assert result["num_train_images"] == 8
    assert len(summary["attribution"]["queries"]) == 3
    assert set(summary["attribution"]["queries"][0]["shares"]) == {"digit1", "digit4", "digit7", "digit9"}
    origin = summary["origin"]
    assert origin["images_per_class"] == {"member": 8, "generated": max(8, summary["num_probes"]), "external": 8}
    assert set(origin["test_accuracy_per_class"]) == {"member", "generated", "external"}
    assert os.path.isfile(os.path.join(origin["classifier"], "classifier.json"))
    record = json.loads((out / "store_memorization.json").read_text())  # the guard watched every snapshot
    assert summary["memorization_alerts"] == len(record["alerts"]) and len(record["history"]) == 6
    assert "<img" in (out / "report.html").read_text()
    with StoreReader(str(out / "store.h5")) as r:
        assert r.num_epochs == 6

    # `montrage origin fit STORE --external DIR`, then `origin predict STORE IMAGE...`, on the demo's store, with the
    # training-trajectory family: its columns are the loss under each stored adapter, so they must differ per row
    store, clf = str(out / "store.h5"), str(out / "clf")
    assert (
        main(
            [
                "origin",
                "fit",
                store,
                "--external",
                origin["external_dir"],
                "--members",
                "4",
                "--generate",
                "1",
                "--timesteps",
                "3",
                "--families",
                "loss,loss_snapshots",
                "--out",
                clf,
                "--quiet",
            ]
        )
        == 0
    )
    report = json.loads(capsys.readouterr().out)
    assert report["counts"] == {"member": 4, "generated": summary["num_probes"] + 1, "external": 8}
    assert report["snapshots"] == [0, 1, 2, 3, 4, 5] and report["families"] == ["loss", "loss_snapshots"]
    meta = json.loads((out / "clf" / "classifier.json").read_text())
    assert len(meta["feature_names"]) == 3 + 6 * 3
    images = sorted(os.path.join(origin["external_dir"], f) for f in os.listdir(origin["external_dir"]))[:2]
    assert main(["origin", "predict", store, *images, "--classifier", clf, "--json", "--quiet"]) == 0
    preds = json.loads(capsys.readouterr().out)
    assert [p["image"] for p in preds] == images
    assert all(abs(sum(p["probabilities"].values()) - 1) < 1e-6 for p in preds)
    # with the external images' captions, CLiD's families join the default; predicting then needs captions too
    for f in os.listdir(origin["external_dir"]):
        with open(os.path.join(origin["external_dir"], os.path.splitext(f)[0] + ".txt"), "w") as fh:
            fh.write("a photo of nine")
    assert (
        main(
            [
                "origin",
                "fit",
                store,
                "--external",
                origin["external_dir"],
                "--members",
                "4",
                "--generate",
                "1",
                "--timesteps",
                "2",
                "--captions",
                "sidecar",
                "--out",
                str(out / "clid"),
                "--quiet",
            ]
        )
        == 0
    )
    assert {"loss_ref", "clid_null", "clid_perturbed"} <= set(json.loads(capsys.readouterr().out)["families"])
    assert (
        main(
            [
                "origin",
                "predict",
                store,
                images[0],
                "--classifier",
                str(out / "clid"),
                "--captions",
                "sidecar",
                "--json",
                "--quiet",
            ]
        )
        == 0
    )
    assert json.loads(capsys.readouterr().out)[0]["prediction"] in ("member", "generated", "external")
    assert main(["origin", "predict", store, images[0], "--classifier", str(out / "clid"), "--quiet"]) == 2
    assert "--captions sidecar" in capsys.readouterr().err
    os.remove(os.path.splitext(images[0])[0] + ".txt")
    assert (
        main(
            ["origin", "predict", store, *images, "--classifier", str(out / "clid"), "--captions", "sidecar", "--quiet"]
        )
        == 2
    )
    assert os.path.basename(images[0]) in capsys.readouterr().err  # names the image without a caption
    # the report shows the images' origin probabilities (and says where the classifier is without images)
    assert main(["report", store, "--out", str(out / "r.html"), "--origin", *images, "--origin-classifier", clf]) == 0
    assert "Origin" in capsys.readouterr().out and "Origin probabilities under" in (out / "r.html").read_text()
    assert "Origin probabilities under" in (out / "report.html").read_text()  # the demo's report shows two
    os.rename(clf, str(out / "moved"))
    assert main(["report", store, "--out", str(out / "r2.html"), "--origin-classifier", clf]) == 0
    assert "No origin classifier at" in (out / "r2.html").read_text()
    # a features-file mode call without --out, and a store without --external, are clear errors
    assert main(["origin", "fit", store, "--quiet"]) == 2
    assert "--external" in capsys.readouterr().err


def test_lightning_cli_runs_the_demo_config(tiny_model_dir, tmp_path):
    cfg = yaml.safe_load(open(config_path("demo.yaml")))
    cfg["trainer"].update(max_epochs=1, default_root_dir=str(tmp_path), enable_progress_bar=False)
    cb = cfg["trainer"]["callbacks"][0]["init_args"]
    cb.update(store_path=str(tmp_path / "store.h5"), num_inference_steps=2)
    cfg["model"].update(pretrained_model=tiny_model_dir, output_dir=str(tmp_path / "lora"))
    cfg["data"]["init_args"].update(images_per_concept=2, repeats=1)
    path = tmp_path / "demo.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert main(["fit", "--config", str(path)]) == 0
    with StoreReader(str(tmp_path / "store.h5")) as r:  # a LoRA run: deferred by default
        assert r.deferred and r.adapter_snapshots == 2 and r.num_epochs == 0 and len(r.train) == 8
    assert main(["encode", str(tmp_path / "store.h5")]) == 0
    with StoreReader(str(tmp_path / "store.h5")) as r:
        assert list(r.epochs) == [0, 1] and len(r.train) == 8
    assert (tmp_path / "lora" / "pytorch_lora_weights.safetensors").is_file()


@pytest.mark.parametrize("name", ["sd15-lora.yaml", "sd15-dreambooth.yaml", "sdxl-lora.yaml", "flux-lora.yaml"])
def test_real_model_configs_parse(name, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["fit", "--config", config_path(name), "--print_config"])
    assert exit_.value.code == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["model"]["pretrained_model"] == yaml.safe_load(open(config_path(name)))["model"]["pretrained_model"]
    assert printed["model"]["pretrained_model"].split("/")[0] in (
        "stable-diffusion-v1-5",
        "stabilityai",
        "black-forest-labs",
    )
    assert printed["trainer"]["callbacks"][0]["class_path"] == "montrage.callbacks.MontrageCallback"


def test_dreambooth_full_unet_with_prior_preservation(tiny_model_dir, tmp_path):
    class_dir = tmp_path / "class"
    data = DreamBoothDataModule(
        instance_digit=7,
        instance_images=3,
        with_prior_preservation=True,
        class_data_dir=str(class_dir),
        num_class_images=4,
        batch_size=2,
    )
    m = helpers.module(tiny_model_dir, train_mode="full", prior_loss_weight=0.5, output_dir=str(tmp_path / "out"))
    batches = []

    class Peek(pl.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            batches.append(batch)

    store = tmp_path / "s.h5"
    pl.seed_everything(0)
    helpers.trainer(1, [Peek(), helpers.callback(store, probe_prompts=["a photo of sks digit"])]).fit(m, data)
    assert len(list(class_dir.glob("*.png"))) == 4  # generated because they were missing
    b = batches[0]
    assert b["pixel_values"].shape[0] == 4 and b["is_prior"].tolist() == [False, False, True, True]
    assert b["caption"] == ["a photo of sks digit"] * 2 + ["a photo of a digit"] * 2
    assert (tmp_path / "out" / "unet" / "config.json").is_file()
    with StoreReader(str(store)) as r:
        assert list(r.epochs) == [0, 1] and r.concepts == ["instance"] and len(r.train) == 3
        assert not r.summary()["lora_snapshots"]  # full-UNet training keeps no adapter snapshots


def test_every_benchmark_shows_all_its_flags(capsys):
    """`montrage bench NAME --help` is that benchmark's own parser, with every flag it takes."""
    from montrage.bench import BENCHMARKS

    for name in BENCHMARKS:
        cli_name = name.replace("_", "-")
        with pytest.raises(SystemExit) as exit_:
            main(["bench", cli_name, "--help"])
        assert exit_.value.code == 0
        assert capsys.readouterr().out.startswith(f"usage: montrage bench {cli_name}")
    with pytest.raises(SystemExit):
        main(["bench", "origin", "--help"])
    text = capsys.readouterr().out
    assert all(flag in text for flag in ("--lora-per-concept", "--draws", "--workdir", "--no-pixel", "--lora-prompt"))
    with pytest.raises(SystemExit) as exit_:
        main(["bench", "no-such-bench"])
    assert exit_.value.code == 2 and "invalid choice" in capsys.readouterr().err
