"""The library apart from the app: ``src/me5`` outside ``me5.app`` imports no Hydra, W&B, OmegaConf or argparse,
and a non-editable install (configs inside the package) runs ``python -m me5.train`` from any folder."""

from __future__ import annotations

import ast
import os
import shutil
import subprocess
import sys

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


def test_library_modules_import_nothing_of_the_app():
    bad = []
    for f in library_files():
        for node in ast.walk(ast.parse(f.read_text(encoding="utf-8"))):  # lazy imports inside functions too
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            bad += [f"{f.relative_to(SRC)}:{node.lineno}: {n}" for n in names
                    if any(n == m or n.startswith(m + ".") for m in APP_ONLY)]
    assert not bad, bad


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


# room -> me5 rooms it must not import (lazily or not); see docs/ARCHITECTURE.md
FORBIDDEN = {
    "me5.errors": ("me5.",), "me5.prompts": ("me5.",), "me5.batching": ("me5.",),
    "me5.data": ("me5.models", "me5.training", "me5.eval", "me5.losses", "me5.export"),
    "me5.losses": ("me5.data", "me5.training", "me5.eval", "me5.embed"),
    "me5.eval": ("me5.training", "me5.data.datamodule"),
    "me5.embed": ("me5.training", "me5.data.datamodule"),
}
ALLOWED = {"me5.errors", "me5.embed.consistency"}  # the errors every room raises; shards' lazy consistency filter


def test_rooms_import_only_what_they_may():
    bad = []
    for f in library_files():
        mod = _module(f)
        for room, forbidden in FORBIDDEN.items():
            if mod == room or mod.startswith(room + "."):
                bad += [f"{mod} imports {m}" for m in _me5_imports(f, top_level_only=False)
                        if not any(m == a or m.startswith(a + ".") for a in ALLOWED)
                        and not m.startswith(room) and any(m.startswith(x) for x in forbidden)]
    assert not bad, bad


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


def test_library_imports_without_hydra_or_wandb():
    mods = [".".join(f.relative_to(SRC.parent).with_suffix("").parts).removesuffix(".__init__") for f in library_files()]
    code = ("import importlib, sys\n"
            f"for m in {mods!r}: importlib.import_module(m)\n"
            "print(sorted(k for k in ('hydra', 'wandb', 'omegaconf') if k in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_shims_only_start_the_app():
    for name in SHIMS:
        body = (SRC / name).read_text(encoding="utf-8")
        assert "from me5.app." in body and len(body.splitlines()) <= 10, name


def test_non_editable_install_runs_the_app_from_any_folder(tmp_path):
    """``pip install .`` (a wheel, not the source tree) carries the configs: the app composes and runs."""
    tree = tmp_path / "tree"  # a copy, so the build leaves nothing in the checkout
    shutil.copytree(ROOT / "src", tree / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, tree / name)
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                    "--target", str(target), str(tree)], check=True, capture_output=True, text=True)
    assert (target / "me5" / "conf" / "config.yaml").is_file() and (target / "me5" / "conf" / "stage").is_dir()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {**os.environ, "PYTHONPATH": str(target), "WANDB_MODE": "disabled", "HF_HUB_OFFLINE": "1"}
    where = subprocess.run([sys.executable, "-c", "import me5, me5.app.train as t; print(me5.__file__, t.CONF_DIR)"],
                           cwd=elsewhere, env=env, capture_output=True, text=True, check=True).stdout
    assert where.startswith(str(target)) and str(ROOT) not in where
    r = subprocess.run([sys.executable, "-m", "me5.train", "stage=[pretrain]", "eval=none", "eval_baseline=false",
                        "logger=none", "model.pretrain.max_steps=2", "model.pretrain.warmup_steps=1",
                        "model.pretrain.global_batch_size=8", "checkpoint_every=2", "trainer.enable_progress_bar=false",
                        f"paths.data_dir={tmp_path / 'data'}", f"hydra.run.dir={tmp_path / 'run'}"],
                       cwd=elsewhere, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert (tmp_path / "run" / "export" / "pretrain" / "me5.json").is_file()
