"""The ``prepare`` pipeline on datatrove (``me5.prep``): the same rows and counts as the one-process ``prepare`` on
the raw fixtures; exact duplicates removed across the corpus; 1 worker == 2 workers == a killed-and-resumed run;
eval sets in their published layouts; the consistency filter at scale equals a brute-force NumPy reference; the
SLURM executor is configured (its launch script checked, nothing submitted)."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import me5.prep.stages as stages
from me5.data.decontaminate import EvalOverlap, eval_files, load_eval_digests, load_eval_texts
from me5.data.shards import PrepareOptions, prepare
from me5.data.source import Source
from me5.errors import DataError
from me5.mining.consistency import pool_ranks
from me5.prep import ConsistencyOptions, PrepOptions, run_prep
from me5.prep.pipeline import build_executors, make_plan
from tests.helpers import (
    RAW_STAGE2,
    bad_records_file,
    make_source,
    pairs,
    stage1_cases,
    stage2_cases,
    write_jsonl,
)

FIELDS = ("query", "positive", "negatives", "teacher_scores", "lang", "source", "instruction", "symmetric")


def rows_of(folder: Path) -> list[tuple]:
    out = []
    for f in sorted(folder.glob("part-*.parquet")):
        for r in pq.read_table(f).to_pylist():
            out.append(tuple(tuple(v) if isinstance(v, list) else v for v in (r[k] for k in FIELDS)))
    return out


def fixture_sources() -> dict[str, Source]:
    """Every stage-1 and stage-2 source on its raw fixture (the cases of the source tests)."""
    out = {}
    for i, (_, cls, kwargs, _, _) in enumerate(stage1_cases()):
        out[f"s1-{i:02d}"] = make_source(cls, kwargs)
    for i, case in enumerate(stage2_cases()):
        cls, rel, kwargs, _, _ = case.values
        out[f"s2-{i:02d}"] = cls(str(RAW_STAGE2 / rel), **kwargs)
    return out


def test_pipeline_equals_the_inline_prepare_on_the_raw_fixtures(tmp_path):
    """Same kept rows (order-independent) and the same counts by reason, per source and language; with dedup, the
    later copies of a (query, positive) anywhere in the corpus go, counted ``skipped/duplicate``."""
    sources = fixture_sources()
    assert len(sources) >= 30
    inline = prepare(sources, tmp_path / "inline", PrepareOptions(progress=False, shard_rows=7, row_group_rows=3))
    piped = run_prep(sources, tmp_path / "pipe", PrepOptions(dedup=False, shard_rows=7, row_group_rows=3, buckets=3,
                                                              read_tasks=4))
    assert set(piped) == set(inline) == set(sources)
    for name in sources:
        assert piped[name]["counts"] == inline[name]["counts"], name
        assert piped[name]["langs"] == inline[name]["langs"], name
        assert sorted(rows_of(tmp_path / "pipe" / name), key=repr) == sorted(rows_of(tmp_path / "inline" / name),
                                                                            key=repr), name
    assert sum(s["counts"].get("kept", 0) for s in piped.values()) > 50
    assert any(k.startswith("skipped/") for s in piped.values() for k in s["counts"])  # the fixtures' filtered rows
    # the shard manifest the streaming readers plan from matches the files
    manifest = json.loads((tmp_path / "pipe" / "s1-00" / "shards.json").read_text())
    for sh in manifest["shards"]:
        meta = pq.ParquetFile(tmp_path / "pipe" / "s1-00" / sh["file"]).metadata
        assert [g["rows"] for g in sh["row_groups"]] == [meta.row_group(i).num_rows for i in range(meta.num_row_groups)]

    dedup = run_prep(sources, tmp_path / "dedup", PrepOptions(shard_rows=7, row_group_rows=3, buckets=3))
    seen: set = set()
    for name in sources:  # the first copy in (source, file, line) order is kept
        want = []
        for q, p in sorted({r[:2] for r in rows_of(tmp_path / "inline" / name)}):
            if (q, p) not in seen:
                want.append((q, p))
                seen.add((q, p))
        got = sorted(r[:2] for r in rows_of(tmp_path / "dedup" / name))
        assert got == sorted(want), name
        c, old = dedup[name]["counts"], inline[name]["counts"]
        assert c.get("kept", 0) + c.get("skipped/duplicate", 0) == old.get("kept", 0), name
        assert {k: v for k, v in c.items() if k not in ("kept", "skipped/duplicate")} == \
            {k: v for k, v in old.items() if k != "kept"}, name


def test_bad_records_checks_and_decontamination_match_the_inline_prepare(tmp_path):
    """Malformed records, length, language and eval-overlap skips: the same reasons and counts."""
    bad = bad_records_file(tmp_path)
    beir = tmp_path / "beir"
    write_jsonl(beir / "queries.jsonl", [{"_id": "q", "text": "w1"}])  # w1 is the query of a kept pair
    write_jsonl(beir / "corpus.jsonl", [{"_id": "d", "title": "", "text": "w3 w4"}])  # a kept pair's positive
    kw = dict(max_chars=60, langs=["en", "de"], eval_sets=[str(beir)], shard_rows=3, row_group_rows=2)
    make = lambda: {"s": Source(str(bad), long_texts="drop")}  # noqa: E731
    inline = prepare(make(), tmp_path / "inline", PrepareOptions(progress=False, **kw))
    piped = run_prep(make(), tmp_path / "pipe", PrepOptions(dedup=False, buckets=2, **kw))
    assert piped["s"]["counts"] == inline["s"]["counts"]
    assert piped["s"]["counts"]["skipped/eval_overlap"] == 2 and piped["s"]["counts"]["skipped/wrong_language"] == 2
    assert sorted(rows_of(tmp_path / "pipe" / "s")) == sorted(rows_of(tmp_path / "inline" / "s"))


def _generated(tmp_path: Path) -> dict[str, Source]:
    raw = tmp_path / "raw"
    write_jsonl(raw / "a" / "1.jsonl", pairs(150, lang="en") + pairs(40, prefix="x", lang="de"))
    write_jsonl(raw / "a" / "2.jsonl", pairs(60, prefix="y", lang="fr") + pairs(30, lang="en"))  # 30 duplicates
    write_jsonl(raw / "a" / "3.jsonl", pairs(80, prefix="z", negs=2, lang="de"))
    write_jsonl(raw / "b" / "1.jsonl", pairs(50, prefix="x", lang="de") + pairs(20, prefix="v", lang="sw"))
    return {"a": Source(str(raw / "a")), "b": Source(str(raw / "b"))}


def _snapshot(out: Path) -> dict:
    return {"stats": json.loads((out / "stats.json").read_text()),
            "files": {str(f.relative_to(out)): pq.read_table(f).to_pylist() for f in sorted(out.glob("*/part-*.parquet"))}}


class _Killed(Exception):
    pass


def test_one_worker_equals_two_workers_equals_a_killed_and_resumed_run(tmp_path, monkeypatch):
    opts = dict(shard_rows=40, row_group_rows=16, buckets=4, read_tasks=3, split_langs=True, flush_rows=25)
    one = run_prep(_generated(tmp_path), tmp_path / "one", PrepOptions(workers=1, **opts))
    assert one["a"]["counts"] == {"read": 360, "kept": 330, "skipped/duplicate": 30}  # w0..w29 twice in a
    assert one["b"]["counts"] == {"read": 70, "kept": 30, "skipped/duplicate": 40}  # x0..x39 were a's first
    two = run_prep(_generated(tmp_path), tmp_path / "two", PrepOptions(workers=2, **opts))
    assert two == one and _snapshot(tmp_path / "two") == _snapshot(tmp_path / "one")

    # killed in the read stage after 2 inputs, then in the write stage after 2 buckets
    real_read, real_write, done = stages.read_unit, stages.write_bucket, []

    def read_then_die(plan, unit, checks):
        if len(done) == 2:
            raise _Killed
        done.append(unit.index)
        return real_read(plan, unit, checks)

    monkeypatch.setattr(stages, "read_unit", read_then_die)
    with pytest.raises(_Killed):
        run_prep(_generated(tmp_path), tmp_path / "killed", PrepOptions(workers=1, **opts))
    work = tmp_path / "killed" / "_prep"
    markers = {p: p.stat().st_mtime_ns for p in work.glob("read/*/done.json")}
    assert len(markers) == 2
    monkeypatch.setattr(stages, "read_unit", real_read)
    written = []

    def write_then_die(plan, bucket):
        if len(written) == 2:
            raise _Killed
        written.append(bucket)
        return real_write(plan, bucket)

    monkeypatch.setattr(stages, "write_bucket", write_then_die)
    with pytest.raises(_Killed):
        run_prep(_generated(tmp_path), tmp_path / "killed", PrepOptions(workers=1, **opts))
    assert {p: p.stat().st_mtime_ns for p in markers} == markers  # finished inputs were not read again
    buckets = {p: p.stat().st_mtime_ns for p in work.glob("write/*.json")}
    assert len(buckets) == 2
    monkeypatch.setattr(stages, "write_bucket", real_write)
    resumed = run_prep(_generated(tmp_path), tmp_path / "killed", PrepOptions(workers=1, **opts))
    assert {p: p.stat().st_mtime_ns for p in buckets} == buckets  # finished buckets were not written again
    assert resumed == one and _snapshot(tmp_path / "killed") == _snapshot(tmp_path / "one")
    # a finished run is not redone; other options in the same folder are refused
    finished = {p: p.stat().st_mtime_ns for p in (tmp_path / "killed").rglob("*") if p.is_file() and "logs" not in
                p.parts and p.name != "stats.json" and p.suffix != ".json" or p.parent.name in ("read", "write")}
    run_prep(_generated(tmp_path), tmp_path / "killed", PrepOptions(workers=1, **opts))
    assert {p: p.stat().st_mtime_ns for p in finished} == finished
    with pytest.raises(DataError, match="options.buckets"):
        run_prep(_generated(tmp_path), tmp_path / "killed", PrepOptions(workers=1, **{**opts, "buckets": 5}))
    # per-language row groups, as me5.prepare --split-langs writes them
    for sh in json.loads((tmp_path / "one" / "a" / "shards.json").read_text())["shards"]:
        assert all(g["lang"] in ("en", "de", "fr") for g in sh["row_groups"])


def test_eval_sets_in_their_published_layouts(tmp_path):
    """BEIR (gzip), MIRACL as downloaded (corpus docs + topics tsv; qrels left out), MTEB v2 hub parquet."""
    beir = tmp_path / "beir" / "scifact"
    beir.mkdir(parents=True)
    (beir / "corpus.jsonl.gz").write_bytes(gzip.compress(b'{"_id": "1", "title": "T", "text": "beir  passage"}\n'))
    write_jsonl(beir / "queries.jsonl", [{"_id": "q", "text": "beir query"}])
    (beir / "qrels").mkdir()
    (beir / "qrels" / "test.tsv").write_text("query-id\tcorpus-id\tscore\nq\t1\t1\n")
    miracl = tmp_path / "miracl"
    docs = miracl / "miracl-corpus" / "miracl-corpus-v1.0-sw"
    docs.mkdir(parents=True)
    (docs / "docs-0.jsonl.gz").write_bytes(gzip.compress(
        b'{"docid": "1#0", "title": "Kenya", "text": "miracl passage"}\n'))
    topics = miracl / "miracl" / "miracl-v1.0-sw" / "topics"
    topics.mkdir(parents=True)
    (topics / "topics.miracl-v1.0-sw-dev.tsv").write_text("7\tmiracl query\n")
    qrels = miracl / "miracl" / "miracl-v1.0-sw" / "qrels"
    qrels.mkdir()
    (qrels / "qrels.miracl-v1.0-sw-dev.tsv").write_text("7\tQ0\t1#0\t1\n")
    mteb = tmp_path / "mteb" / "NFCorpus"
    for config, rows in (("corpus", {"_id": ["d"], "title": [""], "text": ["mteb passage"]}),
                         ("queries", {"_id": ["q"], "text": ["mteb query"]}),
                         ("default", {"query-id": ["q"], "corpus-id": ["d"], "score": [1]})):
        (mteb / config).mkdir(parents=True)
        pq.write_table(pa.table(rows), mteb / config / "test-00000-of-00001.parquet")
    (mteb / "README.md").write_text("---\nconfigs: []\n---\n")
    assert [f.parent.name for f in eval_files(mteb)] == ["corpus", "queries"]
    assert len(eval_files(miracl)) == 2  # the docs and the topics, not the qrels
    folders = [tmp_path / "beir", miracl, mteb]
    digests = load_eval_digests(folders)
    assert np.all(digests[1:] > digests[:-1])  # sorted, unique
    texts = ["beir passage", "T beir passage", "beir query", "miracl passage", "Kenya miracl passage", "miracl query",
             "mteb passage", "mteb query"]
    by_array, by_set = EvalOverlap(digests), EvalOverlap(load_eval_texts(folders))
    for t in texts:
        assert by_array.contains(t) and by_set.contains(t), t
    assert not by_array.contains("w1") and not by_set.contains("w1")
    assert len(digests) == len(texts)
    recs = [{"query": t, "positive": f"other {i}"} for i, t in enumerate(texts)] + [{"query": "keep", "positive": "me"}]
    raw = write_jsonl(tmp_path / "raw.jsonl", recs)
    st = run_prep({"s": Source(str(raw))}, tmp_path / "out", PrepOptions(eval_sets=[str(f) for f in folders],
                                                                          buckets=2))
    assert st["s"]["counts"] == {"read": 9, "kept": 1, "skipped/eval_overlap": 8}
    with pytest.raises(DataError, match="no eval set"):
        load_eval_digests([tmp_path / "raw.jsonl"])


# ============================================================================================== consistency
@pytest.mark.parametrize("method", ["faiss", "exact"])
@pytest.mark.parametrize("top_k", [1, 2, 5])
def test_pool_ranks_equal_a_brute_force_numpy_reference(method, top_k):
    rng = np.random.default_rng(top_k)
    n, d, n_pool = 300, 16, 400
    q = rng.standard_normal((n, d)).astype(np.float32)
    p = (0.6 * q + rng.standard_normal((n, d))).astype(np.float32)
    pool = rng.standard_normal((n_pool, d)).astype(np.float32)
    pos_keys = rng.integers(0, 2**63, n, dtype=np.uint64)
    pool_keys = rng.integers(0, 2**63, n_pool, dtype=np.uint64)
    # a third of the positives are in the pool too, embedded in another batch (a hair off): not "another passage"
    for j, i in enumerate(range(0, n, 3)):
        pool[j] = p[i] * (1 + 1e-3)
        pool_keys[j] = pos_keys[i]
    s_pos = (q * p).sum(1)
    scores = q @ pool.T
    same = pool_keys[None, :] == pos_keys[:, None]
    reference = 1 + ((scores > s_pos[:, None]) & ~same).sum(1)
    got = pool_ranks(q, p, pool, top_k=top_k, pos_keys=pos_keys, pool_keys=pool_keys, method=method)
    np.testing.assert_array_equal(got, np.minimum(reference, top_k + 1))
    assert 0 < (reference <= top_k).sum() < n  # both kept and dropped pairs
    # without the keys, the in-pool copy counts when it scores higher (the brute-force filter's plain rule)
    plain = pool_ranks(q, p, pool, top_k=top_k, method=method)
    np.testing.assert_array_equal(plain, np.minimum(1 + (scores > s_pos[:, None]).sum(1), top_k + 1))
    assert (plain != got).any() or top_k == 5


def topic_embed(texts, kind):
    """A deterministic fake encoder: the topic of a text is its first word (``tK``), embedded one-hot."""
    out = np.zeros((len(texts), 16), dtype=np.float32)
    for i, t in enumerate(texts):
        out[i, int(t.split()[0][1:]) % 16] = 1.0
    return out


def test_pipeline_consistency_filter_matches_the_inline_filter(tmp_path):
    consistent = [{"query": f"t{k} question {i}", "positive": f"t{k} answer {i}"} for k in range(4) for i in range(5)]
    noisy = [{"query": f"t{k} question x", "positive": f"t{(k + 1) % 4} unrelated"} for k in range(4)]
    raw = write_jsonl(tmp_path / "raw.jsonl", consistent + noisy)
    inline = prepare({"s": Source(str(raw))}, tmp_path / "inline",
                     PrepareOptions(consistency_pool=100, progress=False), embedder=topic_embed)
    piped = run_prep({"s": Source(str(raw))}, tmp_path / "pipe",
                     PrepOptions(buckets=3, consistency=ConsistencyOptions(model="unused", pool=100)),
                     scorer=topic_embed)
    assert piped["s"]["counts"] == inline["s"]["counts"] == {"read": 24, "kept": 20, "skipped/inconsistent": 4}
    assert sorted(rows_of(tmp_path / "pipe" / "s")) == sorted(rows_of(tmp_path / "inline" / "s"))
    assert piped["s"]["langs"] == {"und": {"kept": 20, "skipped/inconsistent": 4}}


def test_the_pool_is_the_same_sample_whatever_the_tasks(tmp_path):
    raw = tmp_path / "raw"
    for f in range(3):
        write_jsonl(raw / f"{f}.jsonl", [{"query": f"t{i % 7} q{f}.{i}", "positive": f"t{i % 7} p{f}.{i}"}
                                         for i in range(40)])
    pools = []
    for tasks, buckets in ((1, 2), (3, 5)):
        out = tmp_path / f"o{tasks}"
        run_prep({"s": Source(str(raw))}, out, PrepOptions(read_tasks=tasks, buckets=buckets, consistency=(
            ConsistencyOptions(model="unused", pool=25, top_k=3))), scorer=topic_embed)
        pools.append(np.load(out / "_prep" / "pool" / "s" / "keys.npy"))
    np.testing.assert_array_equal(pools[0], pools[1])
    assert len(pools[0]) == 25 and np.all(pools[0][1:] > pools[0][:-1])


def test_pipeline_filter_with_a_saved_model_equals_a_brute_force_reference(tmp_path):
    """The CLI path: a saved model embedded through the embed core (fp16 shards; fp32 on CPU), FAISS search; the
    kept pairs are those a NumPy brute force over the same model's embeddings keeps."""
    import torch

    from me5.app.prepare import main
    from me5.embed.encode import encode_texts
    from me5.export import export_encoder
    from me5.models.encoder import Encoder
    from me5.models.saved import load_model, read_saved_settings
    from me5.prep.pipeline import text_key
    from me5.prompts import PromptPolicy
    from tests.tiny import wordlevel_tokenizer

    torch.manual_seed(0)
    tok = wordlevel_tokenizer()
    enc = Encoder.from_scratch(tokenizer=tok, num_hidden_layers=1, hidden_size=32, num_attention_heads=2,
                               intermediate_size=64, max_position_embeddings=80)
    export_encoder(enc, tok, tmp_path / "model", prompts=PromptPolicy("e5"), max_seq_length=64)
    recs = [{"query": f"w{i} w{i + 3}", "positive": f"w{(i * 7) % 150} w{i + 1} w{i % 13}"} for i in range(60)]
    raw = write_jsonl(tmp_path / "raw.jsonl", recs)
    rc = main(["--source", "me5.data.source.Source", "--raw", str(raw), "--name", "s", "--out", str(tmp_path / "o"),
               "--consistency-model", str(tmp_path / "model"), "--consistency-pool", "40", "--consistency-top-k",
               "3", "--buckets", "2", "--no-progress"])
    assert rc == 0
    counts = json.loads((tmp_path / "o" / "stats.json").read_text())["s"]["counts"]
    assert counts["read"] == 60 and counts["kept"] + counts.get("skipped/inconsistent", 0) == 60
    assert list((tmp_path / "o" / "_prep" / "filter").rglob("emb-r0-00000.npy"))  # the embed core's shards
    # the reference: the same model, embedded in memory, every score compared by NumPy
    encoder, tokenizer, device = load_model(str(tmp_path / "model"), read_saved_settings(tmp_path / "model"), "cpu")
    policy = PromptPolicy("e5")
    def emb(texts, prefix):  # the pipeline searches the embed core's fp16 shards: round as they do
        out = encode_texts(encoder, tokenizer, list(texts), prefix=prefix, max_length=128).numpy()
        return out.astype(np.float16).astype(np.float32)

    positives = sorted({r["positive"] for r in recs}, key=lambda t: text_key(t, 0))[:40]
    pool = emb(positives, policy.document())
    q = emb([r["query"] for r in recs], policy.query())
    p = emb([r["positive"] for r in recs], policy.document())
    scores, s_pos = q @ pool.T, (q * p).sum(1)
    same = np.array([[r["positive"] == t for t in positives] for r in recs])
    margin = np.where(same, np.inf, np.abs(scores - s_pos[:, None])).min(1)
    ranks = 1 + ((scores > s_pos[:, None]) & ~same).sum(1)
    want = {(r["query"], r["positive"]) for r, k, m in zip(recs, ranks, margin) if k <= 3}
    sure = margin > 1e-5  # pairs that no float rounding (summation order) can move across the line
    got = {(r[0], r[1]) for r in rows_of(tmp_path / "o" / "s")}
    assert {x for x, ok in zip(((r["query"], r["positive"]) for r in recs), sure) if ok} & got == \
        {x for x, ok in zip(((r["query"], r["positive"]) for r in recs), sure) if ok} & want
    assert sure.sum() >= 50 and 0 < len(want) < 60
    # packed rows (the embed core's padding-free path) keep the same pairs
    assert main(["--source", "me5.data.source.Source", "--raw", str(raw), "--name", "s", "--out",
                 str(tmp_path / "packed"), "--consistency-model", str(tmp_path / "model"), "--consistency-pool", "40",
                 "--consistency-top-k", "3", "--buckets", "2", "--consistency-packed"]) == 0
    assert sorted(rows_of(tmp_path / "packed" / "s")) == sorted(rows_of(tmp_path / "o" / "s"))


def test_slurm_executors_are_configured_and_not_submitted(tmp_path):
    raw = write_jsonl(tmp_path / "raw.jsonl", pairs(10))
    opts = PrepOptions(executor="slurm", buckets=4, read_tasks=2, eval_sets=[str(tmp_path)],
                       consistency=ConsistencyOptions.preset("paper", model="m"))
    opts.slurm.partition, opts.slurm.gpu_partition, opts.slurm.venv = "cpu", "gpu", "/opt/venv"
    assert (opts.consistency.pool, opts.consistency.top_k) == (1_000_000, 2)  # E5's values
    plan = make_plan({"s": Source(str(raw))}, tmp_path / "out", opts)
    executors = build_executors(plan)
    from datatrove.executor import SlurmPipelineExecutor

    assert all(isinstance(e, SlurmPipelineExecutor) for e in executors)
    assert [e.world_size for e in executors] == [1, 1, 1, 4, 1]  # eval, read (1 input), pool, write, merge
    assert [e.gpus_per_task for e in executors] == [0, 0, 1, 1, 0]
    assert [e.depends for e in executors[1:]] == executors[:-1]
    script = executors[3].get_launch_file_contents(executors[3].get_sbatch_args(4), "launch_pickled_pipeline x")
    assert "#SBATCH --gpus=1" in script and "#SBATCH --partition=gpu" in script
    assert "#SBATCH --array=0-3" in script and "source /opt/venv/bin/activate" in script
    assert "#SBATCH --partition=cpu" in executors[1].get_launch_file_contents(executors[1].get_sbatch_args(), "x")


def test_written_rows_are_examples_of_the_normalised_schema(tmp_path):
    """Teacher scores and negatives survive the bucket files (float32, as the inline writer stores them)."""
    recs = [{"query": f"q{i}", "positive": f"p{i}", "negatives": [f"n{i}"], "teacher_scores": [0.1 * i, 1 / 3],
             "instruction": "Find it.", "symmetric": i % 2 == 0, "lang": "en"} for i in range(5)]
    raw = write_jsonl(tmp_path / "raw.jsonl", recs)
    run_prep({"s": Source(str(raw))}, tmp_path / "pipe", PrepOptions(buckets=2))
    prepare({"s": Source(str(raw))}, tmp_path / "inline", PrepareOptions(progress=False))
    assert sorted(rows_of(tmp_path / "pipe" / "s")) == sorted(rows_of(tmp_path / "inline" / "s"))
    assert {r[3] for r in rows_of(tmp_path / "pipe" / "s")} >= {(np.float32(0.1 * 4).item(), np.float32(1 / 3).item())}


def test_the_pipeline_reads_the_consistency_models_own_prompt_style(tmp_path):
    """``prompt_style`` None: the model's saved policy (read once, before the plan: its fingerprint holds it); a
    given style overrides it; an Embedder scorer prompts by itself, a scorer object needs the style."""
    from me5.errors import ConfigError
    from me5.mining.consistency import CallableScorer
    from me5.prep.pipeline import consistency_prompt_style
    from tests.helpers import saved_model_folder

    model = str(saved_model_folder(tmp_path / "model", "instruct"))
    assert consistency_prompt_style(ConsistencyOptions(model=model)) == "instruct"
    assert consistency_prompt_style(ConsistencyOptions(model=model, prompt_style="e5")) == "e5"
    assert consistency_prompt_style(ConsistencyOptions(model="unused"), topic_embed) == "none"
    with pytest.raises(ConfigError, match="prompt_style"):
        consistency_prompt_style(ConsistencyOptions(model="unused"), CallableScorer(topic_embed))
    raw = write_jsonl(tmp_path / "raw.jsonl", [{"query": f"t{i} q", "positive": f"t{i} p"} for i in range(4)])
    run_prep({"s": Source(str(raw))}, tmp_path / "pipe", PrepOptions(buckets=1, consistency=ConsistencyOptions(
        model="unused", pool=4)), scorer=topic_embed)
    plan = json.loads((tmp_path / "pipe" / "_prep" / "plan.json").read_text(encoding="utf-8"))
    assert plan["options"]["consistency"]["prompt_style"] == "none"


def test_cli_options_reach_the_pipeline(tmp_path):
    """Config-file options (flat, ``consistency:``/``slurm:`` mappings) and flags become ``PrepOptions``; the paper
    preset is E5's pool and top-k, and a flag overrides it."""
    from me5.app.prepare import pipeline_options
    from me5.errors import ConfigError

    opts = pipeline_options({"buckets": 32, "dedup": False, "consistency": {"model": "m", "max_batch": 64},
                             "consistency_preset": "paper", "consistency_top_k": 3, "slurm": {"partition": "big"},
                             "slurm_gpus": 2, "langs": ["en"]})
    assert (opts.buckets, opts.dedup, opts.langs) == (32, False, ["en"])
    c = opts.consistency
    assert (c.model, c.pool, c.top_k, c.max_batch) == ("m", 1_000_000, 3, 64)
    assert (opts.slurm.partition, opts.slurm.gpus) == ("big", 2)
    assert pipeline_options({}).consistency is None and pipeline_options({}).dedup is True
    with pytest.raises(ConfigError, match="consistency_preset"):
        pipeline_options({"consistency_preset": "paper"})
    with pytest.raises(ConfigError, match="consistency_preset"):
        pipeline_options({"consistency_model": "m", "consistency_preset": "e6"})


def test_bench_prep_runs_on_a_small_set(tmp_path, capsys):
    from benchmarks.prepare import main

    assert main(["--work", str(tmp_path), "--pairs", "3000", "--files", "3", "--workers", "1", "--read-tasks", "2",
                 "--buckets", "2", "--json", str(tmp_path / "r.json")]) == 0
    (row,) = json.loads((tmp_path / "r.json").read_text())["prepare"]
    assert row["read"] == 3000 and row["kept"] + row["duplicates"] + row["empty"] == 3000
    assert 0 < row["duplicates"] < 300 and row["pairs_per_s"] > 0
