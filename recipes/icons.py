"""Icon-style concept sets from installed freedesktop icon themes: human-made artwork with known authorship.

Each theme is one design team's style (the concept, the "artist"); themes draw the same icon names (folder,
printer, user-trash, ...), so style and content can be told apart. Icons are found through each theme's
`index.theme` (the freedesktop icon-theme layout), rasterized to a fixed size on a fixed background and written as a
concept folder (`<out>/<theme>/<icon>.png` with a caption sidecar `.txt`), which every montrage command reads like a
user's own images. Themes are installed with the system's package manager (docs/results.md, 'Real artwork: icon themes'); nothing is committed.
"""

from __future__ import annotations

import configparser
import os
import re
import shutil
import subprocess

import numpy as np

from montrage.data import DataError, TrainExample, scan_concept_folder

ICONS_DIR = "/usr/share/icons"
TEMPLATE = "an icon of a {content} in the style of {token}"
BACKGROUND = (255, 255, 255)
SIZE = 32
# Icon names drawn by most Debian themes (PNG and SVG), the content side of the benchmark; fixed, so a dataset and
# the art base's vocabulary do not depend on which themes are chosen.
ICON_NAMES = (
    "accessories-calculator",
    "accessories-text-editor",
    "address-book-new",
    "application-exit",
    "applications-games",
    "applications-graphics",
    "applications-internet",
    "applications-multimedia",
    "applications-office",
    "applications-system",
    "audio-card",
    "audio-x-generic",
    "battery",
    "bookmark-new",
    "camera-photo",
    "camera-web",
    "computer",
    "dialog-error",
    "dialog-information",
    "dialog-warning",
    "document-new",
    "document-open",
    "document-print",
    "document-properties",
    "document-save",
    "drive-harddisk",
    "drive-optical",
    "edit-clear",
    "edit-copy",
    "edit-cut",
    "edit-delete",
    "edit-find",
    "edit-paste",
    "edit-redo",
    "edit-undo",
    "folder",
    "folder-documents",
    "folder-download",
    "folder-music",
    "folder-pictures",
    "folder-remote",
    "folder-videos",
    "font-x-generic",
    "go-down",
    "go-home",
    "go-next",
    "go-previous",
    "go-up",
    "help-browser",
    "image-x-generic",
    "input-gaming",
    "input-keyboard",
    "input-mouse",
    "list-add",
    "list-remove",
    "mail-send",
    "media-floppy",
    "media-playback-pause",
    "media-playback-start",
    "media-playback-stop",
    "multimedia-player",
    "network-wired",
    "network-wireless",
    "package-x-generic",
    "preferences-desktop",
    "printer",
    "process-stop",
    "system-search",
    "text-html",
    "text-x-generic",
    "user-desktop",
    "user-home",
    "user-trash",
    "utilities-terminal",
    "video-x-generic",
    "view-refresh",
    "weather-clear",
    "web-browser",
    "x-office-calendar",
    "x-office-document",
    "x-office-spreadsheet",
    "zoom-in",
    "zoom-out",
)


def theme_token(theme: str) -> str:
    """The word a theme's captions use ("elementary-xfce" -> "elementaryxfce")."""
    return re.sub(r"[^a-z0-9]", "", theme.lower()) or "style"


def content_words(icon: str) -> str:
    return icon.replace("-", " ").replace("_", " ")


def installed_themes(icons_dir: str = ICONS_DIR) -> dict[str, str]:
    """Theme name (its folder) -> folder, for every folder with an `index.theme` that lists icon directories."""
    if not os.path.isdir(icons_dir):
        raise DataError(
            f"icon folder {icons_dir!r} does not exist: install icon themes (docs/results.md, 'Real artwork: icon themes') or pass "
            "--icons-dir pointing at a folder of themes."
        )
    out = {}
    for name in sorted(os.listdir(icons_dir)):
        index = os.path.join(icons_dir, name, "index.theme")
        if os.path.isfile(index) and _directories(index):
            out[name] = os.path.join(icons_dir, name)
    return out


def _read_index(path: str) -> configparser.ConfigParser:
    cp = configparser.ConfigParser(strict=False, interpolation=None)
    cp.optionxform = str
    try:
        cp.read(path, encoding="utf-8")
    except (configparser.Error, UnicodeDecodeError):
        pass
    return cp


def _directories(index: str) -> list[tuple[str, str, int, int]]:
    """(directory, type, size, scale) of each icon directory the theme declares."""
    cp = _read_index(index)
    if not cp.has_section("Icon Theme"):
        return []
    names = cp["Icon Theme"].get("Directories", "") + "," + cp["Icon Theme"].get("ScaledDirectories", "")
    out = []
    for d in filter(None, (s.strip() for s in names.split(","))):
        sec = cp[d] if cp.has_section(d) else {}
        try:
            size, scale = int(sec.get("Size", 0)), int(sec.get("Scale", 1))
        except ValueError:
            continue
        out.append((d, sec.get("Type", "Threshold"), size, scale))
    return out


def theme_icons(theme_dir: str, size: int = SIZE, names=ICON_NAMES) -> dict[str, str]:
    """Icon name -> the file that best draws it at `size`: a file of that size, else scalable SVG, else the nearest
    larger bitmap, else the nearest smaller one. Symbolic (monochrome) and high-DPI directories are skipped; a file
    reached under two names (aliases are symlinks) is kept once, under the first name."""
    wanted = set(names)
    ranked: dict[str, tuple] = {}
    for d, kind, dsize, scale in _directories(os.path.join(theme_dir, "index.theme")):
        folder = os.path.join(theme_dir, d)
        if scale != 1 or "symbolic" in d or not os.path.isdir(folder):
            continue
        for f in os.listdir(folder):
            stem, ext = os.path.splitext(f)
            if stem not in wanted or ext.lower() not in (".png", ".svg"):
                continue
            scalable = ext.lower() == ".svg" and kind == "Scalable"
            if dsize == size:
                rank = (0, 0)
            elif scalable:
                rank = (1, 0)
            elif dsize > size:
                rank = (2, dsize - size)
            else:
                rank = (3, size - dsize)
            rank = (*rank, ext.lower() != ".png", d)  # ties: bitmaps, then a stable directory order
            if stem not in ranked or rank < ranked[stem][0]:
                ranked[stem] = (rank, os.path.join(folder, f))
    out, seen = {}, set()
    for name in names:
        if name in ranked:
            real = os.path.realpath(ranked[name][1])
            if real not in seen and os.path.isfile(real):
                seen.add(real)
                out[name] = ranked[name][1]
    return out


def rasterizer() -> str | None:
    """'cairosvg' or 'rsvg-convert' (whichever is installed), else None."""
    try:
        import cairosvg  # noqa: F401

        return "cairosvg"
    except (ImportError, OSError):
        return "rsvg-convert" if shutil.which("rsvg-convert") else None


def render(path: str, size: int = SIZE, background=BACKGROUND):
    """The icon at `path` as a size x size RGB image on `background` (alpha composited)."""
    import io

    from PIL import Image

    if path.lower().endswith(".svg"):
        tool = rasterizer()
        if tool is None:
            raise DataError(
                f"{path!r} is an SVG icon and no SVG rasterizer is installed: `apt-get install "
                "librsvg2-bin` (rsvg-convert) or `pip install cairosvg`."
            )
        if tool == "cairosvg":
            import cairosvg

            data = cairosvg.svg2png(url=path, output_width=size, output_height=size)
        else:
            proc = subprocess.run(
                ["rsvg-convert", "-w", str(size), "-h", str(size), "-f", "png", path], capture_output=True
            )
            if proc.returncode != 0:
                raise OSError(proc.stderr.decode(errors="replace").strip() or f"rsvg-convert failed on {path}")
            data = proc.stdout
        im = Image.open(io.BytesIO(data))
    else:
        im = Image.open(path)
    im = im.convert("RGBA")
    if im.size != (size, size):  # the longer side to `size`, the aspect ratio kept; centred below
        scale = size / max(im.size)
        im = im.resize((max(1, round(im.width * scale)), max(1, round(im.height * scale))), Image.LANCZOS)
    canvas = Image.new("RGBA", (size, size), (*background, 255))
    canvas.alpha_composite(im, ((size - im.width) // 2, (size - im.height) // 2))
    return canvas.convert("RGB")


def resolve_themes(themes: list[str], icons_dir: str = ICONS_DIR) -> dict[str, str]:
    """The named themes' folders (names match case-insensitively); an unknown name lists the installed ones."""
    have = installed_themes(icons_dir)
    lower = {k.lower(): k for k in have}
    out = {}
    for t in themes:
        key = lower.get(t.lower())
        if key is None:
            raise DataError(
                f"icon theme {t!r} is not installed in {icons_dir!r}; installed: {', '.join(have) or 'none'} "
                "(install more with apt-get, see docs/results.md, or pass --icons-dir)."
            )
        out[key] = have[key]
    if len(out) != len(themes):
        raise DataError(f"--themes names a theme twice: {', '.join(themes)}.")
    return out


def build_icon_set(
    themes: list[str],
    out_dir: str,
    icons_per_theme: int = 24,
    size: int = SIZE,
    icons_dir: str = ICONS_DIR,
    seed: int = 0,
    shared: bool = True,
    template: str = TEMPLATE,
    background=BACKGROUND,
) -> list[TrainExample]:
    """Rasterize `icons_per_theme` icons of each theme into the concept folder `out_dir` and return its examples.

    shared=True draws the same icon names in every theme (the names all of them have, a seeded choice), so that a
    style is never told apart by what it draws; shared=False takes each theme's own icons. Captions follow
    `template` with `{content}` (the icon name in words) and `{token}` (`theme_token`).
    """
    folders = resolve_themes(themes, icons_dir)
    found = {t: theme_icons(p, size) for t, p in folders.items()}
    for t, icons in found.items():
        if len(icons) < 2:
            raise DataError(
                f"icon theme {t!r} ({folders[t]}) has {len(icons)} usable icons among montrage's icon "
                f"names at {size} px; a concept needs at least two images: choose another theme."
            )
    rng = np.random.default_rng(seed)
    if shared:
        common = [n for n in ICON_NAMES if all(n in icons for icons in found.values())]
        if len(common) < 2:
            raise DataError(
                f"the themes {', '.join(found)} share {len(common)} icon names; use shared=False or other themes."
            )
        names = sorted(rng.choice(common, min(icons_per_theme, len(common)), replace=False).tolist())
        pick = {t: names for t in found}  # one draw, the same names everywhere
    else:
        pick = {
            t: sorted(rng.choice(sorted(icons), min(icons_per_theme, len(icons)), replace=False).tolist())
            for t, icons in found.items()
        }
    if os.path.isdir(out_dir):
        shutil.rmtree(out_dir)
    for t, names in pick.items():
        folder = os.path.join(out_dir, t)
        os.makedirs(folder)
        for name in names:
            try:
                im = render(found[t][name], size, background)
            except OSError as e:
                raise DataError(f"cannot read icon {found[t][name]!r} of theme {t!r}: {e}") from e
            im.save(os.path.join(folder, f"{name}.png"))
            with open(os.path.join(folder, f"{name}.txt"), "w", encoding="utf-8") as fh:
                fh.write(template.format(content=content_words(name), token=theme_token(t)))
    return scan_concept_folder(out_dir)


def icon_of(example: TrainExample) -> str:
    """The icon name (content) of an example built by `build_icon_set`."""
    return os.path.splitext(os.path.basename(example.id))[0]
