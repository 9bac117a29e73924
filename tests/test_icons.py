"""The icon-style dataset builder and the art base's pool, on icon themes written by the test (none are installed)."""

import os

import numpy as np
import pytest
from PIL import Image

from montrage.data import DataError
from montrage.errors import MontrageError
from montrage.recipes import icons
from montrage.recipes.art_base import default_pool, family, style_response, vocabulary

SVG = (
    '<svg xmlns="http://www.w3.org/2000/svg" width="16" height="16"><rect x="0" y="0" width="16" height="16" '
    'fill="#ff0000"/></svg>'
)


def write_theme(root, name, icons_at: dict, dirs: dict) -> str:
    """A theme folder: `dirs` {directory: (type, size)}, `icons_at` {directory: [(icon name, colour or 'svg')]}."""
    folder = os.path.join(root, name)
    lines = ["[Icon Theme]", f"Name={name}", "Directories=" + ",".join(dirs)]
    for d, (kind, size) in dirs.items():
        os.makedirs(os.path.join(folder, d), exist_ok=True)
        lines += ["", f"[{d}]", f"Size={size}", f"Type={kind}"]
    with open(os.path.join(folder, "index.theme"), "w") as fh:
        fh.write("\n".join(lines) + "\n")
    for d, items in icons_at.items():
        size = dirs[d][1]
        for icon, colour in items:
            if colour == "svg":
                with open(os.path.join(folder, d, f"{icon}.svg"), "w") as fh:
                    fh.write(SVG)
            else:
                im = Image.new("RGBA", (size, size), (0, 0, 0, 0))
                im.paste(Image.new("RGBA", (size // 2, size // 2), colour), (size // 4, size // 4))
                im.save(os.path.join(folder, d, f"{icon}.png"))
    return folder


@pytest.fixture()
def themes(tmp_path):
    root = str(tmp_path / "icons")
    dirs = {
        "32x32/apps": ("Fixed", 32),
        "48x48/apps": ("Fixed", 48),
        "16x16/apps": ("Fixed", 16),
        "symbolic/apps": ("Scalable", 16),
    }
    names = ["folder", "printer", "user-trash", "computer"]
    write_theme(
        root,
        "Tango",
        {
            "32x32/apps": [(n, (200, 0, 0, 255)) for n in names[:2]],
            "48x48/apps": [(n, (0, 0, 200, 255)) for n in names],  # 32 px wins where both exist
            "symbolic/apps": [("zoom-in", "svg")],
        },
        dirs,
    )
    write_theme(root, "oxygen", {"16x16/apps": [(n, (0, 200, 0, 255)) for n in names]}, dirs)
    write_theme(root, "breeze", {"16x16/apps": [("folder", (9, 9, 9, 255))]}, dirs)
    folder = write_theme(root, "Papirus", {"48x48/apps": [(n, (50, 50, 50, 255)) for n in names[:3]]}, dirs)
    os.symlink(os.path.join(folder, "48x48/apps/folder.png"), os.path.join(folder, "48x48/apps/computer.png"))
    os.makedirs(os.path.join(root, "not-a-theme"))
    return root


def test_themes_are_found_and_each_icon_takes_its_best_file(themes):
    assert list(icons.installed_themes(themes)) == ["Papirus", "Tango", "breeze", "oxygen"]
    tango = icons.theme_icons(os.path.join(themes, "Tango"))
    assert sorted(tango) == ["computer", "folder", "printer", "user-trash"]  # the symbolic zoom-in is skipped
    assert "/32x32/" in tango["folder"] and "/48x48/" in tango["computer"]
    papirus = icons.theme_icons(os.path.join(themes, "Papirus"))
    assert ("folder" in papirus) != ("computer" in papirus) and len(papirus) == 3  # an alias is one image, kept once


def test_icon_set_has_shared_contents_captions_and_fixed_size(themes, tmp_path):
    out = str(tmp_path / "set")
    ex = icons.build_icon_set(["tango", "Oxygen"], out, icons_per_theme=3, icons_dir=themes)  # any letter case
    assert sorted({e.concept for e in ex}) == ["Tango", "oxygen"]
    per = {c: sorted(icons.icon_of(e) for e in ex if e.concept == c) for c in ("Tango", "oxygen")}
    assert per["Tango"] == per["oxygen"] and len(per["Tango"]) == 3  # the same contents in every style
    e = next(e for e in ex if e.concept == "Tango" and icons.icon_of(e) == "user-trash")
    assert e.caption == "an icon of a user trash in the style of tango"
    im = np.asarray(Image.open(e.path))
    assert im.shape == (32, 32, 3)
    assert tuple(im[0, 0]) == icons.BACKGROUND and tuple(im[16, 16]) == (0, 0, 200)  # alpha composited, 48 -> 32
    small = np.asarray(Image.open(next(x.path for x in ex if x.concept == "oxygen")))
    assert small.shape == (32, 32, 3) and tuple(small[16, 16]) == (0, 200, 0)  # 16 px drawn at 32
    again = icons.build_icon_set(["Tango", "oxygen"], out, icons_per_theme=3, icons_dir=themes)
    assert [(x.id, x.caption) for x in again] == [(x.id, x.caption) for x in ex]  # rebuilt the same for a seed


def test_bad_themes_get_clear_errors(themes, tmp_path, monkeypatch):
    with pytest.raises(DataError, match=r"'Moka' is not installed.*Papirus, Tango, breeze, oxygen"):
        icons.build_icon_set(["Tango", "Moka"], str(tmp_path / "a"), icons_dir=themes)
    with pytest.raises(DataError, match=r"'breeze'.*1 usable icons.*at least two"):
        icons.build_icon_set(["Tango", "breeze"], str(tmp_path / "b"), icons_dir=themes)
    with pytest.raises(DataError, match="does not exist"):
        icons.installed_themes(str(tmp_path / "nowhere"))
    write_theme(
        themes, "Numix", {"scalable/apps": [("folder", "svg"), ("printer", "svg")]}, {"scalable/apps": ("Scalable", 16)}
    )
    monkeypatch.setattr(icons, "rasterizer", lambda: None)
    with pytest.raises(DataError, match="SVG icon and no SVG rasterizer.*apt-get install librsvg2-bin.*cairosvg"):
        icons.build_icon_set(["Numix", "Tango"], str(tmp_path / "c"), icons_dir=themes)


def test_svg_icons_go_through_rsvg_convert(themes, tmp_path, monkeypatch):
    """The rsvg-convert call (size flags, PNG on stdout), with a stand-in on PATH that paints the requested size."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    tool = bin_dir / "rsvg-convert"
    tool.write_text(
        "#!" + __import__("sys").executable + "\n"
        "import sys, io\nfrom PIL import Image\na = sys.argv\nw = int(a[a.index('-w') + 1])\n"
        "buf = io.BytesIO(); Image.new('RGBA', (w, int(a[a.index('-h') + 1])), (255, 0, 0, 255)).save(buf, 'PNG')\n"
        "sys.stdout.buffer.write(buf.getvalue())\n"
    )
    tool.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setitem(__import__("sys").modules, "cairosvg", None)  # import fails: the command-line tool is used
    assert icons.rasterizer() == "rsvg-convert"
    write_theme(
        themes, "Numix", {"scalable/apps": [("folder", "svg"), ("printer", "svg")]}, {"scalable/apps": ("Scalable", 16)}
    )
    ex = icons.build_icon_set(["Numix", "Tango"], str(tmp_path / "s"), icons_dir=themes)
    im = np.asarray(Image.open(next(e.path for e in ex if e.concept == "Numix")))
    assert im.shape == (32, 32, 3) and tuple(im[0, 0]) == (255, 0, 0)


def test_art_base_pool_leaves_out_the_customized_families(themes, monkeypatch):
    monkeypatch.setattr("montrage.recipes.art_base.MIN_POOL_ICONS", 3)
    assert family("gnome") == family("Tango") and family("Obsidian-Red") == family("Faenza")
    assert default_pool(["breeze"], themes) == ["Papirus", "Tango", "oxygen"]
    with pytest.raises(DataError, match="at least two icon themes"):
        default_pool(["Tango", "oxygen"], themes)
    words = vocabulary()
    assert {"icon", "printer", "trash", "tango", "papirus"} <= set(words) and len(words) == len(set(words))


def test_art_tokenizer_keeps_every_word_whole_and_the_digits_vocabulary():
    from montrage.recipes.tiny_base import WORDS, build_tokenizer

    digits, art = build_tokenizer(16), build_tokenizer(24, WORDS, vocabulary())
    assert all(digits.get_vocab()[k] == v for k, v in art.get_vocab().items() if k in digits.get_vocab())
    assert len(art) > len(digits)
    ids = art("an icon of a user trash in the style of papirus").input_ids
    assert len(ids) == 11 + 2  # one token per word, plus start and end
    assert all(len(art(w).input_ids) == 3 for w in vocabulary() + WORDS if w.isalpha())


def test_style_response_tells_alike_prompts_from_distinct_ones(tiny_model_dir):
    same = style_response(tiny_model_dir, ["a photo of seven"] * 4)
    distinct = style_response(tiny_model_dir, [f"a photo of {w}" for w in ("one", "four", "seven", "nine")])
    assert same < 1e-6 < distinct


@pytest.mark.parametrize("train_text_encoder", [False, True])
def test_pretraining_can_leave_the_text_encoder_as_built(train_text_encoder):
    import dataclasses

    import torch

    from montrage.recipes.tiny_base import TinyBaseConfig, build_components, pretrain_on

    @dataclasses.dataclass(frozen=True)
    class Cfg(TinyBaseConfig):
        train_text_encoder: bool = True

    cfg = Cfg(vae_steps=1, unet_steps=2, batch_size=4, train_text_encoder=train_text_encoder)
    parts = build_components(cfg)
    before = [p.detach().clone() for p in parts["text_encoder"].parameters()]
    unet_before = [p.detach().clone() for p in parts["unet"].parameters()]
    images = torch.rand(6, 3, 16, 16) * 2 - 1
    pretrain_on(
        parts, images, ["a photo of one", "a photo of two"], np.zeros(6, int), np.ones(6, int), cfg, progress=False
    )
    same = all(torch.equal(a, b) for a, b in zip(before, parts["text_encoder"].parameters()))
    assert same != train_text_encoder
    assert not all(
        torch.equal(a, b) for a, b in zip(unet_before, parts["unet"].parameters())
    )  # the UNet learns either way


def test_origin_icon_split_keeps_members_held_out_and_shifted_apart(themes, tmp_path):
    """The icons LoRA half of the origin benchmark: members and held-out icons of the customized themes never
    overlap, the shifted images come from the other themes only, and every image keeps its own caption."""
    from montrage.bench.origin_icons import icon_split

    members, held, shifted = icon_split(["Tango", "oxygen"], ["Papirus"], 2, 0, str(tmp_path / "data"), themes)
    assert len(members) == 4 and len(held) == 2 and len(shifted) == 2
    assert {e.concept for e in members} == {e.concept for e in held} == {"Tango", "oxygen"}
    assert {e.concept for e in shifted} == {"Papirus"}
    assert not {e.path for e in members} & {e.path for e in held}
    assert all(
        e.caption.startswith("an icon of a ") and icons.theme_token(e.concept) in e.caption
        for e in members + held + shifted
    )
    with pytest.raises(
        MontrageError, match=r"icon theme '(Tango|oxygen)' has \d usable icons; --per-theme must be at most"
    ):
        icon_split(["Tango", "oxygen"], ["Papirus"], 4, 0, str(tmp_path / "data2"), themes)
