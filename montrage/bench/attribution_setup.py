"""What the attribution benchmark measures: its settings, the probes and held-out queries with their ground truth
(digits or icon themes), and every figure computed from one method's scores."""

from __future__ import annotations

import numpy as np

from montrage import metrics
from montrage.data import DataError, image_token
from montrage.probes import ProbeSet

TEMPLATES = {"exemplar": "a photo of {token}", "tokens": "a photo of {token} {image_token}"}


PROBE_SEEDS = {"exemplar": [0, 1, 2, 3], "tokens": [0, 1]}


LAYERS = ["down_blocks.1", "mid_block", "up_blocks.0"]


QUERY_SEEDS = [100, 101, 102, 103, 104, 105, 106, 107]


EXEMPLAR_REPEATS = 8


SCORES, RUN = "scores.npz", "run.json"  # a kept run's saved method scores and query set, for `rescore_seed`


FINE_TUNE = {"lora_rank": 8, "lora_alpha": 8, "learning_rate": 1e-2}  # the benchmark's customization


PROMPTS = {"concept": "a photo of {token}", "mixture": "a photo of {a} and {b}", "image": "a photo of {token} {image}"}


ICON_PROMPTS = {
    "concept": "an icon in the style of {token}",
    "mixture": "an icon in the style of {a} and {b}",
    "image": "an icon of a {image} in the style of {token}",
}


def build_probes(
    examples,
    tokens: dict[str, str],
    per_image: list,
    seeds: list[int],
    mixtures: bool = True,
    exemplars: dict[str, str] | None = None,
    prompts: dict[str, str] = PROMPTS,
) -> tuple[ProbeSet, list[str]]:
    """Concept, mixture and per-image prompts with their ground truth, and each prompt's kind.

    `per_image`: (example, the words that name it: its image token, or an icon's content). `exemplars`: concept ->
    id of the image over-sampled in training (AbC-style customization toward an exemplar), the within-concept ground
    truth of that concept's prompts. `prompts`: the format of each kind (`PROMPTS`, `ICON_PROMPTS`).
    """
    concepts = sorted(tokens)
    exemplars = exemplars or {}
    texts, weights, within, kinds = [], [], [], []
    for c in concepts:
        texts.append(prompts["concept"].format(token=tokens[c]))
        weights.append({c: 1.0})
        within.append({exemplars[c]: 1.0} if c in exemplars else {})
        kinds.append("concept")
    if mixtures:
        for i, a in enumerate(concepts):
            for b in concepts[i + 1 :]:
                texts.append(prompts["mixture"].format(a=tokens[a], b=tokens[b]))
                weights.append({a: 0.5, b: 0.5})
                within.append({})
                kinds.append("mixture")
    for ex, tok in per_image:
        texts.append(prompts["image"].format(token=tokens[ex.concept], image=tok))
        weights.append({ex.concept: 1.0})
        within.append({ex.id: 1.0})
        kinds.append("image")
    return ProbeSet(tuple(texts), tuple(weights), tuple(seeds), tuple(concepts), tuple(within)), kinds


def split_images(examples, name=lambda k, ex: image_token(k)) -> tuple[list, list]:
    """Per concept, the first half of its images are named by probes, the second half only by held-out queries;
    `name(k, example)` gives the words that name a concept's k-th image (default: its image token)."""
    probe, held = [], []
    by_concept: dict[str, list] = {}
    for ex in examples:
        by_concept.setdefault(ex.concept, []).append(ex)
    for c in sorted(by_concept):
        items = [(ex, name(k, ex)) for k, ex in enumerate(by_concept[c])]
        half = max(1, len(items) // 2)
        probe += items[:half]
        held += items[half:]
    return probe, held


def evaluate(
    scores: np.ndarray,
    queries: ProbeSet,
    kinds: list[str],
    train,
    concepts: list[str],
    image_metric: str = "within_token",
) -> dict:
    """All metrics of one method's (Q, N) image scores on the held-out queries (`kinds` from `build_probes`); the
    per-image queries' within-concept figures are named `image_metric` (`within_token`, `within_content`)."""
    train_concepts = [e.concept for e in train]
    ids = [e.id for e in train]
    cs = metrics.concept_scores_from_images(scores, train_concepts, concepts)
    w = np.array(queries.weight_matrix())
    kind = np.array([k for k in kinds for _ in queries.seeds])
    ex = [d for d in queries.exemplars for _ in queries.seeds]
    has_exemplar = np.array([bool(d) for d in ex])
    single, mixture = kind == "concept", kind == "mixture"
    own = np.array(train_concepts)[None, :] == np.array(concepts)[np.argmax(w, axis=1)][:, None]
    out = {
        "top1": metrics.top1_accuracy(cs[single], np.argmax(w[single], axis=1)),
        "auc": metrics.mean_auc(scores[single], own[single]),
        "mixture_spearman": metrics.mixture_spearman(cs[mixture], w[mixture]) if mixture.any() else float("nan"),
    }
    exemplar = np.array([[i in d for i in ids] for d in ex])
    for prefix, rows in (("within", single & has_exemplar), (image_metric, kind == "image")):
        if rows.any():
            out[f"{prefix}_recall@1"] = metrics.within_recall_at_k(scores[rows], exemplar[rows], own[rows], 1)
            out[f"{prefix}_recall@5"] = metrics.within_recall_at_k(scores[rows], exemplar[rows], own[rows], 5)
            out[f"{prefix}_map"] = metrics.within_map(scores[rows], exemplar[rows], own[rows])
    return {k: float(v) for k, v in out.items()}


def prepare_dataset(
    dataset: str,
    concepts: list[int],
    themes: list[str] | None,
    pretrain_themes: list[str] | None,
    icons_dir: str | None,
    icons_per_theme: int,
    progress: bool = True,
    data_dir: str | None = None,
    pretrain_text_encoder: str = "frozen",
) -> dict | None:
    """Check the dataset flags and build the base once: the icon set's description for `run_seed` (None: digits or
    a folder)."""
    from montrage.recipes.tiny_base import tiny_base_path

    if dataset == "icons":
        from montrage.recipes import icons
        from montrage.recipes.art_base import ArtBaseConfig, art_base_path, default_pool, family, style_response

        icons_dir = icons_dir or icons.ICONS_DIR
        if not themes or len(themes) < 2:
            raise DataError(
                "--dataset icons needs --themes with at least two installed icon themes, e.g. "
                f"--themes Tango,oxygen,breeze,Papirus; installed in {icons_dir!r}: "
                f"{', '.join(icons.installed_themes(icons_dir)) or 'none'}."
            )
        themes = list(icons.resolve_themes(themes, icons_dir))
        pool = (
            list(icons.resolve_themes(pretrain_themes, icons_dir))
            if pretrain_themes
            else default_pool(themes, icons_dir)
        )
        shared = sorted({family(t) for t in pool} & {family(t) for t in themes})
        if shared:
            raise DataError(
                f"--pretrain-themes {', '.join(pool)} share a family ({', '.join(shared)}) with --themes; "
                "the art base must not know a customized style: choose pre-training themes of other families."
            )
        if pretrain_text_encoder not in ("train", "frozen"):
            raise DataError(f"--pretrain-text-encoder must be train or frozen, not {pretrain_text_encoder!r}.")
        cfg = ArtBaseConfig(themes=tuple(sorted(pool)), train_text_encoder=pretrain_text_encoder == "train")
        base = art_base_path(pool, icons_dir, cfg, progress=progress)
        style = ICON_PROMPTS["concept"]
        diagnostics = {
            name: style_response(base, [style.format(token=icons.theme_token(t)) for t in group])
            for name, group in (("style_response", themes), ("pool_style_response", pool))
        }
        return {
            "themes": themes,
            "pool": pool,
            "icons_dir": icons_dir,
            "icons_per_theme": icons_per_theme,
            "base": base,
            "text_encoder": pretrain_text_encoder,
            "diagnostics": diagnostics,
        }
    if dataset != "digits":
        raise DataError(f"--dataset must be digits or icons, not {dataset!r}.")
    if data_dir is None and len(concepts) < 2:
        raise DataError("--concepts needs at least two digits, e.g. 1,4,7,9.")
    tiny_base_path(progress=progress)
    return None
