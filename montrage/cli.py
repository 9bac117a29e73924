"""The `montrage` command line: inspect a store, run the offline demo, fine-tune from a config, benchmarks."""

from __future__ import annotations

import argparse
import json
import sys
import time


def _human(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def print_summary(s: dict) -> None:
    print(f"store        {s['path']}  ({_human(s['file_bytes'])}, schema {s['schema_version']})")
    print(f"model        {s['model'].get('model_id')}  [{s['model'].get('unet_class')} {s['model'].get('unet_config_sha')}]")
    print(f"epochs       {s['epochs']}  (global steps {s['global_steps']})")
    print(f"probes       {s['num_probes']} = {len(s['probe_prompts'])} prompts x seeds {s['probe_seeds']}")
    print(f"train images {s['num_train_images']} in concepts {', '.join(s['concepts'])}")
    print(f"layers       {', '.join(f'{k} ({v})' for k, v in s['feature_dims'].items())}; pooling {s['pooling']}")
    print(f"timesteps    {s['timesteps']}")
    print(f"order rows   {s['training_order_rows']}; LoRA snapshots: {'yes' if s['lora_snapshots'] else 'no'}")
    print("datasets:")
    for name, d in s["datasets"].items():
        print(f"  {name:40s} {str(tuple(d['shape'])):24s} {d['dtype']:8s} {_human(d['bytes'])}")


def cmd_inspect(args) -> int:
    from montrage.store import StoreReader

    with StoreReader(args.store) as store:
        if not args.follow:
            summary = store.summary()
            if args.json:
                print(json.dumps(summary))
            else:
                print_summary(summary)
            return 0
        seen = -1
        deadline = time.time() + args.timeout if args.timeout else None
        while deadline is None or time.time() < deadline:
            store.refresh()
            n = store.num_epochs
            if n != seen:
                seen = n
                line = {"epochs": [int(e) for e in store.epochs], "global_steps": [int(g) for g in store.global_steps]}
                print(json.dumps(line) if args.json else f"{time.strftime('%H:%M:%S')} epochs {line['epochs']}", flush=True)
            time.sleep(args.interval)
    return 0


def cmd_demo(args) -> int:
    from montrage.recipes.demo import run_demo

    digits = [int(d) for d in args.digits.split(",")]
    result = run_demo(args.out, digits=digits, epochs=args.epochs, images_per_concept=args.images_per_concept,
                      seed=args.seed, progress=not args.quiet)
    print(json.dumps({k: result[k] for k in ("store", "curves_png", "epochs", "probe_concept_accuracy_per_epoch",
                                             "final_own_concept_is_most_similar", "seconds")}, indent=1))
    print(f"\nwrote {args.out}/store.h5, {args.out}/demo_summary.json, {args.out}/curves.png")
    print(f"next: montrage inspect {args.out}/store.h5")
    return 0


def cmd_tiny_base(args) -> int:
    from montrage.recipes.tiny_base import tiny_base_path

    print(tiny_base_path(progress=True))
    return 0


def cmd_bench(args) -> int:
    if args.what == "overhead":
        from montrage.recipes.bench import run_overhead

        result = run_overhead(epochs=args.epochs, images_per_concept=args.images_per_concept, repeats=args.repeats,
                              rounds=args.rounds, out=args.out)
        print(json.dumps({k: v for k, v in result.items() if k != "runs"}, indent=1))
        return 0
    raise SystemExit(f"unknown benchmark {args.what!r}")


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
    s.add_argument("--follow", action="store_true", help="keep watching a store that a running job writes (SWMR)")
    s.add_argument("--interval", type=float, default=2.0, help="seconds between polls with --follow")
    s.add_argument("--timeout", type=float, default=0.0, help="stop following after this many seconds (0 = never)")
    s.set_defaults(fn=cmd_inspect)

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
    s.add_argument("what", choices=["overhead"])
    s.add_argument("--epochs", type=int, default=3)
    s.add_argument("--images-per-concept", type=int, default=16)
    s.add_argument("--repeats", type=int, default=40, help="passes over the images per epoch (demo default)")
    s.add_argument("--rounds", type=int, default=2, help="alternating without/with pairs")
    s.add_argument("--out", default=None, help="write the result JSON here too")
    s.set_defaults(fn=cmd_bench)

    sub.add_parser("fit", help="fine-tune with LightningCLI, e.g. `montrage fit --config demo.yaml`", add_help=False)
    return p


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in ("fit", "validate"):
        return run_lightning_cli(argv)
    args = build_parser().parse_args(argv)
    try:
        return args.fn(args)
    except (ValueError, OSError) as err:
        print(f"montrage {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
