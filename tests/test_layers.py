"""The data flows one way — run → Monitor → store → attribution / origin → report — and the imports follow it: no
module imports one of a higher layer. Read from the source (every `montrage...` import, top-level or inside a
function), so a lazy import cannot hide an upward dependency."""

import ast
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[1]
# the installed package: montrage/ as montrage, callbacks/ as montrage.callbacks, recipes/ as montrage.recipes
FOLDERS = {"montrage": "montrage", "callbacks": "montrage.callbacks", "recipes": "montrage.recipes"}
LAYERS = [  # lowest first; a module may import its own layer and those below
    {
        "errors",
        "rng",
        "data",
        "probes",
        "projection",
        "similarity",
        "metrics",
        "funcgrad",
        "capture",
        "components",
        "family",
        "encode",
        "generate",
        "distributed",
        "sources",
        "latent_cache",
        "training_order",
    },
    {"store"},
    {"store_model"},
    {"monitor"},
    {"attribution", "baselines", "origin", "memorization"},
    {"deferred", "report", "cli", "callbacks", "recipes", "bench", ""},  # "": the package's own __init__
]


def layer(module: str) -> int:
    part = module.split(".")[1] if "." in module else ""
    for k, names in enumerate(LAYERS):
        if part in names:
            return k
    raise AssertionError(f"{module}: not placed in a layer; add {part!r} to LAYERS in tests/test_layers.py")


def _is_submodule(name: str) -> bool:
    return (ROOT / "montrage" / f"{name}.py").is_file() or (ROOT / "montrage" / name).is_dir()


def imports() -> dict[str, set[str]]:
    out = {}
    for folder, package in FOLDERS.items():
        for path in (ROOT / folder).rglob("*.py"):
            rel = path.relative_to(ROOT / folder).with_suffix("")
            parts = [p for p in rel.parts if p != "__init__"]
            module = ".".join([package, *parts])
            found = set()
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.ImportFrom) and node.module == "montrage":  # a submodule, or the package
                    found |= {f"montrage.{a.name}" if _is_submodule(a.name) else "montrage" for a in node.names}
                elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("montrage"):
                    found.add(node.module)
                elif isinstance(node, ast.Import):
                    found |= {a.name for a in node.names if a.name.startswith("montrage")}
            out[module] = found
    return out


def test_no_module_imports_a_higher_layer():
    graph = imports()
    assert len(graph) > 80 and "montrage.store_model" in graph and "montrage.bench.origin" in graph
    upward = sorted(
        f"{m} (layer {layer(m)}) imports {x} (layer {layer(x)})"
        for m, found in graph.items()
        for x in found
        if x != "montrage" and layer(x) > layer(m)
    )
    assert not upward, "\n".join(upward)


def test_the_check_sees_an_upward_import():
    assert layer("montrage.store") < layer("montrage.monitor") < layer("montrage.origin.features")
    assert layer("montrage.attribution.query") < layer("montrage.report") == layer("montrage.bench.origin")
