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


def cmd_bench(args) -> int:
    """`montrage bench NAME [flags]`: the benchmark module parses its own flags (`montrage bench NAME --help`)."""
    import importlib

    module = importlib.import_module(f"montrage.bench.{args.name.replace('-', '_')}")
    return int(module.main(args.flags) or 0)


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

    from montrage.bench import BENCHMARKS

    listing = "\n".join(f"  {name.replace('_', '-'):16s}{what}" for name, what in BENCHMARKS.items())
    s = sub.add_parser(
        "bench",
        help="benchmarks (`montrage bench NAME --help` for each one's flags)",
        description="benchmarks:\n" + listing,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    s.add_argument("name", choices=[n.replace("_", "-") for n in BENCHMARKS], metavar="NAME")
    s.add_argument("flags", nargs=argparse.REMAINDER, help="that benchmark's flags")
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
