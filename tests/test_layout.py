"""The library apart from the app: ``src/me5`` outside ``me5.app`` imports no Hydra, W&B, OmegaConf or argparse,
and a non-editable install (configs inside the package) runs ``python -m me5.train`` from any folder."""

from __future__ import annotations

import ast
import os
import re
import shutil
import subprocess
import sys

import pytest

from tests.helpers import ROOT

SRC = ROOT / "src" / "me5"
APP_ONLY = ("hydra", "wandb", "omegaconf", "argparse", "me5.app")
# the stable command names: three-line shims that start the app
SHIMS = {"train.py", "evaluate.py", "prepare.py", "mine.py", "score.py"}


def library_files():
    for f in sorted(SRC.rglob("*.py")):
        rel = f.relative_to(SRC)
        if rel.parts[0] in ("app", "conf") or (len(rel.parts) == 1 and rel.name in SHIMS):
            continue
        yield f


IMPORT_CHECK = "test_library_imports_without_hydra_or_wandb"
INSTALL = "test_non_editable_install_runs_the_app_from_any_folder"


def _library_modules() -> list[str]:
    return [".".join(f.relative_to(SRC.parent).with_suffix("").parts).removesuffix(".__init__") for f in library_files()]


def _install(tmp_path) -> tuple[subprocess.CompletedProcess, dict]:
    """``pip install .`` of a copy of the checkout into ``tmp_path/site`` (so the build leaves nothing in the
    checkout), with ``benchmarks/`` beside ``src/`` as in the checkout (the install must skip it); returns pip's
    result and the environment that imports the installed copy."""
    tree = tmp_path / "tree"
    for folder in ("src", "benchmarks"):
        shutil.copytree(ROOT / folder, tree / folder, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, tree / name)
    r = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                        "--target", str(tmp_path / "site"), str(tree)], capture_output=True, text=True)
    env = {**os.environ, "PYTHONPATH": str(tmp_path / "site"), "WANDB_MODE": "disabled", "HF_HUB_OFFLINE": "1"}
    return r, env


def start_early(early, selected) -> None:
    """The subprocesses of the two slow tests below (an interpreter importing the whole library; the app from a
    non-editable install, run on an empty data folder), started with the session (tests/conftest.py's ``early``);
    the tests wait for them. ``early.info["layout/install"]``: the install's folder and pip's result."""
    if IMPORT_CHECK in selected:
        code = ("import importlib, sys\n"
                f"for m in {_library_modules()!r}: importlib.import_module(m)\n"
                "print(sorted(k for k in ('hydra', 'wandb', 'omegaconf') if k in sys.modules))")
        early.submit("layout/imports", [sys.executable, "-c", code])
    if INSTALL in selected:
        tmp_path = early.tmp_path_factory.mktemp("install")
        pip, env = _install(tmp_path)
        early.info["layout/install"] = (tmp_path, pip)
        if pip.returncode == 0:
            elsewhere = tmp_path / "elsewhere"
            elsewhere.mkdir()
            early.submit("layout/where", [sys.executable, "-c", "import me5, me5.app.train as t; "
                                          "print(me5.__file__, t.CONF_DIR)"], cwd=elsewhere, env=env)
            early.submit("layout/run", [sys.executable, "-m", "me5.train", "stage=[pretrain]", "eval=none",
                                        "eval_baseline=false", "logger=none", "stages.pretrain.max_steps=2",
                                        "stages.pretrain.warmup_steps=1", "stages.pretrain.global_batch_size=8",
                                        "checkpoint_every=2", "trainer.enable_progress_bar=false",
                                        f"paths.data_dir={tmp_path / 'data'}", f"hydra.run.dir={tmp_path / 'run'}"],
                         cwd=elsewhere, env=env)


def test_library_modules_import_nothing_of_the_app():
    bad = []
    for f in library_files():
        for node in ast.walk(ast.parse(f.read_text(encoding="utf-8"))):  # lazy imports inside functions too
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            bad += [f"{f.relative_to(SRC)}:{node.lineno}: {n}" for n in names
                    if any(n == m or n.startswith(m + ".") for m in APP_ONLY)]
    assert not bad, bad


def test_nothing_in_the_package_imports_the_benchmarks():
    """``benchmarks/`` (top level, not installed) may import ``me5`` and ``me5.app``; nothing under ``src/`` imports
    it, app included, and no benchmark module is left in the package."""
    bad = []
    for f in sorted(SRC.rglob("*.py")):
        for node in ast.walk(ast.parse(f.read_text(encoding="utf-8"))):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) and node.level == 0 else []
            bad += [f"{f.relative_to(SRC)}:{node.lineno}: {n}" for n in names
                    if n == "benchmarks" or n.startswith("benchmarks.")]
    assert not bad, bad
    assert not sorted(SRC.rglob("bench*.py")), sorted(SRC.rglob("bench*.py"))


def _me5_imports(f, *, top_level_only: bool) -> list[str]:
    tree = ast.parse(f.read_text(encoding="utf-8"))
    nodes = tree.body if top_level_only else ast.walk(tree)
    out = []
    for node in nodes:
        if isinstance(node, ast.Import):
            out += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out += [node.module] + [f"{node.module}.{a.name}" for a in node.names]
    return [m for m in out if m == "me5" or m.startswith("me5.")]


def _module(f) -> str:
    return ".".join(f.relative_to(SRC.parent).with_suffix("").parts).removesuffix(".__init__")


ARCHITECTURE = ROOT / "docs" / "ARCHITECTURE.md"
EVERY = "every room"


def import_table() -> dict[str, tuple[str, ...] | None]:
    """docs/ARCHITECTURE.md's import table: ``{room: the me5 rooms (or room.module) it may import}``; ``None``: every
    room. The table starts at the row ``| room | may import (me5) | ...`` and ends at the first line that is not a
    row; the second column is backticked names, ``—`` for none, or ``every room``."""
    lines = ARCHITECTURE.read_text(encoding="utf-8").splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("| room | may import (me5)"))
    table: dict[str, tuple[str, ...] | None] = {}
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        rooms_cell, allowed_cell = (c.strip() for c in line.strip("|").split("|")[:2])
        allowed = None if allowed_cell.startswith(EVERY) else tuple(re.findall(r"`([\w.]+)`", allowed_cell))
        assert allowed is None or allowed or allowed_cell == "—", f"unreadable row: {line}"
        for room in re.findall(r"`([\w.]+/?)`", rooms_cell):
            table[room] = allowed
    return table


def room_of(module: str) -> str:
    """``me5.data.shards`` -> ``data``; ``me5.train`` -> ``train``."""
    return module.split(".")[1]


def room_imports() -> dict[str, list[tuple[str, str]]]:
    """``{room: [(importing module, imported me5 module), ...]}`` over every module of ``src/me5`` (configs aside),
    lazy imports included; imports inside a room are left out."""
    out: dict[str, list[tuple[str, str]]] = {}
    for f in sorted(SRC.rglob("*.py")):
        mod = _module(f)
        if mod == "me5":
            continue
        room = room_of(mod)
        out.setdefault(room, [])
        out[room] += [(mod, m) for m in _me5_imports(f, top_level_only=False) if m != "me5" and room_of(m) != room]
    return out


def test_every_room_imports_only_what_the_architecture_table_allows():
    table = import_table()
    imports = room_imports()
    assert set(imports) <= set(table), f"rooms without a row in {ARCHITECTURE.name}: {sorted(set(imports) - set(table))}"
    bad = []
    for room, pairs in imports.items():
        allowed = table[room]
        if allowed is None:
            continue
        bad += [f"{mod} imports {m} ({room} may import {', '.join(allowed) or 'nothing'})" for mod, m in pairs
                if not any(m == f"me5.{a}" or m.startswith(f"me5.{a}.") for a in allowed)]
    assert not bad, bad


def test_the_table_check_catches_a_forbidden_import(monkeypatch):
    """The check is live: an import the table does not allow (models reaching up to embed) is reported."""
    real = room_imports()
    monkeypatch.setitem(globals(), "room_imports",
                        lambda: {**real, "models": real["models"] + [("me5.models.encoder", "me5.embed.encode")]})
    with pytest.raises(AssertionError, match="me5.models.encoder imports me5.embed.encode"):
        test_every_room_imports_only_what_the_architecture_table_allows()


def test_no_cycle_between_rooms_lazy_imports_included():
    graph = {room: {room_of(m) for _, m in pairs} for room, pairs in room_imports().items()}
    cycle: list[str] = []
    state: dict[str, int] = {}

    def visit(room, path):
        state[room] = 1
        for nxt in sorted(graph.get(room, ())):
            if state.get(nxt) == 1 and not cycle:
                cycle.extend(path[path.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt, path + [nxt])
        state[room] = 2

    for room in sorted(graph):
        if room not in state:
            visit(room, [room])
    assert not cycle, " -> ".join(cycle)


def test_no_import_circles():
    """The module-level import graph of the library has no cycle (lazy imports inside functions aside)."""
    files = {_module(f): f for f in library_files()}
    graph = {m: {i for i in _me5_imports(f, top_level_only=True) if i in files and i != m} for m, f in files.items()}
    state: dict[str, int] = {}
    cycle: list[str] = []

    def visit(m, path):
        state[m] = 1
        for n in sorted(graph[m]):
            if state.get(n) == 1 and not cycle:
                cycle.extend(path[path.index(n):] + [n] if n in path else [m, n])
            elif n not in state:
                visit(n, path + [n])
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])
    assert not cycle, " -> ".join(cycle)


TESTS = ROOT / "tests"


def imported_test_modules(f) -> list[str]:
    """``file:line: module`` for each test module (``tests.test_*``, or tests/conftest.py) that ``f`` imports, other
    than itself: import statements (lazy ones too) and code in strings run by a subprocess
    (``from tests.test_x import ...``)."""
    text = f.read_text(encoding="utf-8")
    found = set()
    for node in ast.walk(ast.parse(text)):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            mod = node.module or ""
            if node.level:  # from . import test_x / from .test_x import y
                mod = f"tests.{mod}" if mod else "tests"
            names = [mod] + ([f"tests.{a.name}" for a in node.names] if mod == "tests" else [])
        else:
            continue
        found |= {(node.lineno, n) for n in names}
    for m in re.finditer(r"^\s*(?:from|import)\s+(tests\.test_\w+)", text, flags=re.M):
        found.add((text.count("\n", 0, m.start()) + 1, m.group(1)))
    own = f"tests.{f.stem}"
    return sorted(f"{f.name}:{line}: {n}" for line, n in found
                  if (n.startswith("tests.test_") or n == "tests.conftest") and n.split(".")[1] != own.split(".")[1])


def test_no_test_module_imports_another():
    """Shared test code lives in tests/helpers.py and tests/tiny.py (fixtures in tests/conftest.py): no test module
    imports another, lazily or in a subprocess's code."""
    bad = [hit for f in sorted(TESTS.glob("*.py")) for hit in imported_test_modules(f)]
    assert not bad, bad


def test_the_test_module_check_catches_an_import(tmp_path):
    f = tmp_path / "test_x.py"
    f.write_text("from tests import tiny\n\ndef test():\n    from tests.test_data import pairs\n\n"
                 "CHILD = \"\"\"\nfrom tests.test_embed import KILL_KW\n\"\"\"\nfrom tests import test_score\n")
    assert imported_test_modules(f) == ["test_x.py:4: tests.test_data", "test_x.py:7: tests.test_embed",
                                        "test_x.py:9: tests.test_score"]


def test_library_imports_without_hydra_or_wandb(early):
    r = early.result("layout/imports")  # a fresh interpreter imports every library module, then lists these
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.strip() == "[]"


def test_shims_only_start_the_app():
    for name in SHIMS:
        body = (SRC / name).read_text(encoding="utf-8")
        assert "from me5.app." in body and len(body.splitlines()) <= 10, name


def test_non_editable_install_runs_the_app_from_any_folder(early):
    """``pip install .`` (a wheel, not the source tree) carries the configs, not the benchmarks: the app composes
    and runs, from another folder, on an empty data folder (its first run makes the sample data and tokenizer)."""
    tmp_path, pip = early.info["layout/install"]
    assert pip.returncode == 0, pip.stderr[-3000:]
    target = tmp_path / "site"
    assert (target / "me5" / "conf" / "config.yaml").is_file() and (target / "me5" / "conf" / "stage").is_dir()
    assert not (target / "benchmarks").exists() and not list(target.rglob("bench*.py"))
    where = early.result("layout/where")
    assert where.returncode == 0, where.stderr[-3000:]
    assert where.stdout.startswith(str(target)) and str(ROOT) not in where.stdout
    r = early.result("layout/run")
    assert r.returncode == 0, r.stderr[-3000:]
    assert (tmp_path / "run" / "export" / "pretrain" / "me5.json").is_file()
