"""Shared test set-up: offline hubs, no W&B, one intra-op thread per process, the session's sample data, and the
subprocess runs that test modules start when the session starts."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# one thread per process, here and in the processes the tests start: on a 2-core machine the tests' subprocess
# runs go on beside the in-process tests (`early` below, test_e2e's `cli`), and two single-threaded streams use the
# cores; a team of threads would wait for each other's core
os.environ["OMP_NUM_THREADS"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


# ---------------------------------------------------------------------------------------------- started early
def _tree_state(root):
    return {p.relative_to(root).as_posix(): (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(root.rglob("*"))}


class Early:
    """The session's early runs: subprocesses that test modules start when the session starts, one at a time in
    the order submitted (a :class:`tests.helpers.Background` of one slot), while the tests run: most tests keep
    one core busy, these use the other. A test module with a ``start_early(early, selected)`` function (the names
    of its selected tests) is asked to submit its runs when one of its tests is selected; its tests then wait for
    their own with :meth:`result`. The session's sample data (``data_dir``) is made here too, first."""

    def __init__(self, tmp_path_factory):
        from tests.helpers import Background

        self.tmp_path_factory = tmp_path_factory
        self.background = Background(slots=1)
        self.info: dict = {}  # what a module's runs left for its tests (folders, ...)
        self._data = None
        self.data_state: dict | None = None

    def submit(self, name: str, cmd: list[str], *, timeout: float = 600, **popen_kwargs):
        return self.background.submit(name, cmd, timeout=timeout, **popen_kwargs)

    def result(self, name: str):
        return self.background.result(name)

    def data_dir(self):
        """The sample data folder, its making submitted first if it was not yet (a run submitted after this call
        starts once the data is made: one slot, in order)."""
        import sys

        if self._data is None:
            self._data = self.tmp_path_factory.mktemp("data")
            code = ("import sys\nfrom pathlib import Path\n"
                    "from me5.data.synthetic import generate_sample_data\n"
                    "from me5.models.tokenizer import ensure_sample_tokenizer\n"
                    "root = Path(sys.argv[1]) / 'sample'\n"
                    "generate_sample_data(root, seed=0)\nensure_sample_tokenizer(root)\n")
            made = self.submit("data_dir", [sys.executable, "-c", code, str(self._data)])
            # what the folder holds once made, before any run that reads it starts
            made.add_done_callback(lambda _: setattr(self, "data_state", _tree_state(self._data)))
        return self._data

    def close(self) -> None:
        self.background.close()


@pytest.fixture(scope="session", autouse=True)
def early(request, tmp_path_factory):
    """The session's :class:`Early` runs: the sample data when a selected test uses ``data_dir``, then the runs of
    the test modules (in file order) that declare ``start_early``."""
    bg = Early(tmp_path_factory)
    items = request.session.items
    if any("data_dir" in item.fixturenames for item in items):
        bg.data_dir()
    modules: dict = {}
    for item in items:
        module = getattr(item, "module", None)
        if module is not None and hasattr(module, "start_early"):
            modules.setdefault(module, set()).add(item.originalname)
    for module, selected in modules.items():
        module.start_early(bg, selected)
    yield bg
    bg.close()


@pytest.fixture(scope="session")
def data_dir(early):
    """The sample data and tokenizer (``<data_dir>/sample``), generated once per test session in a subprocess
    started with the session (seeded, so identical everywhere; made before a run starts, so the jobs of a sweep do
    not race to make them). Read-only: a test that would change it copies it first; that nothing in it changed is
    checked when the session ends."""
    root = early.data_dir()
    r = early.result("data_dir")
    assert r.returncode == 0, f"generating the sample data failed:\n{r.stderr[-3000:]}"
    yield root
    assert _tree_state(root) == early.data_state, "a test wrote into the shared data_dir (copy it first)"


# ---------------------------------------------------------------------------------------------- the paper's layout
PAPER_STAGE2 = ("msmarco_passage", "msmarco_document", "nq", "triviaqa", "squad", "nli", "eli5", "nllb", "dureader",
                "fever", "hotpotqa", "quora", "mrtydi", "synthetic_instructions")
MIRACL_LANGS = ("ar", "bn", "en", "es", "fa", "fi", "fr", "hi", "id", "ja", "ko", "ru", "sw", "te", "th", "zh")


@pytest.fixture(scope="session")
def paper_tree(tmp_path_factory):
    """A working folder laid out as the README tells a user to lay out the paper's data, from the test fixtures
    (a few records per source): ``data/raw/stage1/<source>/`` (the raw files as published), ``data/scored/<source>/``
    (stage-2 shards with 7 negatives and teacher scores, as ``me5.mine`` + ``me5.score`` write them),
    ``data/eval/{miracl/<lang>,bucc,tatoeba}``, the stage-1 exports ``runs/{base,large}/export/pretrain`` the
    stage-2 commands start from, and ``my/pairs.jsonl`` / ``my/labelled.parquet`` for ``data=files``. Nothing in
    it is large: the dry run reads only the first records."""
    import json
    from pathlib import Path

    import pyarrow as pa
    import pyarrow.parquet as pq

    from me5.data.shards import PrepareOptions, prepare
    from me5.data.source import Source

    fx = Path(__file__).parent / "fixtures"
    root = tmp_path_factory.mktemp("paper")
    raw1 = root / "data" / "raw" / "stage1"
    raw1.mkdir(parents=True)
    for name in ("mc4", "cc_news", "nllb", "reddit", "s2orc", "stackexchange", "sbert"):
        (raw1 / name).symlink_to(fx / "raw" / "stage1" / name)  # their globs leave the malformed/ folders out
    for name, parts in (("wikipedia", ("20231101.en", "20231101.ja")), ("xp3", ("fr", "hi"))):
        (raw1 / name).mkdir()
        for part in parts:
            (raw1 / name / part).symlink_to(fx / "raw" / "stage1" / name / part)
    rows = [{"query": f"q {i}", "positive": f"p {i}", "negatives": [f"n {i} {k}" for k in range(7)],
             "teacher_scores": [5.0] + [1.0 - 0.1 * k for k in range(7)], "lang": "en"} for i in range(80)]
    (root / "my").mkdir()
    (root / "my" / "pairs.jsonl").write_text("".join(json.dumps({k: r[k] for k in ("query", "positive", "lang")})
                                                     + "\n" for r in rows))
    pq.write_table(pa.Table.from_pylist(rows), root / "my" / "labelled.parquet")
    labelled = root / "labelled.jsonl"
    labelled.write_text("".join(json.dumps(r) + "\n" for r in rows))
    prepare({"scored": Source(str(labelled))}, root / "prepared", PrepareOptions(progress=False))
    scored = root / "data" / "scored"
    (scored / "miracl").mkdir(parents=True)
    for name in PAPER_STAGE2:
        (scored / name).symlink_to(root / "prepared" / "scored")
    for lang in MIRACL_LANGS:
        (scored / "miracl" / lang).symlink_to(root / "prepared" / "scored")
        beir = root / "data" / "eval" / "miracl" / lang
        (beir / "qrels").mkdir(parents=True)
        (beir / "corpus.jsonl").write_text(json.dumps({"_id": "d1", "title": "", "text": "t"}) + "\n")
        (beir / "queries.jsonl").write_text(json.dumps({"_id": "q1", "text": "q"}) + "\n")
        (beir / "qrels" / "dev.tsv").write_text("query-id\tcorpus-id\tscore\nq1\td1\t1\n")
    (root / "data" / "eval" / "bucc").symlink_to(fx / "bitext" / "bucc-bitext-mining")
    (root / "data" / "eval" / "tatoeba").symlink_to(fx / "bitext" / "tatoeba-bitext-mining")
    for size in ("base", "large"):
        (root / "runs" / size / "export" / "pretrain").mkdir(parents=True)
        (root / "runs" / size / "export" / "pretrain" / "config.json").write_text("{}\n")  # checked, never loaded
    return root
