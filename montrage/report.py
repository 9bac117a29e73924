"""`montrage report STORE --out report.html|report.png`: a run's monitoring, rendered offline in one file.

Sections: concept similarity curves over epochs per probe concept (as the demo's curves.png); attribution curves
per probe prompt when an attribution model exists (`montrage attribute fit`'s `<store>_attribution/final`, else the
live one AttributionCurves saved in `<store>_attribution_live/final`); each probe's final generation beside its top
training images; the MemorizationGuard's alerts (`<store>_memorization.json`) with both images; and, given images
and an origin classifier of the store (`montrage origin fit STORE`'s `<store>.origin`), each image's origin
probabilities (member / generated / external). HTML inlines every image as base64 PNG, so the file stands alone.
"""

from __future__ import annotations

import base64
import html
import io
import os
import time
from typing import TYPE_CHECKING

import numpy as np

from montrage.errors import MontrageError

if TYPE_CHECKING:
    from montrage.store import StoreReader

SUFFIXES = (".html", ".png")


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    _plt().close(fig)
    return buf.getvalue()


def find_model_dir(store_path: str, model_dir: str | None = None) -> str | None:
    """The attribution model folder to use: the given one, the fitted one, else the live one (None if neither)."""
    from montrage.attribution.curves import live_model_dir
    from montrage.attribution.fit import default_model_dir

    if model_dir is not None:
        return model_dir
    for d in (default_model_dir(store_path), live_model_dir(store_path)):
        if os.path.isfile(os.path.join(d, "final.json")):
            return d
    return None


def train_thumbnails(store: StoreReader, size: int) -> tuple[np.ndarray, list[str]]:
    """(N, size, size, 3) uint8 training images read from their paths (grey where unreadable) and the ids missing."""
    import torch

    from montrage.data import read_example, to_thumbnails

    pixels, missing = [], []
    for ex in store.train:
        try:
            pixels.append(read_example(ex, size))
        except (ValueError, OSError):
            pixels.append(torch.zeros(3, size, size))
            missing.append(ex.id)
    return to_thumbnails(torch.stack(pixels), size), missing


def store_concept_curves(store: StoreReader) -> tuple[np.ndarray, list[str]]:
    """(E, C, C) centred similarity of each probe concept to each training concept in the first layer, per stored
    epoch, and the (sorted training) concepts that index it."""
    from montrage.similarity import concept_curves

    layer, concepts = store.layers[0], sorted({e.concept for e in store.train})
    curves = concept_curves(
        store.probe_features(layer),
        store.train_features(layer),
        store.probes.primary_concepts(),
        [e.concept for e in store.train],
        concepts,
        centre=True,
    )
    return curves, concepts


def concept_curves_figure(store: StoreReader, curves: tuple[np.ndarray, list[str]] | None = None) -> bytes:
    """One panel per probe concept: its similarity to every training concept over epochs (`curves`: what
    `store_concept_curves(store)` returns, when the caller has it already)."""
    plt = _plt()
    layer = store.layers[0]
    curves, concepts = curves or store_concept_curves(store)
    shown = [i for i, c in enumerate(concepts) if not np.all(np.isnan(curves[:, i]))]
    fig, axes = plt.subplots(1, len(shown), figsize=(3.2 * len(shown), 3.0), sharey=True, squeeze=False)
    for ax, i in zip(axes[0], shown):
        for j, tc in enumerate(concepts):
            ax.plot(store.epochs, curves[:, i, j], marker="o", lw=2.5 if i == j else 1.2, label=tc)
        ax.set_title(f"probes of {concepts[i]}", fontsize=9)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel(f"similarity to training concept\n(centred shifted cosine, {layer})")
    axes[0][-1].legend(title="training concept", fontsize=7)
    fig.tight_layout()
    return _png(fig)


def attribution_figure(curves: dict, prompts: list[str], seeds_per_prompt: int) -> bytes:
    """One panel per probe prompt (mean over its seeds): each concept's attribution score over epochs."""
    plt = _plt()
    scores = curves["scores"]  # (E, P, C)
    per_prompt = scores.reshape(scores.shape[0], len(prompts), seeds_per_prompt, -1).mean(axis=2)
    cols = min(4, len(prompts))
    rows = -(-len(prompts) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 2.8 * rows), sharey=True, squeeze=False)
    for k, prompt in enumerate(prompts):
        ax = axes[k // cols][k % cols]
        for c, concept in enumerate(curves["concepts"]):
            ax.plot(curves["epochs"], per_prompt[:, k, c], marker="o", label=concept)
        ax.set_title(prompt, fontsize=8)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
    for k in range(len(prompts), rows * cols):
        axes[k // cols][k % cols].axis("off")
    axes[0][0].set_ylabel("attribution score")
    axes[0][min(cols, len(prompts)) - 1].legend(title="training concept", fontsize=7)
    fig.tight_layout()
    return _png(fig)


def image_rows_figure(rows: list[tuple[np.ndarray, str, list[tuple[np.ndarray, str]]]]) -> bytes:
    """Each row: a probe image with its caption, then images with captions (top training images, or the copy)."""
    plt = _plt()
    k = max(len(r[2]) for r in rows) + 1
    fig, axes = plt.subplots(len(rows), k, figsize=(1.5 * k + 0.5, 1.7 * len(rows)), squeeze=False)
    for ax_row, (probe, caption, others) in zip(axes, rows):
        for ax, (img, cap) in zip(ax_row, [(probe, caption)] + others):
            ax.imshow(img, interpolation="nearest")
            ax.set_title(cap, fontsize=6)
        for ax in ax_row:
            ax.axis("off")
    fig.tight_layout()
    return _png(fig)


def origin_figure(thumbs: list[np.ndarray], results: list[dict]) -> bytes:
    """Each row: an image, then a bar per origin class with its probability (the predicted class dark)."""
    plt = _plt()
    fig, axes = plt.subplots(
        len(results), 2, figsize=(5.5, 1.2 * len(results) + 0.3), squeeze=False, gridspec_kw={"width_ratios": [1, 3]}
    )
    for (ax_img, ax_bar), img, r in zip(axes, thumbs, results):
        ax_img.imshow(img, interpolation="nearest")
        ax_img.set_title(os.path.basename(r["image"]), fontsize=6)
        ax_img.axis("off")
        classes, probs = list(r["probabilities"]), list(r["probabilities"].values())
        ax_bar.barh(classes, probs, color=["tab:blue" if c == r["prediction"] else "lightsteelblue" for c in classes])
        ax_bar.set_xlim(0, 1)
        ax_bar.tick_params(labelsize=6)
        for y, p in enumerate(probs):
            ax_bar.text(min(p + 0.02, 0.9), y, f"{p:.2f}", va="center", fontsize=6)
    fig.tight_layout()
    return _png(fig)


class StoreOrigin:
    """The store's origin classifier (`<store>.origin`, or the one given) and its model, loaded at the first use, so
    the alerts and the images are classified with one load."""

    def __init__(self, store_path: str, classifier: str | None):
        from montrage.origin.from_store import classifier_path

        self.store_path, self.path = store_path, classifier or classifier_path(store_path)
        self.exists = os.path.isfile(os.path.join(self.path, "classifier.json"))
        self._loaded = None

    def load(self):
        from montrage.origin.predict import load_with_model

        if self._loaded is None:
            self._loaded = load_with_model(self.path, self.store_path)
        return self._loaded


def origin_section(origin: StoreOrigin, images: list[str] | None) -> tuple[str, bytes | None, str]:
    """The report's origin section: the images' origin probabilities under the store's classifier."""
    if not origin.exists:
        return (
            "Origin",
            None,
            f"No origin classifier at {origin.path}: run `montrage origin fit {origin.store_path} "
            "--external DIR`, then `montrage report ... --origin IMAGE...`.",
        )
    if not images:
        return (
            "Origin",
            None,
            f"Origin classifier at {origin.path}: pass --origin IMAGE... to show images' origin probabilities.",
        )
    from montrage.data import open_rgb
    from montrage.origin.images import expand_image_paths
    from montrage.origin.predict import predict_images

    paths = expand_image_paths(list(images))
    results = predict_images(paths, *origin.load(), resize=True, progress=False)
    thumbs = [np.asarray(open_rgb(p)) for p in paths]
    return (
        "Origin",
        origin_figure(thumbs, results),
        f"Origin probabilities under {origin.path} (classes {', '.join(results[0]['probabilities'])}): is the "
        "image a training member, a generation of this model, or external?",
    )


def alert_origins(alerts: list[dict], probe_thumbs: list[np.ndarray], origin: StoreOrigin) -> str:
    """Give the alerts without origin probabilities those of their probe generation under the store's origin
    classifier, if it has one; returns a sentence for the section text."""
    todo = [k for k, a in enumerate(alerts) if not a.get("origin")]
    if todo and origin.exists:
        from montrage.origin.predict import predict_generations

        found = predict_generations(
            [probe_thumbs[k] for k in todo], [alerts[k]["prompt"] for k in todo], *origin.load()
        )
        for k, probabilities in zip(todo, found):
            alerts[k]["origin"] = probabilities
    classified = [a["origin"] for a in alerts if a.get("origin")]
    if not classified:
        return ""
    members = sum(max(o, key=o.get) == "member" for o in classified)
    return (
        f" Origin: each probe generation's probabilities under {origin.path}; {members} of {len(classified)} look "
        "like a training member to the model (a copy it treats as its own training data)."
    )


def top_images(
    store: StoreReader, model_dir: str | None, top_k: int
) -> tuple[dict | None, np.ndarray, np.ndarray, str]:
    """Attribution curves (or None) and each probe's top-K training images at the last epoch, with how they were ranked."""
    from montrage.attribution.curves import attribution_curves, load_final_model
    from montrage.memorization import representation_similarity

    if model_dir is not None:
        curves = attribution_curves(store, load_final_model(store, model_dir), top_k)
        return curves, curves["top"], curves["top_scores"], f"attribution score ({model_dir})"
    layer, last = store.layers[0], store.num_epochs - 1
    sim = representation_similarity(store.probe_features(layer)[last], store.train_features(layer)[last])
    top = np.argsort(-sim, axis=1)[:, :top_k]
    return None, top, np.take_along_axis(sim, top, axis=1), f"representation similarity ({layer}; no attribution model)"


def build_report(
    store_path: str,
    out: str,
    model_dir: str | None = None,
    alerts_path: str | None = None,
    top_k: int = 5,
    origin_images: list[str] | None = None,
    origin_classifier: str | None = None,
) -> dict:
    """Render the report to `out` (.html or .png); returns what it contains. `origin_images`: images whose origin
    probabilities to show (under `origin_classifier`, default `<store>.origin`)."""
    from montrage.memorization import default_alerts_path, format_origin, read_alerts
    from montrage.store import StoreError, StoreReader

    suffix = os.path.splitext(out)[1].lower()
    if suffix not in SUFFIXES:
        raise MontrageError(f"report output {out!r}: the file name must end in .html or .png.")
    if model_dir is not None and not os.path.isfile(os.path.join(model_dir, "final.json")):
        raise MontrageError(
            f"attribution model folder {model_dir!r} holds no final.json; pass the folder `montrage attribute "
            "fit` wrote (<store>_attribution), or omit --model-dir."
        )
    alerts_path = alerts_path or default_alerts_path(store_path)
    origin = StoreOrigin(store_path, origin_classifier)  # loaded once, if the alerts or the images need it
    with StoreReader(store_path) as store:
        if store.num_epochs == 0:
            raise StoreError(f"store {store_path!r} holds no complete epoch yet: nothing to report.")
        thumbs = store.probe_images()
        size, last = thumbs.shape[2], store.num_epochs - 1
        train, items, epochs = store.train, store.probes.items(), [int(e) for e in store.epochs]
        train_thumbs, missing = train_thumbnails(store, size)
        sections: list[tuple[str, bytes | None, str]] = []
        sections.append(
            (
                "Concept similarity over epochs",
                concept_curves_figure(store),
                "Per probe concept: mean similarity of its probe generations to each training concept's images.",
            )
        )
        model_dir = find_model_dir(store_path, model_dir)
        curves, top, top_scores, ranked_by = top_images(store, model_dir, top_k)
        if curves is not None:
            seeds = len(store.probes.seeds)
            sections.append(
                (
                    "Attribution curves",
                    attribution_figure(curves, list(store.probes.prompts), seeds),
                    f"Final-epoch attribution model from {model_dir}: each epoch's probe generations scored against "
                    "that epoch's training images; mean over seeds.",
                )
            )
        else:
            sections.append(
                (
                    "Attribution curves",
                    None,
                    "No attribution model found: run `montrage attribute fit "
                    f"{store_path}`, or train with the AttributionCurves callback.",
                )
            )
        rows = [
            (
                thumbs[last, p],
                f"{prompt}\nseed {seed}, epoch {epochs[last]}",
                [(train_thumbs[i], f"{train[i].concept}\n{s:.3f}") for i, s in zip(top[p], top_scores[p])],
            )
            for p, (prompt, seed) in enumerate(items)
        ]
        sections.append(
            (
                "Top training images per probe",
                image_rows_figure(rows),
                f"Ranked by {ranked_by}."
                + (f" {len(missing)} training image(s) could not be read and show grey." if missing else ""),
            )
        )
        record = read_alerts(alerts_path) if os.path.isfile(alerts_path) else None
        alerts = record["alerts"] if record else []
        if alerts:
            row_of = {e: r for r, e in enumerate(epochs)}
            shown = [a for a in alerts if a["epoch"] in row_of][:24]
            probe_thumbs = [thumbs[row_of[a["epoch"]], a["probe"]] for a in shown]
            origin_note = alert_origins(shown, probe_thumbs, origin)
            rows = [
                (
                    t,
                    f"{a['prompt']}\nseed {a['seed']}, epoch {a['epoch']}"
                    + (f"\norigin {format_origin(a['origin'])}" if a.get("origin") else ""),
                    [(train_thumbs[a["train_index"]], f"{a['train_id']}\npixel {a['pixel']}")],
                )
                for t, a in zip(probe_thumbs, shown)
            ]
            text = (
                f"{len(alerts)} alert(s) in {alerts_path} (thresholds {record.get('config')}); first {len(shown)} shown: "
                "probe generation beside the training image it copies." + origin_note
            )
            sections.append(("Memorization alerts", image_rows_figure(rows), text))
        else:
            text = (
                f"No alerts in {alerts_path}."
                if record
                else "No memorization record (train with the MemorizationGuard callback to get one)."
            )
            sections.append(("Memorization alerts", None, text))
        info = {
            "store": store_path,
            "epochs": epochs,
            "probes": len(items),
            "training images": len(train),
            "concepts": sorted({e.concept for e in train}),
            "layers": store.layers,
            "timesteps": store.timesteps,
            "attribution model": model_dir,
            "memorization alerts": len(alerts),
        }
    sections.append(origin_section(origin, origin_images))
    if suffix == ".html":
        write_html(out, info, sections, alerts)
    else:
        write_png(out, sections)
    return {"out": out, "sections": [s[0] for s in sections if s[1] is not None], **info}


def write_html(out: str, info: dict, sections: list, alerts: list[dict]) -> None:
    esc = html.escape
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'><title>montrage report</title>",
        "<style>body{font-family:sans-serif;max-width:1200px;margin:auto}td,th{padding:2px 8px;text-align:left}"
        "img{max-width:100%}</style></head><body>",
        f"<h1>montrage report</h1><p>{esc(time.strftime('%Y-%m-%d %H:%M'))}</p><table>",
    ]
    parts += [f"<tr><th>{esc(k)}</th><td>{esc(str(v))}</td></tr>" for k, v in info.items()]
    parts.append("</table>")
    for title, png, text in sections:
        parts.append(f"<h2>{esc(title)}</h2><p>{esc(text)}</p>")
        if png is not None:
            parts.append(f"<img alt='{esc(title)}' src='data:image/png;base64,{base64.b64encode(png).decode()}'>")
    if alerts:
        from montrage.memorization import format_origin

        cols = ["epoch", "prompt", "seed", "train_id", "train_concept", "pixel", "representation", "origin"]
        parts.append("<table><tr>" + "".join(f"<th>{c}</th>" for c in cols) + "</tr>")
        for a in alerts:
            values = {**a, "origin": format_origin(a["origin"]) if a.get("origin") else None}
            parts.append("<tr>" + "".join(f"<td>{esc(str(values.get(c)))}</td>" for c in cols) + "</tr>")
        parts.append("</table>")
    parts.append("</body></html>")
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "w", encoding="utf-8") as fh:
        fh.write("\n".join(parts))


def write_png(out: str, sections: list) -> None:
    """The section figures stacked vertically, each under its title."""
    from PIL import Image, ImageDraw

    blocks = []
    for title, png, text in sections:
        img = Image.open(io.BytesIO(png)).convert("RGB") if png is not None else None
        width = img.width if img is not None else 900
        head = Image.new("RGB", (width, 40), "white")
        draw = ImageDraw.Draw(head)
        draw.text((8, 4), title, fill="black")
        draw.text((8, 22), text[:160], fill="dimgray")
        blocks += [head] + ([img] if img is not None else [])
    width = max(b.width for b in blocks)
    page = Image.new("RGB", (width, sum(b.height for b in blocks)), "white")
    y = 0
    for b in blocks:
        page.paste(b, (0, y))
        y += b.height
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    page.save(out)


def cmd_report(args) -> int:
    result = build_report(
        args.store, args.out, args.model_dir, args.alerts, args.top_k, args.origin, args.origin_classifier
    )
    print(
        f"montrage report: wrote {result['out']} ({', '.join(result['sections'])}; "
        f"{result['memorization alerts']} memorization alert(s))"
    )
    return 0


def add_report_parser(sub) -> None:
    s = sub.add_parser(
        "report",
        help="render a store's curves, attribution, top images and memorization alerts "
        "to one HTML (self-contained) or PNG file",
    )
    s.add_argument("store")
    s.add_argument("--out", required=True, help="report.html or report.png")
    s.add_argument(
        "--model-dir",
        default=None,
        help="attribution models (default: <store>_attribution/, else the live <store>_attribution_live/)",
    )
    s.add_argument("--alerts", default=None, help="memorization record (default: <store>_memorization.json)")
    s.add_argument("--top-k", type=int, default=5)
    s.add_argument(
        "--origin",
        nargs="+",
        default=None,
        help="images (files or folders) whose origin probabilities to show, under the store's origin classifier",
    )
    s.add_argument(
        "--origin-classifier",
        default=None,
        help="origin classifier folder (default: <store>.origin, written by `montrage origin fit STORE`)",
    )
    s.set_defaults(fn=cmd_report)
