"""Every ``python -m me5.*`` (and ``python -m benchmarks.*``) command of ``README.md`` and ``experiments/*.md`` runs,
in the dry run.

The commands are taken as the shell would run them: each fenced ``bash`` block is run by ``bash`` (loops, variables
and line continuations expanded) with ``python`` and ``torchrun`` replaced by functions that record their
arguments; an inline ``python -m me5.X <args>`` of the prose is one command too (an inline name without arguments,
or one abbreviated with ``...``, is a reference, not a command). Placeholders (``/my/pairs.jsonl``, ``<run dir>``,
``<large run>``) are filled with the fixtures of ``paper_tree`` (``tests/conftest.py``), a folder laid out as the
README says, and the commands run from it.

``me5.train`` commands run with ``dry_run=true``: every pre-flight check of the real run, exit status 0 expected.
The other commands have no dry run of their own: their arguments go through the command's own parser (the first
thing each does), which must accept them; ``--help`` must exit 0.
"""

from __future__ import annotations

import argparse
import importlib
import re
import subprocess
from pathlib import Path

import pytest

from tests.helpers import ROOT

DOCS = [ROOT / "README.md", *sorted((ROOT / "experiments").glob("*.md"))]
FENCE = re.compile(r"^```bash\n(.*?)^```", re.S | re.M)
INLINE = re.compile(r"`((?:[A-Z_]+=\S+ )*(?:python|torchrun[^`]*?) -m (?:me5|benchmarks)\.[\w.]+ [^`]+)`")
CAPTURE = r"""
python() { printf '%s\0' "$@" >> "$ME5_DOC_CAPTURE"; printf '\036' >> "$ME5_DOC_CAPTURE"; }
torchrun() { python "$@"; }
make() { :; }
command_not_found_handle() { return 0; }
"""


def placeholders(root: Path) -> dict[str, str]:
    return {"/my/pairs.jsonl": str(root / "my" / "pairs.jsonl"),
            "/my/labelled.parquet": str(root / "my" / "labelled.parquet"),
            "<run dir>": str(root / "runs" / "base"), "<large run>": str(root / "runs" / "large"),
            "<export>": str(root / "runs" / "base" / "export" / "pretrain")}


def documented_commands(root: Path) -> list[tuple[str, list[str]]]:
    """``(where, argv after -m)`` of every documented command, as bash expands it."""
    out = []
    for doc in DOCS:
        text = doc.read_text()
        for key, value in placeholders(root).items():
            text = text.replace(key, value)
        scripts = [(f"{doc.name} block {i}", m.group(1)) for i, m in enumerate(FENCE.finditer(text))]
        prose = FENCE.sub("", text)
        scripts += [(f"{doc.name} inline", m.group(1)) for m in INLINE.finditer(prose) if "..." not in m.group(1)]
        for where, script in scripts:
            if "-m me5." not in script and "-m benchmarks." not in script:
                continue
            capture = root / "capture.bin"
            capture.write_bytes(b"")
            r = subprocess.run(["bash", "-c", CAPTURE + script], cwd=root, capture_output=True, text=True,
                               env={"PATH": "/usr/bin:/bin", "ME5_DOC_CAPTURE": str(capture)}, timeout=30)
            assert r.returncode == 0, (where, r.stderr)
            for record in capture.read_bytes().decode().split("\x1e")[:-1]:
                args = record.split("\0")[:-1]
                assert "-m" in args, (where, args)
                out.append((where, args[args.index("-m") + 1:]))
    return out


class _Parsed(Exception):
    pass


def _parse_only(module: str, args: list[str], monkeypatch) -> int:
    """Run ``module``'s entry point until its argument parser has parsed ``args``; the exit status of the parse."""
    real = argparse.ArgumentParser.parse_known_args

    def parse_then_stop(self, *a, **kw):
        real(self, *a, **kw)
        raise _Parsed

    target = module if module.startswith(("me5.app.", "benchmarks.")) else "me5.app." + module.split(".", 1)[1]
    main = importlib.import_module(target).main
    with monkeypatch.context() as m:
        m.setattr(argparse.ArgumentParser, "parse_known_args", parse_then_stop)
        try:
            main(args)
        except _Parsed:
            return 0
        except SystemExit as exit_:  # --help, or a rejected argument
            return int(exit_.code or 0)
    raise AssertionError(f"{module} ran past its argument parser")


def fake_mteb_cache(folder: Path) -> Path:
    """A datasets cache holding (as empty build folders) every dataset of the paper's 56 MTEB tasks: what the
    pre-flight check looks for (``me5.eval.mteb.missing_data``), without the gigabytes."""
    from mteb.abstasks.aggregated_task import AbsTaskAggregate

    from me5.eval.mteb import resolve_tasks
    from me5.eval.paper import PAPER_MTEB_EN

    for task in resolve_tasks(list(PAPER_MTEB_EN)):
        for leaf in list(task.metadata.tasks) if isinstance(task, AbsTaskAggregate) else [task]:
            path = str((leaf.metadata.dataset or {}).get("path") or "")
            (folder / path.replace("/", "___").lower()).mkdir(parents=True, exist_ok=True)
    return folder


@pytest.fixture
def in_paper_tree(paper_tree, monkeypatch):
    monkeypatch.chdir(paper_tree)
    monkeypatch.delenv("ME5_DATA_DIR", raising=False)
    monkeypatch.setenv("ME5_LOG_DIR", str(paper_tree / "outputs"))
    cache = fake_mteb_cache(paper_tree / "hf-datasets-cache")
    monkeypatch.setattr("me5.eval.mteb._datasets_cache", lambda: str(cache))
    return paper_tree


def test_every_documented_command_runs_in_the_dry_run(in_paper_tree, capsys, monkeypatch):
    from me5.app import dry_run

    commands = documented_commands(in_paper_tree)
    modules = {args[0] for _, args in commands}
    # the extraction finds what the docs hold: the README's training, data, sweep and evaluation commands, the
    # experiments' pipeline (mine and score loops expanded per source), and the benchmarks
    assert {"me5.train", "me5.evaluate", "me5.mine", "me5.score", "me5.prepare", "me5.app.convert_miracl",
            "benchmarks.train_step", "benchmarks.data_loader"} <= modules
    trains = [(w, a[1:]) for w, a in commands if a[0] == "me5.train"]
    assert len(trains) >= 14 and sum(a[0] == "me5.mine" for _, a in commands) >= 4
    failures, seen = [], set()
    for where, args in commands:
        if tuple(args) in seen:  # the same command in two places is one command
            continue
        seen.add(tuple(args))
        capsys.readouterr()
        if args[0] == "me5.train":
            status = dry_run.main([*args[1:], "dry_run=true"])
            out, err = capsys.readouterr()
            ok = status == 0 and "every check passed" in out
        else:
            status = _parse_only(args[0], args[1:], monkeypatch)
            out, err = capsys.readouterr()
            ok = status == 0
        if not ok:
            failures.append(f"{where}: python -m {' '.join(args)} -> {status}\n{err[-800:]}")
    assert not failures, "\n\n".join(failures)
    assert not (in_paper_tree / "outputs").exists() and not (in_paper_tree / "data" / "sample").exists()


def test_the_docs_name_the_configs_paths_and_fields(paper_tree):
    """The drift the dry run caught once: the README's data paths are the configs', the instruct run is started
    with ``start_from=``, and every command a doc gives for the instruct experiment sets it."""
    readme = (ROOT / "README.md").read_text()
    plan = (ROOT / "experiments" / "README.md").read_text()
    assert "data/raw/stage1/" in readme and "data/stage1/" not in readme.replace("data/raw/stage1/", "")
    assert "stages.finetune.init_from=..." not in plan and "start_from=" in plan
    instruct = [a for w, a in documented_commands(paper_tree) if "experiment=me5_large_instruct" in a]
    assert instruct and all(any(x.startswith("start_from=") for x in a) for a in instruct)


def test_a_missing_mteb_dataset_fails_the_dry_run_naming_it_and_the_fetch(in_paper_tree, capsys, monkeypatch):
    """The experiments evaluate MTEB after the last stage: a dataset missing from the local cache is found by the
    pre-flight check in milliseconds, before anything starts, not hours later."""
    from me5.app import dry_run

    cache = in_paper_tree / "hf-datasets-cache"
    gone = sorted(p for p in cache.iterdir() if "sprint" in p.name)
    assert gone, sorted(p.name for p in cache.iterdir())[:5]
    for p in gone:
        p.rmdir()
    commands = [a for _, a in documented_commands(in_paper_tree) if a[0] == "me5.train" and "experiment=me5_base" in a]
    assert commands
    status = dry_run.main([*commands[0][1:], "dry_run=true"])
    err = capsys.readouterr().err
    assert status == 2
    assert "SprintDuplicateQuestions" in err and "download(" in err and "not in the local cache" in err
