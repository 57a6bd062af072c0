"""The layer order of the package: every import runs downward (or stays in its own folder).

storage -> data, augment -> train -> eval -> fit -> sweep -> cli (jobs/ may import anything), with
``models`` and the config modules at the bottom. Imports inside functions count too: a lazy import
is still a dependency. Test machinery (the moto S3 server) never ships in the package.
"""

from __future__ import annotations

import ast
from pathlib import Path

from conftest import ROOT

PACKAGE = ROOT / "platform" / "tokray"
MODELS = ROOT / "models"

# lowest first; a module may import only from strictly lower ranks, or from its own folder at its rank
RANKS = {
    "models": 0, "tokray": 0, "tokray.config": 0, "tokray.recipes": 0, "tokray.artifacts": 0,
    "tokray.devices": 0, "tokray.assets": 0, "tokray.runtime": 0, "tokray.overrides": 0, "tokray.seeds": 0,
    "tokray.storage": 1,
    "tokray.data": 2, "tokray.augment": 2,
    "tokray.train": 3,
    "tokray.eval": 4,
    "tokray.fit": 5,
    "tokray.sweep": 6, "tokray.predict": 6,
    "tokray.cli": 7,
}


def module_name(path: Path) -> str:
    rel = path.relative_to(ROOT / "platform" if path.is_relative_to(PACKAGE) else ROOT).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def source_files() -> list[Path]:
    return sorted(p for root in (PACKAGE, MODELS) for p in root.rglob("*.py") if "__pycache__" not in p.parts)


KNOWN = {module_name(p) for p in source_files()}


def is_package(name: str) -> bool:
    base = ROOT / "platform" if name.split(".")[0] == "tokray" else ROOT
    return (base.joinpath(*name.split(".")) / "__init__.py").exists()


def imported_modules(path: Path) -> list[tuple[int, str]]:
    """(line, module) of every import of ours in ``path``, at any depth; ``from a import b`` names
    the module ``a.b`` when there is one, else ``a``."""
    me = module_name(path)
    package = me if path.name == "__init__.py" else me.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: resolve against this module's package
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            for a in node.names:
                sub = f"{base}.{a.name}"
                found.append((node.lineno, sub if sub in KNOWN else base))
    return [(line, m) for line, m in found if m.split(".")[0] in ("tokray", "models")]


def layer(module: str) -> tuple[str, int | None]:
    """(the folder or top-level module that owns ``module``, its rank; None when RANKS lacks it)."""
    parts = module.split(".")
    key = "models" if parts[0] == "models" else ".".join(parts[:2])
    return key, RANKS.get(key)


def folder(module: str) -> str:
    """The directory a module lives in (a package's modules share it; top-level modules share tokray/)."""
    return module if is_package(module) else module.rpartition(".")[0]


def arrow_problem(me: str, target: str) -> str | None:
    """Why ``me`` may not import ``target`` (None when it may)."""
    my_layer, my_rank = layer(me)
    their_layer, their_rank = layer(target)
    if their_rank is None:
        return f"{me} imports {target}, which has no rank"
    if target not in KNOWN:
        return f"{me} imports {target}, which does not exist"
    if me.split(".")[0] == "models" and target.split(".")[0] == "tokray":
        return f"{me} imports {target}: models/ builds from arguments and never imports tokray"
    if their_rank > my_rank:
        return f"{me} imports {target} (rank {their_rank} > {my_rank})"
    if their_rank == my_rank and my_layer != their_layer and folder(me) != folder(target):
        return f"{me} imports {target} (the same rank {my_rank}, another folder)"
    return None


def violations() -> list[str]:
    bad = []
    for path in source_files():
        me = module_name(path)
        where = path.relative_to(ROOT)
        if layer(me)[1] is None:
            bad.append(f"{me} ({where}) has no rank: add its folder to RANKS in tests/test_imports.py")
            continue
        for line, target in imported_modules(path):
            problem = arrow_problem(me, target)
            if problem:
                bad.append(f"{problem} at {where}:{line}")
    return bad


def test_imports_only_run_downward():
    bad = violations()
    assert not bad, f"{len(bad)} imports run up or across the layers:\n  " + "\n  ".join(bad)


def test_the_checker_resolves_and_catches():
    assert layer("tokray.data.tokenize") == ("tokray.data", 2) and layer("models.tokenizer") == ("models", 0)
    assert folder("tokray.data.tokenize") == "tokray.data" and folder("tokray.config") == "tokray"
    assert {"tokray", "tokray.data", "tokray.data.splits", "models"} <= KNOWN
    assert arrow_problem("tokray.data.tokenize", "tokray.train.loop") == \
        "tokray.data.tokenize imports tokray.train.loop (rank 3 > 2)"
    assert "same rank" in arrow_problem("tokray.data.tokenize", "tokray.augment.ops")
    assert "never imports tokray" in arrow_problem("models.mtm", "tokray.config")
    assert "no rank" in arrow_problem("tokray.fit.tokenizer", "tokray.nowhere")
    assert "does not exist" in arrow_problem("tokray.fit.tokenizer", "tokray.train.tokenizer")
    for ok in [("tokray.fit.tokenizer", "tokray.train.schedule"), ("tokray.recipes", "tokray.config"),
               ("tokray.storage.dataset", "tokray.storage.formats.tokens"), ("tokray.cli", "tokray.sweep.run"),
               ("tokray.data.tokenize", "models")]:
        assert arrow_problem(*ok) is None, ok
    assert arrow_problem("tokray.config", "tokray.cli")  # top-level modules share a folder, not a rank
    here = imported_modules(PACKAGE / "data" / "tokenize.py")
    assert any(m == "tokray.data.splits" for _, m in here)


def test_test_machinery_stays_out_of_the_package():
    hits = []
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module or ""]
            elif isinstance(node, ast.Constant) and isinstance(node.value, str):
                names = [node.value]  # `python -m moto.server` in a subprocess is an import too
            hits += [f"{path.relative_to(ROOT)}:{node.lineno}: {n}" for n in names
                     if n == "moto" or n.startswith("moto.")]
    assert not hits, f"the package imports moto (a test server: it belongs in tests/): {hits}"
