"""The `montrage` command line: inspect a store, run the offline demo, fine-tune from a config, benchmarks."""

from __future__ import annotations

import argparse
import json
import sys
import time

from montrage.errors import MontrageError


def _human(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def print_summary(s: dict) -> None:
    print(f"store        {s['path']}  ({_human(s['file_bytes'])}, schema {s['schema_version']})")
    print(
        f"model        {s['model'].get('model_id')}  [{s['model'].get('family', 'sd')}: {s['model'].get('unet_class')} "
        f"{s['model'].get('unet_config_sha')}]"
    )
    print(f"epochs       {s['epochs']}  (global steps {s['global_steps']})")
    print(f"probes       {s['num_probes']} = {len(s['probe_prompts'])} prompts x seeds {s['probe_seeds']}")
    print(
        f"train images {s['num_train_images']} ({s.get('num_monitored_images', s['num_train_images'])} monitored) in "
        f"concepts {', '.join(s['concepts'])}"
    )
    print(f"layers       {', '.join(f'{k} ({v})' for k, v in s['feature_dims'].items())}; pooling {s['pooling']}")
    print(f"timesteps    {s['timesteps']}")
    print(f"order rows   {s['training_order_rows']}; LoRA snapshots: {'yes' if s['lora_snapshots'] else 'no'}")
    if s.get("mode") == "deferred":
        print(
            f"deferred     {s['adapter_snapshots']} adapter snapshot(s), {len(s['epochs'])} encoded"
            + ("" if len(s["epochs"]) == s["adapter_snapshots"] else f" (run `montrage encode {s['path']}`)")
        )
    if s.get("projection"):
        p = s["projection"]
        print(f"projection   pooled {p['pooled_dims']} -> {p['width']} (seed {p['seed']})")
    print("datasets:")
    for name, d in s["datasets"].items():
        print(f"  {name:40s} {str(tuple(d['shape'])):24s} {d['dtype']:8s} {_human(d['bytes'])}")


def cmd_inspect(args) -> int:
    from montrage.store import StoreReader

    if args.follow:
        return follow(args)
    with StoreReader(args.store) as store:
        summary = store.summary()
    if args.json:
        print(json.dumps(summary))
    else:
        print_summary(summary)
    return 0


def follow(args) -> int:
    """Print each snapshot as the running job commits it; end when the writer closes the store, at --timeout, or
    on Ctrl-C (exit status 130, no traceback)."""
    from montrage.store import follow_epochs

    try:
        for ev in follow_epochs(args.store, args.interval, args.timeout or None):
            if args.json:
                print(json.dumps(ev), flush=True)
            elif ev["event"] == "epoch":
                print(
                    f"{time.strftime('%H:%M:%S')} snapshot {ev['row']}: epoch {ev['epoch']} "
                    f"(global step {ev['global_step']})",
                    flush=True,
                )
            elif ev["event"] == "cut":
                print(
                    f"{time.strftime('%H:%M:%S')} store cut back to {ev['epochs']} snapshot(s) (a resumed run)",
                    flush=True,
                )
            else:
                why = "the writer closed the store" if ev["reason"] == "closed" else "timeout"
                print(f"{time.strftime('%H:%M:%S')} {why}; {ev['epochs']} snapshot(s)", flush=True)
    except KeyboardInterrupt:
        return 130
    return 0


def _images_arg(path: str | None):
    """--images: a folder of images, or a directory written by `datasets.Dataset.save_to_disk`."""
    import os

    if path and os.path.isfile(os.path.join(path, "dataset_info.json")):
        import datasets

        return datasets.load_from_disk(path)
    return path


def cmd_encode(args) -> int:
    from montrage.deferred import NothingToEncode, encode_store, launch

    device, dist = launch(args.devices, args.accelerator)
    runs = None
    if args.wandb_run_id:
        import wandb

        run = wandb.init(id=args.wandb_run_id, project=args.wandb_project, resume="allow") if dist.rank == 0 else None
        runs = lambda: [run] if run is not None else []  # noqa: E731
    try:
        result = encode_store(
            args.store,
            _images_arg(args.images),
            args.model_path,
            follow=args.follow,
            timeout=args.timeout or None,
            interval=args.interval,
            device=device,
            dist=dist,
            batch_size=args.batch_size,
            log_to_wandb=runs is not None,
            wandb_runs=runs,
        )
    except NothingToEncode as err:
        print(f"montrage encode: nothing to do: {err}")
        return 0
    if dist.rank == 0:
        print(
            json.dumps(result)
            if args.json
            else f"encoded {result['encoded']} snapshot(s) ({result['already_encoded']} were already) of {args.store} "
            f"into {result['features']} with {result['processes']} process(es) in {result['seconds']} s"
        )
    return 0


def cmd_demo(args) -> int:
    from montrage.recipes.demo import run_demo

    digits = [int(d) for d in args.digits.split(",")]
    result = run_demo(
        args.out,
        digits=digits,
        epochs=args.epochs,
        images_per_concept=args.images_per_concept,
        seed=args.seed,
        progress=not args.quiet,
    )
    print(
        json.dumps(
            {
                k: result[k]
                for k in (
                    "store",
                    "curves_png",
                    "epochs",
                    "probe_concept_accuracy_per_epoch",
                    "final_own_concept_is_most_similar",
                    "attribution",
                    "origin",
                    "seconds",
                )
            },
            indent=1,
        )
    )
    print(f"\nwrote {args.out}/store.h5, {args.out}/demo_summary.json, {args.out}/curves.png, {args.out}/query.png")
    print(f"next: montrage inspect {args.out}/store.h5")
    return 0


def cmd_tiny_base(args) -> int:
    from montrage.recipes.tiny_base import tiny_base_path

    print(tiny_base_path(progress=True))
    return 0


def _digits(text: str) -> list[int]:
    return [int(c) for c in text.split(",")]


def _names(text: str | None) -> list[str] | None:
    return [t.strip() for t in text.split(",") if t.strip()] if text else None


def cmd_bench(args) -> int:
    if args.what == "attribution":
        from montrage.recipes.bench_attribution import run_attribution_bench

        run_attribution_bench(
            args.out or "attribution_results.json",
            _digits(args.concepts or "0,1,2,3,4,5,6,7,8,9"),
            images_per_concept=args.images_per_concept or 8,
            epochs=args.epochs or 6,
            seeds=[int(s) for s in str(args.seed).split(",")],
            data_dir=args.data_dir,
            keep=args.keep,
            within=args.within,
            exemplar_repeats=args.exemplar_repeats,
            projection_width=None if args.projection_width in (None, "none") else int(args.projection_width),
            dataset=args.dataset,
            themes=_names(args.themes),
            pretrain_themes=_names(args.pretrain_themes),
            icons_dir=args.icons_dir,
            icons_per_theme=args.icons_per_theme,
            fit_seeds=[int(x) for x in args.fit_seeds.split(",")] if args.fit_seeds else None,
            pretrain_text_encoder=args.pretrain_text_encoder,
            rescore=args.rescore,
        )
        return 0
    if args.what == "counterfactual":
        from montrage.recipes.bench_counterfactual import run_counterfactual

        run_counterfactual(
            args.out or "counterfactual.json",
            args.dataset,
            _digits(args.concepts or "1,4,7,9"),
            args.images_per_concept or 8,
            _names(args.themes),
            _names(args.pretrain_themes),
            args.icons_dir,
            args.icons_per_theme,
            args.queries,
            tuple(float(k) for k in args.k.split(",")),
            int(args.seed),
            args.epochs or 6,
            _names(args.methods),
            pretrain_text_encoder=args.pretrain_text_encoder,
        )
        return 0
    if args.what == "origin":
        from montrage.recipes.bench_origin import main as origin_bench_main

        origin_bench_main(
            ["--out", args.out or "origin_results.json", "--seed", str(args.seed)]
            + (["--members", str(args.members)] if args.members else [])
            + (["--timesteps", str(args.timesteps)] if args.timesteps else [])
        )
        return 0
    if args.what == "adapters":
        from montrage.recipes.bench_adapters import main as adapters_bench_main

        adapters_bench_main(
            ["--out", args.out or "adapters_results.json", "--seed", str(args.seed)]
            + (["--timesteps", str(args.timesteps)] if args.timesteps else [])
        )
        return 0
    if args.what == "scale":
        from montrage.recipes.bench_scale import run_scale

        sizes = args.sizes if args.sizes != "100,1000,10000" else "1000,10000,100000"
        result = run_scale(tuple(int(n) for n in sizes.split(",")), out=args.out)
        print(json.dumps(result, indent=1))
        return 0
    if args.what == "query":
        from montrage.recipes.bench import run_query_latency

        result = run_query_latency(tuple(int(n) for n in args.sizes.split(",")), out=args.out)
        print(json.dumps(result, indent=1))
        return 0
    if args.what == "overhead":
        from montrage.recipes.bench import run_overhead

        result = run_overhead(
            epochs=args.epochs or 3,
            images_per_concept=args.images_per_concept or 16,
            repeats=args.repeats,
            rounds=args.rounds,
            out=args.out,
            mode=args.mode,
            model=args.model,
            accelerator=args.accelerator,
            resolution=args.resolution,
        )
        print(json.dumps({k: v for k, v in result.items() if k != "runs"}, indent=1))
        return 0
    if args.what == "memory":
        from montrage.recipes.bench_memory import run_memory

        result = run_memory(images=args.images, small=args.small, out=args.out)
        print(json.dumps(result, indent=1))
        return 0
    raise SystemExit(f"unknown benchmark {args.what!r}")


def cmd_attribute(args) -> int:
    if args.action == "fit":
        from montrage.attribution.fit import fit_attribution

        report = fit_attribution(
            args.store,
            out_dir=args.model_dir,
            loss=args.loss,
            steps=args.steps,
            seed=args.seed,
            members=args.members,
            model_path=args.model_path,
        )
        print(json.dumps(report, indent=1))
        return 0
    from montrage.attribution.query import Attributor

    if not args.images:
        raise MontrageError("give at least one IMAGE to attribute.")
    att = Attributor.from_store(args.store, model_dir=args.model_dir, model_path=args.model_path)
    try:
        results = att.query(args.images, top_k=args.top_k, fast=args.fast, prompt=args.prompt)
        if args.plot:
            att.plot(args.images, results, args.plot)
    finally:
        att.close()
    if args.json:
        print(json.dumps(results))
        return 0
    for r in results:
        print(f"{r['image']}  ({r['mode']} mode)  top concept: {r['top_concept']}")
        for c, v in sorted(r["concepts"].items(), key=lambda kv: -kv[1]["score"]):
            print(f"  {c:20s} score {v['score']:.4f}  share {v['share']:.3f}")
        for item in r["top_images"]:
            print(f"  {item['score']:.4f}  {item['concept']:12s} {item['id']}  {item['path']}")
    if args.plot:
        print(f"panel: {args.plot}")
    return 0


def run_lightning_cli(argv: list[str]) -> int:
    """`montrage fit --config recipes/configs/demo.yaml`: LightningCLI over the recipes."""
    from montrage.recipes.cli import lightning_cli

    lightning_cli(argv)
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="montrage", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("inspect", help="summarize a store: epochs, probes, images, layers, dataset shapes and bytes")
    s.add_argument("store")
    s.add_argument("--json", action="store_true", help="print one JSON object")
    s.add_argument(
        "--follow",
        action="store_true",
        help="print each snapshot as a running job commits it (SWMR); "
        "waits for the file to appear, ends when the writer closes it",
    )
    s.add_argument("--interval", type=float, default=2.0, help="seconds between polls with --follow")
    s.add_argument("--timeout", type=float, default=0.0, help="stop following after this many seconds (0 = never)")
    s.set_defaults(fn=cmd_inspect)

    s = sub.add_parser("encode", help="encode a deferred store's adapter snapshots (probes and training images)")
    s.add_argument("store")
    s.add_argument(
        "--images",
        default=None,
        help="the training images, if the store's recorded folder or paths are "
        "not here (a folder, or a datasets.save_to_disk directory)",
    )
    s.add_argument("--model-path", default=None, help="the run's base model, if not where the store says")
    s.add_argument("--devices", type=int, default=1, help="processes to split each snapshot's work across (DDP)")
    s.add_argument("--accelerator", default="cpu", choices=["cpu", "gpu"])
    s.add_argument("--batch-size", type=int, default=None, help="denoiser forwards per batch (default: the run's)")
    s.add_argument(
        "--follow",
        action="store_true",
        help="keep encoding snapshots as the running job commits them, until it closes the store",
    )
    s.add_argument("--interval", type=float, default=5.0, help="seconds between polls with --follow")
    s.add_argument("--timeout", type=float, default=0.0, help="stop following after this many seconds (0 = never)")
    s.add_argument("--wandb-run-id", default=None, help="log the similarity curves into this W&B run (the training's)")
    s.add_argument("--wandb-project", default=None)
    s.add_argument("--json", action="store_true")
    s.set_defaults(fn=cmd_encode)

    s = sub.add_parser("demo", help="offline end-to-end demo on the tiny base and digits")
    s.add_argument("--out", default="demo_out")
    s.add_argument("--digits", default="1,4,7,9", help="digit concepts to customize to (comma-separated)")
    s.add_argument("--epochs", type=int, default=6)
    s.add_argument("--images-per-concept", type=int, default=16)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--quiet", action="store_true")
    s.set_defaults(fn=cmd_demo)

    s = sub.add_parser("tiny-base", help="build (once) and print the path of the cached tiny offline base model")
    s.set_defaults(fn=cmd_tiny_base)

    s = sub.add_parser("bench", help="benchmarks")
    s.add_argument(
        "what", choices=["overhead", "attribution", "counterfactual", "query", "origin", "adapters", "memory", "scale"]
    )
    s.add_argument(
        "--images", type=int, default=4000, help="memory: images in the folder, all monitored in the large run"
    )
    s.add_argument("--small", type=int, default=500, help="memory: monitored images in the small run")
    s.add_argument("--members", type=int, default=None, help="origin: member images the pixel DDPM trains on (200)")
    s.add_argument("--timesteps", type=int, default=None, help="origin: timesteps in the trajectory grid (20)")
    s.add_argument("--sizes", default="100,1000,10000", help="query: training-set sizes (synthetic stores)")
    s.add_argument("--epochs", type=int, default=None, help="fine-tuning epochs (overhead: 3, attribution: 6)")
    s.add_argument("--images-per-concept", type=int, default=None, help="(overhead: 16, attribution: 8)")
    s.add_argument(
        "--concepts", default=None, help="attribution: digit concepts (default: all ten; counterfactual: 1,4,7,9)"
    )
    s.add_argument("--seed", default="0", help="attribution: seed, or several comma-separated (mean ± std)")
    s.add_argument("--data-dir", default=None, help="attribution: image folder with one subfolder per concept")
    s.add_argument("--keep", default=None, help="attribution: keep each seed's store and models in this folder")
    s.add_argument(
        "--rescore",
        default=None,
        help="attribution: a --keep folder whose runs are scored again with "
        "montrage refitted (the baselines' saved scores reused; same flags as the kept run)",
    )
    s.add_argument(
        "--dataset",
        default="digits",
        choices=["digits", "icons"],
        help="attribution: digits on the digits base, or installed icon themes on the art base",
    )
    s.add_argument("--themes", default=None, help="attribution (icons): the customized icon themes, comma-separated")
    s.add_argument(
        "--pretrain-themes",
        default=None,
        help="attribution (icons): the art base's pre-training themes "
        "(default: one installed theme of every other family)",
    )
    s.add_argument(
        "--pretrain-text-encoder",
        default="frozen",
        choices=["frozen", "train"],
        help="attribution (icons): leave the art base's text encoder as built while its UNet pre-trains (as "
        "Stable Diffusion's UNet learns on a frozen CLIP; the default), or train it with the UNet",
    )
    s.add_argument("--icons-dir", default=None, help="attribution (icons): folder of icon themes (/usr/share/icons)")
    s.add_argument("--icons-per-theme", type=int, default=16, help="attribution (icons): training icons per theme")
    s.add_argument("--queries", type=int, default=8, help="counterfactual: held-out queries retrained for")
    s.add_argument(
        "--k",
        default="0.05,0.1",
        help="counterfactual: removed images, as fractions of the training set (< 1) or counts, comma-separated",
    )
    s.add_argument("--methods", default=None, help="counterfactual: methods to retrain for (default: all, and random)")
    s.add_argument(
        "--fit-seeds",
        default=None,
        help="attribution: also refit the attribution model with each of "
        "these seeds (comma-separated) on every run's store and report the spread",
    )
    s.add_argument("--repeats", type=int, default=40, help="passes over the images per epoch (demo default)")
    s.add_argument(
        "--within",
        default="exemplar",
        choices=["exemplar", "tokens"],
        help="attribution: within-concept ground truth (an over-sampled exemplar, or per-image tokens)",
    )
    s.add_argument(
        "--exemplar-repeats",
        type=int,
        default=8,
        help="attribution: how many times more often each concept's exemplar image is seen",
    )
    s.add_argument("--rounds", type=int, default=2, help="alternating without/with pairs")
    s.add_argument(
        "--projection-width",
        default="none",
        help="attribution: store features through a random "
        "projection to this width ('none': unprojected; the benchmark's pooled features are 128 wide)",
    )
    s.add_argument("--mode", default="both", choices=["inline", "deferred", "both"], help="overhead: monitoring modes")
    s.add_argument(
        "--model",
        default="tiny",
        choices=["tiny", "sd15", "sdxl"],
        help="overhead: the tiny base, or random-weight SD 1.5 / SDXL architectures (256 / 1024 px)",
    )
    s.add_argument("--accelerator", default="cpu", choices=["cpu", "gpu"], help="overhead: where training runs")
    s.add_argument("--resolution", type=int, default=None, help="overhead: image side (tiny 16, sd15 256, sdxl 1024)")
    s.add_argument("--out", default=None, help="write the result JSON here too")
    s.set_defaults(fn=cmd_bench)

    s = sub.add_parser("attribute", help="MONTRAGE attribution: fit the attribution model, answer queries")
    s.add_argument("action", choices=["fit", "query"])
    s.add_argument("store")
    s.add_argument("images", nargs="*", help="query images (query)")
    s.add_argument("--model-dir", default=None, help="attribution models (default: <store>_attribution/)")
    s.add_argument("--model-path", default=None, help="the run's base model, if not where the store says")
    s.add_argument(
        "--loss",
        default="scos+rank",
        choices=["scos+rank", "scos", "mse", "bce"],
        help="fit: training loss (scos+rank: shifted cosine plus the within-concept ranking term)",
    )
    s.add_argument("--members", type=int, default=5, help="fit: independently initialized MLPs averaged into the score")
    s.add_argument("--steps", type=int, default=400, help="fit: optimizer steps")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument(
        "--prompt",
        default=None,
        help="query: the prompt that made the images; they are encoded under it, as the "
        "training images were under their captions (omit if unknown: the empty prompt is used)",
    )
    s.add_argument("--top-k", type=int, default=5)
    s.add_argument("--fast", action="store_true", help="query: encode at the final epoch only")
    s.add_argument("--json", action="store_true")
    s.add_argument("--plot", default=None, help="query: write a PNG panel (query beside its top-K) here")
    s.set_defaults(fn=cmd_attribute)

    from montrage.origin.cli import add_origin_parser

    add_origin_parser(sub)

    from montrage.report import add_report_parser

    add_report_parser(sub)

    sub.add_parser("fit", help="fine-tune with LightningCLI, e.g. `montrage fit --config demo.yaml`", add_help=False)
    return p


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in ("fit", "validate"):
        return run_lightning_cli(argv)
    args = build_parser().parse_args(argv)
    try:
        return args.fn(args)
    except MontrageError as err:  # bad input: one line naming the fix; anything else keeps its traceback
        print(f"montrage {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
