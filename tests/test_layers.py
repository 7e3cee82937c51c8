"""The package's layers: every import in src/ldmkit goes down the layer order (or stays within a layer), and
no function imports an ldmkit module, so the import graph is the one the top of each file shows.

The order, lowest first (a module may import its own layer and those below):

1. ``low``: errors, io, configuration, randomness, the registry, hardware (what ``dtype="auto"`` picks), and
   ``loading`` (Hub, weight files,
   bundled names, the diffusers layout on disk, CompVis YAML / checkpoints / key tables read as data);
2. ``networks``: models, schedulers, the tokenizer (they read their own files through ``loading``);
3. ``pipelines``;
4. ``assembly``: pipelines built from files (diffusers layout, CompVis checkpoints); the package's
   ``__init__`` is here too, since it imports the assembly (so that the loaders are registered);
5. ``training`` and the data sets it trains on;
6. ``interface``: the command line (and ``python -m ldmkit``).
"""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parent.parent / "src"

LAYERS = [
    ("low", ["ldmkit.errors", "ldmkit.io", "ldmkit.configuration", "ldmkit.randomness", "ldmkit.registry",
             "ldmkit.outputs", "ldmkit.utils", "ldmkit.loading", "ldmkit.startup", "ldmkit.hardware"]),
    ("networks", ["ldmkit.models", "ldmkit.schedulers", "ldmkit.tokenizer"]),
    ("pipelines", ["ldmkit.pipelines"]),
    ("assembly", ["ldmkit.assembly", "ldmkit"]),
    ("training", ["ldmkit.training", "ldmkit.datasets"]),
    ("interface", ["ldmkit.cli", "ldmkit.serve", "ldmkit.__main__"]),
    ("testing", ["ldmkit.testing"]),  # helpers for tests and benchmarks: nothing in ldmkit imports them
]


def layer_of(module: str) -> int | None:
    """The index in LAYERS of the longest entry that is ``module`` or a package holding it (``ldmkit`` itself
    only stands for the package's ``__init__``)."""
    best, best_len = None, -1
    for index, (_, prefixes) in enumerate(LAYERS):
        for prefix in prefixes:
            holds = module.startswith(prefix + ".") and prefix != "ldmkit"
            if (module == prefix or holds) and len(prefix) > best_len:
                best, best_len = index, len(prefix)
    return best


def module_name(path: Path, src: Path = SRC) -> str:
    parts = list(path.relative_to(src).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _targets(node: ast.Import | ast.ImportFrom, module: str, is_package: bool, modules: set[str]) -> list[str]:
    """The ldmkit modules an import statement loads (``from pkg import name`` loads ``pkg.name`` when that is
    a module, else ``pkg`` itself)."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names if a.name.split(".")[0] == "ldmkit"]
    if node.level:
        package = module.split(".") if is_package else module.split(".")[:-1]
        base = ".".join(package[: len(package) - node.level + 1] + ([node.module] if node.module else []))
    elif (node.module or "").split(".")[0] == "ldmkit":
        base = node.module
    else:
        return []
    return [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]


def _local_imports(tree: ast.AST) -> set[int]:
    """ids of the import statements inside a function body."""
    inside = set()
    for fn in ast.walk(tree):
        if isinstance(fn, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda):
            inside.update(id(n) for n in ast.walk(fn) if isinstance(n, ast.Import | ast.ImportFrom))
    return inside


def violations(source: str, filename: str, module: str, is_package: bool, modules: set[str]) -> list[str]:
    """``file:line: problem`` for each import of ``source`` (module ``module``) that breaks the rules."""
    tree = ast.parse(source, filename)
    own = layer_of(module)
    if own is None:
        return [f"{filename}:1: {module} is in no layer; add it to LAYERS in tests/test_layers.py"]
    local = _local_imports(tree)
    found = []
    imports = sorted((n for n in ast.walk(tree) if isinstance(n, ast.Import | ast.ImportFrom)), key=lambda n: n.lineno)
    for node in imports:
        for target in _targets(node, module, is_package, modules):
            where = f"{filename}:{node.lineno}: {module} ({LAYERS[own][0]})"
            if id(node) in local:
                found.append(f"{where} imports {target} inside a function; import it at the top of the module")
            layer = layer_of(target)
            if layer is not None and layer > own:
                found.append(f"{where} imports {target} ({LAYERS[layer][0]}), a higher layer")
    return found


def test_imports_follow_the_layer_order():
    paths = sorted((SRC / "ldmkit").rglob("*.py"))
    modules = {module_name(p) for p in paths}
    found = []
    for path in paths:
        found += violations(path.read_text(encoding="utf-8"), str(path.relative_to(SRC.parent)),
                            module_name(path), path.name == "__init__.py", modules)
    assert not found, "imports against the layers:\n" + "\n".join(found)


def test_the_check_catches_upward_and_local_imports():
    modules = {"ldmkit", "ldmkit.models", "ldmkit.models.unet", "ldmkit.pipelines", "ldmkit.errors"}
    source = ("from ..errors import LDMKitError\n"
              "from ..pipelines import DiffusionPipeline\n"
              "def f():\n"
              "    from .. import errors\n"
              "    import ldmkit.errors\n"
              "    import json\n")
    found = violations(source, "unet.py", "ldmkit.models.unet", False, modules)
    assert found == [
        "unet.py:2: ldmkit.models.unet (networks) imports ldmkit.pipelines (pipelines), a higher layer",
        "unet.py:4: ldmkit.models.unet (networks) imports ldmkit.errors inside a function; import it at the top "
        "of the module",
        "unet.py:5: ldmkit.models.unet (networks) imports ldmkit.errors inside a function; import it at the top "
        "of the module",
    ]
    # ``from .. import name`` where name is no module loads the package's __init__ (the assembly layer).
    assert violations("from .. import __version__\n", "u.py", "ldmkit.models.unet", False, modules) == [
        "u.py:1: ldmkit.models.unet (networks) imports ldmkit (assembly), a higher layer"]
    assert violations("x = 1\n", "new.py", "ldmkit.newthing", False, modules) == [
        "new.py:1: ldmkit.newthing is in no layer; add it to LAYERS in tests/test_layers.py"]
