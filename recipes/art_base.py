"""A tiny offline base that already draws icons: the digits base's layout, pre-trained on a pool of icon themes.

Customizing it to other themes then teaches a new *style* to a model that knows the contents, as a user's LoRA
teaches an artist's style to Stable Diffusion. Every pool icon is trained under "an icon of a printer" and, with
probability `class_caption_prob`, under "an icon of a printer in the style of <theme>", so the base uses the
style phrase; the customized themes' words are in its vocabulary but never trained. The text encoder stays as
built (Stable Diffusion's UNet, too, learns on a frozen CLIP), so every word keeps a distinct encoding. The VAE downsamples 32 px
icons by 4, so the UNet sees the digits base's 8x8 latents. Cached by a hash of the config, like the digits base.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import hashlib
import json
import os
import tempfile

import numpy as np

from montrage.recipes import icons
from montrage.recipes.tiny_base import WORDS, build_components, cached_base, pretrain_on

# Theme families: themes derived from one another (GNOME 2 from Tango, Obsidian from Faenza, ...) share a style, so a
# pool never holds a relative of a customized theme.
FAMILIES = {
    "tango": ("Tango", "gnome", "mate", "menta", "Sea", "Vintage", "Suede", "Nuovo", "yasis"),
    "faenza": ("Faenza*", "Obsidian*"),
    "elementary": ("elementary*",),
    "papirus": ("Papirus*", "ePapirus*"),
    "breeze": ("breeze*",),
    "numix": ("Numix*",),
    "bloom": ("bloom*", "deepin*"),
    "faba": ("Faba", "Moka"),
    "adwaita": ("Adwaita*",),
    "oxygen": ("oxygen*",),
}
KNOWN_THEMES = (
    "Adwaita",
    "Faba",
    "Faenza",
    "Moka",
    "Numix",
    "Nuovo",
    "Obsidian",
    "Papirus",
    "Sea",
    "Suede",
    "Tango",
    "Vintage",
    "bloom",
    "breeze",
    "deepin",
    "elementary",
    "gartoon",
    "gnome",
    "hicolor",
    "mate",
    "menta",
    "nuoveXT2",
    "oxygen",
    "sugar",
    "suru",
    "yasis",
)
MIN_POOL_ICONS = 40


def family(theme: str) -> str:
    for name, patterns in FAMILIES.items():
        if any(fnmatch.fnmatchcase(theme, p) for p in patterns):
            return name
    return theme.lower()


def vocabulary() -> tuple[str, ...]:
    """Whole-word tokens beside the digits base's words: the icon contents' words and known themes' tokens (other
    themes' names fall back to letters)."""
    words = ["icon", "style"]
    for name in icons.ICON_NAMES:
        words += icons.content_words(name).split()
    words += [icons.theme_token(t) for t in KNOWN_THEMES]
    return tuple(w for w in dict.fromkeys(words) if w not in WORDS)


@dataclasses.dataclass(frozen=True)
class ArtBaseConfig:
    themes: tuple[str, ...]  # the pre-training pool
    image_size: int = icons.SIZE
    vae_blocks: int = 3
    vae_steps: int = 400
    unet_steps: int = 1500
    batch_size: int = 64
    learning_rate: float = 2e-3
    class_caption_prob: float = 0.5
    seed: int = 0
    max_length: int = 24
    train_text_encoder: bool = False  # True: the first recipe, whose encoder maps the never-trained style words alike

    def digest(self) -> str:
        d = dataclasses.asdict(self)
        if d["train_text_encoder"]:  # the first recipe: bases cached before the option keep their digest
            del d["train_text_encoder"]
        blob = json.dumps(d, sort_keys=True) + "|" + ",".join(vocabulary()) + "|v1"
        return hashlib.sha256(blob.encode()).hexdigest()[:12]


def default_pool(customized: list[str], icons_dir: str = icons.ICONS_DIR, size: int = icons.SIZE) -> list[str]:
    """One theme per installed family that no customized theme belongs to (the one drawing the most of montrage's
    icon names), among themes with at least `MIN_POOL_ICONS` of them."""
    taken = {family(t) for t in customized}
    best: dict[str, tuple[int, str]] = {}
    for name, folder in icons.installed_themes(icons_dir).items():
        fam = family(name)
        if fam in taken:
            continue
        n = len(icons.theme_icons(folder, size))
        if n >= MIN_POOL_ICONS and (fam not in best or (-n, name) < (-best[fam][0], best[fam][1])):
            best[fam] = (n, name)
    pool = sorted(name for _, name in best.values())
    if len(pool) < 2:
        raise icons.DataError(
            f"the art base needs at least two icon themes outside the customized families "
            f"({', '.join(sorted(taken))}) with {MIN_POOL_ICONS}+ icons in {icons_dir!r}; found "
            f"{pool or 'none'}: install more themes (docs/results.md, 'Real artwork: icon themes') or pass --pretrain-themes."
        )
    return pool


def art_base_path(
    pool: list[str],
    icons_dir: str = icons.ICONS_DIR,
    cfg: ArtBaseConfig | None = None,
    progress: bool = True,
    cache_dir: str | None = None,
) -> str:
    """Path of the cached art base pre-trained on the themes `pool` (built on first use, a few minutes on 2 cores)."""
    cfg = cfg or ArtBaseConfig(themes=tuple(sorted(pool)))

    def build():
        from montrage.data import ConceptImageDataset

        with tempfile.TemporaryDirectory() as tmp:
            examples = icons.build_icon_set(
                list(cfg.themes),
                os.path.join(tmp, "pool"),
                icons_per_theme=10**6,
                size=cfg.image_size,
                icons_dir=icons_dir,
                shared=False,
            )
            pixels = ConceptImageDataset(examples, cfg.image_size).pixels
        contents = [icons.content_words(icons.icon_of(e)) for e in examples]
        captions = [f"an icon of a {c}" for c in contents] + [e.caption for e in examples]
        generic = np.arange(len(examples))
        parts = build_components(cfg, vocabulary(), cfg.vae_blocks)
        return pretrain_on(parts, pixels, captions, generic, generic + len(examples), cfg, progress, "art base")

    return cached_base("art-base", cfg, build, cache_dir)


def style_response(base: str, prompts: list[str], seed: int = 0) -> float:
    """How differently the base's denoiser responds to `prompts`: the std over the prompts of its noise prediction
    for fixed noisy latents (t = 500), relative to the prediction's mean magnitude. The LoRA customization trains
    only the UNet on top of the frozen text encoder; styles whose words the base barely tells apart gave the
    customization little to start from. A check of the benchmark's construction, not a score."""
    import torch

    from montrage.components import load_components

    c = load_components(base)
    ids = c.tokenizer(
        list(prompts),
        padding="max_length",
        max_length=c.tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    ).input_ids
    size = c.unet.config.sample_size
    z = torch.randn(4, c.unet.config.in_channels, size, size, generator=torch.Generator().manual_seed(seed))
    t = torch.full((len(z),), 500)
    with torch.no_grad():
        h = c.text_encoder(ids)[0]
        out = torch.stack([c.unet(z, t, h[i : i + 1].expand(len(z), -1, -1)).sample for i in range(len(prompts))])
    return float(out.std(dim=0).mean() / out.abs().mean().clamp_min(1e-12))
