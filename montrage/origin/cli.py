"""`montrage origin features | fit | predict | which-fit | which`: the command-line face of origin attribution.

Plain functions over argparse namespaces; `add_origin_parser(subparsers)` registers them under `origin`. Nothing
heavy is imported until a command runs, so `montrage --help` stays fast.
"""

from __future__ import annotations

import argparse
import json
import os

from montrage.origin.errors import OriginError


def _families(text: str) -> tuple[str, ...] | None:
    return tuple(f.strip() for f in text.split(",") if f.strip()) or None


def _spec_from_args(args, model):
    from montrage.origin.feature_set import FeatureSpec, default_families, default_timesteps

    num_train_timesteps = int(model.scheduler.config.num_train_timesteps)
    if args.t_grid:
        try:
            timesteps = [int(t) for t in args.t_grid.split(",") if t.strip()]
        except ValueError as err:
            raise OriginError(f"--t-grid must be comma-separated integers, e.g. 0,50,100: {err}") from err
    else:
        timesteps = default_timesteps(num_train_timesteps, args.timesteps)
    params = args.params if args.params in ("trainable", "all") else tuple(p for p in args.params.split(",") if p)
    return FeatureSpec(
        tuple(timesteps),
        families=_families(args.families) or default_families(model),
        params=params,
        noise=args.noise,
        noise_seed=args.noise_seed,
        prompt=args.prompt,
        layer_norms=args.layer_norms,
        draws=args.draws,
    )


def _print_results(results: list[dict], as_json: bool) -> int:
    """One JSON list, or a line per image: its prediction and every class probability."""
    if as_json:
        print(json.dumps(results))
        return 0
    for r in results:
        probs = "  ".join(f"{c} {p:.3f}" for c, p in r["probabilities"].items())
        print(f"{r['image']}  {r['prediction']:>12s}   {probs}")
    return 0


def _model_arg(path: str) -> str:
    return os.path.abspath(path) if os.path.isdir(path) else path


def features_main(args) -> int:
    """Extract trajectory features of images under a model into an HDF5 file."""
    from montrage.origin.featurefile import write_features
    from montrage.origin.features import trajectory_features
    from montrage.origin.images import expand_image_paths, load_images, read_captions
    from montrage.origin.model import load_diffusion_model

    paths = expand_image_paths(args.images)
    captions = read_captions(paths, args.captions) if args.captions else None
    model = load_diffusion_model(_model_arg(args.model), lora=args.lora, device=args.device, resolution=args.resolution)
    spec = _spec_from_args(args, model)
    pixels = load_images(paths, model.image_size, model.image_channels, resize=args.resize)
    fs = trajectory_features(
        model,
        pixels,
        spec,
        captions=captions,
        ids=paths,
        batch_size=args.batch_size,
        label=args.label,
        progress=not args.quiet,
    )
    write_features(args.out, fs)
    print(
        json.dumps(
            {
                "features": args.out,
                "images": len(fs),
                "timesteps": list(spec.timesteps),
                "families": list(spec.families),
                "label": args.label,
                "seconds": round(fs.seconds, 2),
                "images_per_second": round(len(fs) / max(fs.seconds, 1e-9), 3),
            }
        )
    )
    return 0


def fit_store_main(args) -> int:
    """Fit an origin classifier for a store's fine-tuned model (members, probes and generations from the store)."""
    from montrage.origin.from_store import fit_from_store

    if len(args.features) != 1:
        raise OriginError(
            f"--external takes one montrage store as input, got {len(args.features)} paths: "
            "`montrage origin fit STORE --external DIR`."
        )
    report = fit_from_store(
        args.features[0],
        args.external,
        out=args.out,
        members=args.members,
        generate=args.generate,
        families=_families(args.families),
        timesteps=args.timesteps,
        task=args.task,
        external_captions=args.captions,
        holdout=args.holdout,
        seed=args.seed,
        model_path=args.model_path,
        device=args.device,
        batch_size=args.batch_size,
        progress=not args.quiet,
    )
    print(json.dumps(report))
    return 0


def fit_main(args) -> int:
    """Fit an origin classifier on labelled features files and save it to a folder."""
    import numpy as np

    from montrage.origin.from_store import is_store

    if args.external or (len(args.features) == 1 and is_store(args.features[0])):
        if not args.external:
            raise OriginError(
                f"{args.features[0]!r} is a montrage store: pass the images the model never saw with "
                "--external DIR (members and generations come from the store)."
            )
        return fit_store_main(args)
    if not args.out:
        raise OriginError("--out is required when fitting on features files: the classifier folder to write.")

    from montrage.origin.classifier import OriginClassifier, relabel
    from montrage.origin.featurefile import read_features
    from montrage.origin.metrics import balanced_accuracy

    sets = [read_features(p) for p in args.features]
    labels = [s.strip() for s in args.labels.split(",")] if args.labels else None
    clf = OriginClassifier(families=_families(args.families), transform=args.transform, task=args.task, C=args.C)
    model_path = _model_arg(args.model) if args.model else sets[0].identity.get("model_id")
    clf.fit(sets, labels, model_path=model_path)
    clf.save(args.out)
    y = relabel(clf.row_labels(sets, labels), clf.task)
    pred = np.concatenate([clf.predict(s) for s in sets])
    print(
        json.dumps(
            {
                "classifier": args.out,
                "task": clf.task,
                "classes": clf.classes,
                "train_counts": clf.train_counts,
                "train_balanced_accuracy": round(balanced_accuracy(y, pred), 4),
                "model": model_path,
            }
        )
    )
    return 0


def predict_main(args) -> int:
    """Classify images with a saved origin classifier."""
    from montrage.origin.from_store import classifier_path, is_store
    from montrage.origin.predict import predict_images

    images, classifier, model, resize = list(args.images), args.classifier, args.model, args.resize
    if is_store(images[0]):  # `origin predict STORE IMAGE...`: the store's model and classifier
        store, images = images[0], images[1:]
        if not images:
            raise OriginError(
                f"no images to classify after the store {store!r}: `montrage origin predict STORE IMAGE...`."
            )
        classifier = classifier or classifier_path(store)
        model, resize = model or store, True  # centre-cropped and resized, as the classifier's images were
    if not classifier:
        raise OriginError(
            "pass the classifier folder (--classifier), or a store first: `montrage origin predict STORE IMAGE...`."
        )
    if not os.path.isdir(classifier):
        raise OriginError(f"classifier folder {classifier!r} does not exist: fit it with `montrage origin fit`.")
    captions = None
    if args.captions:
        from montrage.origin.images import expand_image_paths, read_captions

        images = expand_image_paths(images)
        captions = read_captions(images, args.captions)
    results = predict_images(
        images,
        classifier,
        model=_model_arg(model) if model else None,
        lora=args.lora,
        captions=captions,
        resize=resize,
        batch_size=args.batch_size,
        device=args.device,
        progress=not args.quiet and not args.json,
    )
    return _print_results(results, args.json)


def which_fit_main(args) -> int:
    """Fit "which of these fine-tunes made it, or none" from the candidates' stores."""
    from montrage.origin.from_store import fit_which_from_stores

    names = [n.strip() for n in args.names.split(",") if n.strip()] if args.names else None
    report = fit_which_from_stores(
        args.stores,
        args.none,
        args.out,
        names=names,
        generate=args.generate,
        timesteps=args.timesteps,
        relative=args.relative,
        seed=args.seed,
        batch_size=args.batch_size,
        device=args.device,
        progress=not args.quiet,
    )
    print(json.dumps(report))
    return 0


def which_main(args) -> int:
    """Which candidate fine-tune made each image (or none), with an attributor of `origin which-fit`."""
    from montrage.origin.from_store import which_images

    results = which_images(
        args.attributor,
        args.images,
        batch_size=args.batch_size,
        device=args.device,
        progress=not args.quiet and not args.json,
    )
    return _print_results(results, args.json)


def add_origin_parser(subparsers) -> argparse.ArgumentParser:
    """Register `origin features`, `origin fit` and `origin predict` on a `montrage` subparsers object."""
    p = subparsers.add_parser(
        "origin",
        help="origin attribution: is an image a training member, a generation of this "
        "model, or external (trajectory features + linear classifier)",
    )
    sub = p.add_subparsers(dest="origin_command", required=True)

    s = sub.add_parser("features", help="extract trajectory features (loss, ‖∇x L‖², ‖∇θ L‖² per timestep) into HDF5")
    s.add_argument("images", nargs="+", help="image files or folders of images")
    s.add_argument("--model", required=True, help="diffusers model folder or hub id (pixel DDPM or text-to-image)")
    s.add_argument(
        "--lora",
        default=None,
        help="LoRA weights (diffusers format) to load into the UNet; ∇θ then covers the LoRA parameters",
    )
    s.add_argument("--out", required=True, help="features file to write (.h5)")
    s.add_argument(
        "--label", default=None, help="origin of these images, for `origin fit`: member, generated or external"
    )
    s.add_argument("--timesteps", type=int, default=20, help="number of uniformly spaced timesteps (default 20)")
    s.add_argument("--t-grid", default=None, help="explicit comma-separated timesteps (overrides --timesteps)")
    s.add_argument(
        "--families",
        default="",
        help="feature families to compute, from loss, grad_x, grad_theta "
        "(the paper's), loss_pia (PIA-noise losses), loss_ref, grad_x_ref (under the base, adapter models "
        "only), clid_null, clid_perturbed (CLiD; need --captions); default: all that apply and need no "
        "captions",
    )
    s.add_argument(
        "--captions",
        default=None,
        help="each image's own caption: 'sidecar' (<image>.txt beside it) or "
        "a metadata.jsonl (file_name, text); conditions every family and is what CLiD compares against",
    )
    s.add_argument(
        "--params",
        default="trainable",
        help="θ for ∇θ: trainable (requires_grad, e.g. LoRA), all, or comma-separated parameter-name prefixes",
    )
    s.add_argument(
        "--noise", default="random", choices=["random", "pia"], help="fresh seeded ε per (image, t), or PIA's ε_θ(x, 0)"
    )
    s.add_argument("--noise-seed", type=int, default=0)
    s.add_argument(
        "--draws",
        type=int,
        default=1,
        help="ε draws per (image, t), features averaged over them (default 1, the paper's; more = less noisy, slower)",
    )
    s.add_argument("--prompt", default="", help="text condition for latent models (default: the empty prompt)")
    s.add_argument("--layer-norms", action="store_true", help="also keep per-parameter-tensor ‖∇θ L‖² (GSA features)")
    s.add_argument("--batch-size", type=int, default=32, help="(image, timestep) pairs per UNet call / vmap width")
    s.add_argument("--resize", action="store_true", help="centre-crop and resize images of another size")
    s.add_argument("--device", default=None, help="e.g. cuda; default: where the model loads (CPU)")
    s.add_argument(
        "--resolution",
        type=int,
        default=None,
        help="image side (default: the model's native size; Flux, whose transformer has none: 1024)",
    )
    s.add_argument("--quiet", action="store_true")
    s.set_defaults(fn=features_main)

    s = sub.add_parser(
        "fit",
        help="fit an origin classifier on labelled features files, or on a store: `origin fit STORE --external DIR`",
    )
    s.add_argument(
        "features",
        nargs="+",
        help="features files, one per origin (labels from their --label); or one montrage store (with --external)",
    )
    s.add_argument(
        "--out",
        default=None,
        help="classifier folder to write (classifier.json + classifier.npz); for a store, default <store>.origin",
    )
    s.add_argument(
        "--external",
        nargs="+",
        default=None,
        help="store mode: images (files or folders) the model "
        "never saw, e.g. held-out images of the training distribution",
    )
    s.add_argument(
        "--members",
        type=int,
        default=200,
        help="store mode: training images used as members (a seeded subset; default 200)",
    )
    s.add_argument(
        "--generate",
        type=int,
        default=None,
        help="store mode: generations beyond the probes, from the final adapter (default: enough to match the members)",
    )
    s.add_argument("--timesteps", type=int, default=10, help="store mode: uniform timesteps (default 10)")
    s.add_argument(
        "--captions",
        default=None,
        help="store mode: the external images' captions, 'sidecar' or a "
        "metadata.jsonl; with them CLiD's families join the default (members and generations have theirs)",
    )
    s.add_argument(
        "--holdout",
        type=float,
        default=0.25,
        help="store mode: share of each class held out to report accuracy before the final refit on all",
    )
    s.add_argument("--seed", type=int, default=0)
    s.add_argument(
        "--model-path", default=None, help="store mode: the base model, if not at the path the store records"
    )
    s.add_argument("--batch-size", type=int, default=32)
    s.add_argument("--device", default=None)
    s.add_argument("--quiet", action="store_true")
    s.add_argument("--labels", default=None, help="comma-separated label per features file (overrides theirs)")
    s.add_argument("--task", default="ternary", choices=["ternary", "membership", "generated"])
    s.add_argument(
        "--families",
        default="",
        help="families to use (default: all in the features files; for a "
        "store: montrage's default; 'default,loss_snapshots' adds the loss under each stored adapter)",
    )
    s.add_argument("--transform", default="log", choices=["log", "none"])
    s.add_argument(
        "--C",
        default="auto",
        help="inverse L2 regularisation strength of the logistic regression, or "
        "auto (chosen by 5-fold cross-validation, the default)",
    )
    s.add_argument("--model", default=None, help="model path to record for predict (default: the features' model)")
    s.set_defaults(fn=fit_main)

    s = sub.add_parser(
        "predict",
        help="classify images with a saved origin classifier: `origin predict STORE "
        "IMAGE...` or `origin predict IMAGE... --classifier DIR`",
    )
    s.add_argument("images", nargs="+", help="image files or folders, after a store whose classifier to use")
    s.add_argument(
        "--classifier",
        default=None,
        help="folder written by `montrage origin fit` (default for a store: <store>.origin)",
    )
    s.add_argument(
        "--captions",
        default=None,
        help="each image's caption ('sidecar' or a metadata.jsonl): give them "
        "exactly when the classifier's images had theirs (CLiD's families, or features with --captions)",
    )
    s.add_argument("--model", default=None, help="the classifier's model, if not at the recorded path")
    s.add_argument("--lora", default=None)
    s.add_argument("--batch-size", type=int, default=32)
    s.add_argument("--resize", action="store_true")
    s.add_argument("--device", default=None)
    s.add_argument("--json", action="store_true", help="print one JSON list")
    s.add_argument("--quiet", action="store_true")
    s.set_defaults(fn=predict_main)

    s = sub.add_parser("which-fit", help="fit which of several fine-tunes (their stores) made an image, or none")
    s.add_argument("stores", nargs="+", help="the candidates' montrage stores (LoRA runs with adapter snapshots)")
    s.add_argument(
        "--none",
        nargs="+",
        required=True,
        help="images none of them made (files or folders): real images, other models' generations",
    )
    s.add_argument("--out", required=True, help="attributor folder to write")
    s.add_argument("--names", default=None, help="comma-separated candidate names (default: the stores' file names)")
    s.add_argument("--generate", type=int, default=64, help="generations per candidate (its probes first)")
    s.add_argument("--timesteps", type=int, default=10)
    s.add_argument(
        "--relative",
        action="store_true",
        help="feed [mean over candidates | differences | relative "
        "mean log-loss] instead of the candidates' features side by side (ModelAttributor(relative=True))",
    )
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--batch-size", type=int, default=32)
    s.add_argument("--device", default=None)
    s.add_argument("--quiet", action="store_true")
    s.set_defaults(fn=which_fit_main)

    s = sub.add_parser("which", help="which candidate fine-tune made each image, or none (`origin which-fit`)")
    s.add_argument("attributor", help="folder written by `montrage origin which-fit`")
    s.add_argument("images", nargs="+", help="image files or folders")
    s.add_argument("--batch-size", type=int, default=32)
    s.add_argument("--device", default=None)
    s.add_argument("--json", action="store_true", help="print one JSON list")
    s.add_argument("--quiet", action="store_true")
    s.set_defaults(fn=which_main)
    return p
