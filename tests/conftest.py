"""Shared test set-up: offline hubs, no W&B, deterministic small threads."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(min(2, os.cpu_count() or 1))


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """The sample data and tokenizer, generated once per test module (seeded, so identical everywhere; made before
    a run starts, so the jobs of a sweep do not race to make them)."""
    from me5.data.synthetic import generate_sample_data
    from me5.models.tokenizer import ensure_sample_tokenizer

    root = tmp_path_factory.mktemp("data")
    generate_sample_data(root / "sample", seed=0)
    ensure_sample_tokenizer(root / "sample")
    return root


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
