"""The streaming path and the mixture: disjoint reading over ranks x workers, exact resume, homogeneous
batches, temperature-weighted mixtures (sources and languages), the realised mixture and its logging."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from torch.utils.data import DataLoader

from me5.app.callbacks import log_realised_mixture
from me5.batching import BatchPlan
from me5.data import PairBatchStream, PairCollator, PairDataModule, Source
from me5.data.mixture import mixture_scalars
from me5.data.stream import deal_units
from me5.errors import ConfigError, DataError
from tests.helpers import connect, one_source, pairs, write_jsonl
from tests.tiny import wordlevel_tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    return wordlevel_tokenizer()


def queries(tok, batch) -> list[str]:
    """The query texts of a batch (fixture tokenizer: ``<s> query: wN </s>``)."""
    return [tok.decode(r[m == 1][2:-1]) for r, m in zip(batch["query_input_ids"], batch["query_attention_mask"])]


def write_parquet_shards(folder, n_files, per_file, *, start=0, lang="en", negs=0):
    folder.mkdir(parents=True, exist_ok=True)
    k = start
    for f in range(n_files):
        rows = []
        for _ in range(per_file):
            r = {"query": f"w{k}", "positive": f"w{k} w{(k + 1) % 200}", "lang": lang}
            if negs:
                r["negatives"] = [f"w{(k + 2 + j) % 200}" for j in range(negs)]
                r["teacher_scores"] = [5.0] + [float(-j) for j in range(negs)]
            rows.append(r)
            k += 1
        pq.write_table(pa.Table.from_pylist(rows), folder / f"part-{f:03d}.parquet")
    return folder


def run(dm, n, *, rank=None, world=None):
    """``n`` batches of ``dm``'s loader, each passed through the hook Lightning calls (records the position)."""
    if rank is None:
        loader = dm.train_dataloader()
    else:
        a = dm._connected
        coll = PairCollator(a.tokenizer, query_max_length=a.query_max_length, passage_max_length=a.passage_max_length)
        loader = DataLoader(dm.build_stream(coll, rank=rank, world=world), batch_size=None, num_workers=dm.num_workers)
    out = []
    for b, _ in zip(loader, range(n)):
        out.append(dm.on_before_batch_transfer(b, 0))
    return out


def connected(dm, tok, **kw):
    connect(dm, tok, **{"global_batch_size": 8, **kw})
    dm.setup("fit")
    return dm


def in_memory_stream(dm, collator, *, weights=None, global_batch_size=8, world_size=1, **kw):
    """A :class:`PairBatchStream` over ``dm``'s loaded examples (a connected, set-up in-memory DataModule);
    ``weights``: the DataModule's sampling weights unless given."""
    plan = BatchPlan.build(global_batch_size=global_batch_size, world_size=world_size)
    return PairBatchStream(dm.examples, weights if weights is not None else dm.sampling_weights(), collator=collator,
                           formatters=dm._connected.formatters, batch_plan=plan, **kw)


@pytest.mark.parametrize("layout", ["shards", "few_files"])
def test_two_ranks_two_workers_read_disjoint_data_covering_everything(tmp_path, tokenizer, layout):
    if layout == "shards":  # 8 units >= 4 readers: whole units are dealt out
        path = write_parquet_shards(tmp_path / "d", 8, 8)
    else:  # 1 jsonl file + 1 parquet row group < 4 readers: every reader strides over the records
        (tmp_path / "d").mkdir()
        write_jsonl(tmp_path / "d" / "a.jsonl", [{"query": f"w{i}", "positive": f"w{i}"} for i in range(40)])
        pq.write_table(pa.Table.from_pylist([{"query": f"w{i}", "positive": f"w{i}"} for i in range(40, 64)]),
                       tmp_path / "d" / "b.parquet")
        path = tmp_path / "d"
    got = {}
    for rank in range(2):
        dm = connected(one_source(path, streaming=True, num_workers=2), tokenizer, global_batch_size=16)
        for i, b in enumerate(run(dm, 4, rank=rank, world=2)):  # 4 global batches x 16 = one pass over 64
            assert b["batch_index"] == i
            got[(rank, i % 2)] = got.get((rank, i % 2), []) + queries(tokenizer, b)
    everything = sorted(f"w{i}" for i in range(64))
    assert sorted(q for qs in got.values() for q in qs) == everything  # together: everything, once
    readers = [set(qs) for qs in got.values()]
    assert len(readers) == 4 and all(len(r) == 16 for r in readers)
    assert all(not (a & b) for i, a in enumerate(readers) for b in readers[i + 1:])  # disjoint


def test_deal_units_is_balanced_and_covers_each_epoch():
    from me5.data.readers import Unit

    units = [Unit(f"f{i}", "parquet", 0, rows, rows) for i, rows in enumerate([10, 10, 10, 10, 30, 5, 5, 20, 10])]
    for epoch in range(3):
        dealt = deal_units(units, key="s", epoch=epoch, seed=1, n_readers=3)
        assert sorted(u for part in dealt for u in part) == list(range(9))
        loads = [sum(units[u].rows for u in part) for part in dealt]
        assert max(loads) - min(loads) <= 30, loads  # at most the largest unit
    assert deal_units(units, key="s", epoch=0, seed=1, n_readers=3) != deal_units(units, key="s", epoch=1, seed=1, n_readers=3)
    assert deal_units(units, key="s", epoch=0, seed=1, n_readers=10) is None  # fewer units than readers


def _resume_mixture(tmp_path, tok, **kw):
    write_parquet_shards(tmp_path / "a", 5, 12, negs=2)
    write_jsonl(tmp_path / "b.jsonl", pairs(30, negs=2, lang="de"))
    srcs = {"a": Source(str(tmp_path / "a")), "b": Source(str(tmp_path / "b.jsonl"))}
    dm = PairDataModule(srcs, weights={"a": 2.0, "b": 1.0}, seed=5, streaming=True, **kw)
    return connected(dm, tok, n_negatives=1, require_teacher=True)


def _same(a, b):
    assert a["batch_index"] == b["batch_index"]
    for k in ("query_input_ids", "passage_input_ids", "passage_attention_mask", "teacher_scores"):
        assert torch.equal(a[k], b[k]), k
    assert a["lang"] == b["lang"]


@pytest.mark.parametrize("num_workers", [0, 2])
def test_stop_and_resume_gives_the_uninterrupted_batches(tmp_path, tokenizer, num_workers):
    full = run(_resume_mixture(tmp_path, tokenizer, num_workers=num_workers), 20)  # several epochs of both
    first = _resume_mixture(tmp_path, tokenizer, num_workers=num_workers)
    run(first, 9)
    state = json.loads(json.dumps(first.state_dict()))  # survives a checkpoint round trip (json: str keys)
    assert state["consumed_batches"] == 9 and len(state["stream"]["readers"]) == max(1, num_workers)
    resumed = _resume_mixture(tmp_path, tokenizer, num_workers=num_workers)
    resumed.load_state_dict(state)
    again = run(resumed, 11)
    for a, b in zip(full[9:], again, strict=True):
        _same(a, b)
    # a second stop and resume from the resumed run continues the same sequence
    state2 = resumed.state_dict()
    assert state2["consumed_batches"] == 20
    third = _resume_mixture(tmp_path, tokenizer, num_workers=num_workers)
    third.load_state_dict(state2)
    more = run(third, 3)
    ref = run(_resume_mixture(tmp_path, tokenizer, num_workers=num_workers), 23)[20:]
    for a, b in zip(ref, more, strict=True):
        _same(a, b)
    counts = third.realised_mixture()
    assert sum(n for langs in counts.values() for n in langs.values()) == 23 * 8  # cumulative over resumes


def test_resume_on_two_ranks_with_workers(tmp_path, tokenizer):
    path = write_parquet_shards(tmp_path / "d", 6, 10)
    make = lambda: connected(one_source(path, streaming=True, num_workers=2, seed=2), tokenizer)  # noqa: E731
    full = {r: run(make(), 10, rank=r, world=2) for r in range(2)}
    parts = []
    for r in range(2):
        dm = make()
        run(dm, 5, rank=r, world=2)
        parts.append(dm.state_dict())
    state = parts[0]  # what the all-gather in state_dict merges under torch.distributed
    state["stream"]["readers"].update(parts[1]["stream"]["readers"])
    assert sorted(state["stream"]["readers"]) == [0, 1, 2, 3]
    for r in range(2):
        dm = make()
        dm.load_state_dict(state)
        for a, b in zip(full[r][5:], run(dm, 5, rank=r, world=2), strict=True):
            assert a["batch_index"] == b["batch_index"]
            assert torch.equal(a["query_input_ids"], b["query_input_ids"])
            assert torch.equal(a["passage_input_ids"], b["passage_input_ids"])


def test_changed_layout_resumes_with_a_warning(tmp_path, tokenizer, caplog):
    path = write_parquet_shards(tmp_path / "d", 4, 8)
    dm = connected(one_source(path, streaming=True, num_workers=2), tokenizer)
    run(dm, 3)
    state = dm.state_dict()
    other = connected(one_source(path, streaming=True, num_workers=0), tokenizer)
    other.load_state_dict(state)
    with caplog.at_level("WARNING"):
        assert len(run(other, 2)) == 2
    assert "layout changed" in caplog.text


@pytest.mark.parametrize("streaming", [False, True])
def test_homogeneous_batches_are_single_source_across_two_ranks(tmp_path, tokenizer, streaming):
    write_parquet_shards(tmp_path / "a", 4, 25, lang="a")
    write_parquet_shards(tmp_path / "b", 4, 25, lang="b", start=100)
    seen = set()
    per_rank = []
    for rank in range(2):
        srcs = {n: Source(str(tmp_path / n)) for n in ("a", "b")}
        dm = connected(PairDataModule(srcs, weights={"a": 1, "b": 1}, homogeneous=True, seed=3, streaming=streaming),
                       tokenizer)
        if streaming:
            per_rank.append(run(dm, 20, rank=rank, world=2))
        else:
            s = in_memory_stream(dm, PairCollator(tokenizer), world_size=2, rank=rank, seed=3, homogeneous=True)
            it = iter(s)
            per_rank.append([next(it) for _ in range(20)])
    for b0, b1 in zip(*per_rank):
        langs = set(b0["lang"]) | set(b1["lang"])
        assert len(langs) == 1
        seen |= langs
    assert seen == {"a", "b"}


def _two_sources(tmp_path, n_a, n_b, *, streaming, **kw):
    if streaming:
        write_parquet_shards(tmp_path / "a", 4, n_a // 4, lang="a")
        write_parquet_shards(tmp_path / "b", 2, n_b // 2, lang="b", start=100)
        srcs = {n: Source(str(tmp_path / n)) for n in ("a", "b")}
    else:
        srcs = {n: Source(str(write_jsonl(tmp_path / f"{n}.jsonl", pairs(c, lang=n))))
                for n, c in (("a", n_a), ("b", n_b))}
    return PairDataModule(srcs, seed=7, streaming=streaming, **kw)


@pytest.mark.parametrize("streaming", [False, True])
@pytest.mark.parametrize("alpha", [1.0, 0.5, 0.0])
def test_realised_mixture_matches_weights_with_temperature(tmp_path, tokenizer, streaming, alpha):
    # weights default to the sizes, 900 and 100 pairs; p(a) = 900^a / (900^a + 100^a)
    dm = connected(_two_sources(tmp_path, 900, 100, streaming=streaming, temperature_alpha=alpha), tokenizer,
                   global_batch_size=64)
    assert dm.weights() == {"a": 900.0, "b": 100.0}
    expected = 900**alpha / (900**alpha + 100**alpha)
    assert dm.probabilities()["a"] == pytest.approx(expected)
    run(dm, 50)  # 3200 draws: sd <= 0.009; 4 sd tolerance
    counts = dm.realised_mixture()
    n_a, n_b = sum(counts["a"].values()), sum(counts["b"].values())
    assert n_a + n_b == 3200 and abs(n_a / 3200 - expected) < 0.036
    assert set(counts["a"]) == {"a"} and set(counts["b"]) == {"b"}  # per language too


@pytest.mark.parametrize("streaming", [False, True])
def test_language_temperature_within_a_source(tmp_path, tokenizer, streaming):
    if streaming:  # one language per row group, as me5.data.shards.prepare writes them
        write_parquet_shards(tmp_path / "s", 3, 300, lang="en")
        write_parquet_shards(tmp_path / "s2", 1, 100, lang="de", start=50)
        (tmp_path / "s2" / "part-000.parquet").rename(tmp_path / "s" / "part-de.parquet")
        src = Source(str(tmp_path / "s"))
    else:
        src = Source(str(write_jsonl(tmp_path / "s.jsonl", pairs(900, lang="en") + pairs(100, lang="de"))))
    dm = connected(PairDataModule({"s": src}, lang_temperature_alpha=0.0, seed=1, streaming=streaming), tokenizer,
                   global_batch_size=64)
    assert dm.lang_weights() == {"s": {"de": 1.0, "en": 1.0}}
    run(dm, 40)
    langs = dm.realised_mixture()["s"]
    assert abs(langs["de"] / 2560 - 0.5) < 0.04  # uniform over languages, not 10%


def test_language_temperature_needs_single_language_shards(tmp_path, tokenizer):
    p = tmp_path / "m"
    p.mkdir()
    pq.write_table(pa.Table.from_pylist(pairs(10, lang="en") + pairs(10, lang="de")), p / "x.parquet")
    dm = PairDataModule({"m": Source(str(p))}, lang_temperature_alpha=0.3, streaming=True)
    with pytest.raises(ConfigError, match="single-language"):
        connected(dm, tokenizer)


def test_log_realised_mixture_to_csv_and_wandb(tmp_path):
    counts = {"wiki": {"en": 30, "de": 10}, "nllb": {"en": 60}}
    assert mixture_scalars(counts) == pytest.approx({"data/mix/nllb": 0.6, "data/mix/wiki": 0.4,
                                                     "data/mix/lang/de": 0.1, "data/mix/lang/en": 0.9})

    class Rec:
        def __init__(self):
            self.metrics, self.logged = [], []

        def log_metrics(self, metrics, step=None):
            self.metrics.append((metrics, step))

    class WandbLogger(Rec):  # duck-typed by class name, as the real one is detected
        @property
        def experiment(self):
            return self

        def log(self, payload):
            self.logged.append(payload)

    csv_like, wb = Rec(), WandbLogger()
    log_realised_mixture(counts, [csv_like, wb], step=7)
    assert csv_like.metrics == [(mixture_scalars(counts), 7)] and not csv_like.logged
    payload = wb.logged[0]
    assert payload["trainer/global_step"] == 7
    assert type(payload["data/mix/table"]).__name__ == "Table"
    assert payload["data/mix/table"].data[0][:3] == ["nllb", "en", 60]
    assert "data/mix/pairs_per_source" in payload and wb.metrics


def test_hub_datasets_stream_is_split_and_resumes(tmp_path, tokenizer):
    files = write_parquet_shards(tmp_path / "d", 3, 10)
    data_files = sorted(str(p) for p in files.glob("*.parquet"))

    def make():  # one source: no weight needed (a hub stream has no size offline)
        return connected(one_source("parquet", data_files=data_files, num_workers=2), tokenizer)

    dm = make()
    assert dm.is_streaming() and dm.leaves["pairs"][0].hub is not None
    full = run(dm, 10)
    assert sorted(Counter(q for b in full[:2] for q in queries(tokenizer, b)).values()) == [1] * 16  # disjoint readers
    first = make()
    run(first, 5)
    resumed = make()
    resumed.load_state_dict(first.state_dict())
    for a, b in zip(full[5:], run(resumed, 5), strict=True):
        assert torch.equal(a["query_input_ids"], b["query_input_ids"])


def test_bad_records_when_streaming_name_file_and_line_or_are_counted(tmp_path, tokenizer):
    recs = [json.dumps(r) for r in pairs(12)]
    recs[4] = '{"query": "w1", "positive":'
    recs[7] = json.dumps({"query": "w1"})
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "bad.jsonl").write_text("\n".join(recs) + "\n")
    dm = connected(one_source(tmp_path / "d", streaming=True), tokenizer, global_batch_size=4)
    with pytest.raises(DataError, match=r"bad\.jsonl:5.*malformed JSON"):
        run(dm, 3)
    dm = connected(one_source(tmp_path / "d", streaming=True, num_workers=2), tokenizer, global_batch_size=4)
    it = iter(dm.train_dataloader())
    with pytest.raises(DataError, match=r"bad\.jsonl:5"):  # from inside a worker: still a DataError naming file:line
        for _ in range(3):
            next(it)
    # torch waits 5 s per worker to shut down after a worker error (not what is tested): stop them here, first
    # unregistering them from torch's SIGCHLD check, which otherwise reports "worker killed by signal:
    # Terminated" into whichever test runs next
    from torch.utils.data._utils.signal_handling import _remove_worker_pids

    _remove_worker_pids(id(it))
    it._shutdown = True
    for w in it._workers:
        w.terminate()
        w.join(timeout=10)
    dm = connected(one_source(tmp_path / "d", streaming=True, strict=False), tokenizer, global_batch_size=4)
    run(dm, 3)  # 12 slots over the 10 good records: wraps into the second epoch
    counts = dm.data_counts()  # each bad record counted under its reason (the taxonomy me5.data.records shares)
    assert counts["pairs/skipped/malformed_json"] >= 1 and counts["pairs/skipped/missing_field"] >= 1


def test_streaming_is_automatic_for_prepared_shards_and_hub_ids(tmp_path):
    write_parquet_shards(tmp_path / "d", 2, 5)
    assert not Source(str(tmp_path / "d")).wants_streaming()
    (tmp_path / "d" / "shards.json").write_text("{}")
    assert Source(str(tmp_path / "d")).wants_streaming()
    assert Source("someone/some-dataset").wants_streaming()
    assert not Source("someone/some-dataset", streaming=False).wants_streaming()


def test_in_memory_default_sequence_is_unchanged(tmp_path, tokenizer):
    """The in-memory draws are the ones the sample run's golden losses were recorded with."""
    p = write_jsonl(tmp_path / "r.jsonl", [{"query": f"w{i}", "positive": f"w{i}"} for i in range(50)])
    dm = connected(one_source(p), tokenizer)
    s = in_memory_stream(dm, PairCollator(tokenizer), weights=dm.weights(), seed=0)
    first = next(iter(s))
    rng = np.random.default_rng(0)
    rng.choice(1, size=8, p=[1.0])
    order = np.random.default_rng([0, 0, 0]).permutation(50)[:8]
    assert queries(tokenizer, first) == [f"w{i}" for i in order]


def test_lightning_checkpoint_resume_streaming_with_workers(tmp_path, tokenizer):
    """Through a real Trainer: the hook records positions, the checkpoint stores them, a resumed fit continues."""
    import lightning as L
    from lightning.pytorch.callbacks import ModelCheckpoint

    path = write_parquet_shards(tmp_path / "d", 5, 7)

    class Recorder(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))
            self.seen = []

        def training_step(self, batch, batch_idx):
            assert "data_state" not in batch  # taken out by the DataModule's hook
            self.seen.append((batch["batch_index"], batch["query_input_ids"].tolist()))
            return (self.w * batch["query_input_ids"].float().mean()).sum()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    def fit(max_steps, ckpt_path=None, every=None):
        dm = connect(one_source(path, streaming=True, num_workers=2, seed=4), tokenizer, global_batch_size=4)
        model = Recorder()
        cbs = [ModelCheckpoint(dirpath=tmp_path / "ck", every_n_train_steps=every, save_top_k=-1,
                               filename="s{step}", auto_insert_metric_name=False)] if every else []
        trainer = L.Trainer(max_steps=max_steps, accelerator="cpu", logger=False, enable_progress_bar=False,
                            enable_model_summary=False, callbacks=cbs, enable_checkpointing=bool(every))
        trainer.fit(model, datamodule=dm, ckpt_path=ckpt_path)
        return model.seen

    full = fit(9, every=4)
    ckpt = torch.load(tmp_path / "ck" / "s4.ckpt", weights_only=False)
    state = ckpt["PairDataModule"]
    assert state["consumed_batches"] == 4 and sorted(state["stream"]["readers"]) == [0, 1]
    resumed = fit(9, ckpt_path=str(tmp_path / "ck" / "s4.ckpt"))
    assert [b for b, _ in full] == list(range(9)) and [b for b, _ in resumed] == list(range(4, 9))
    assert resumed == full[4:]


def _gather_worker(rank, path, port, out):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        dm = connected(one_source(path, streaming=True, num_workers=0, seed=1), wordlevel_tokenizer())
        run(dm, 3, rank=rank, world=2)
        out.put((rank, dm.state_dict(), dm.realised_mixture(gather=True)))
    finally:
        dist.destroy_process_group()


def test_state_dict_gathers_every_ranks_readers_under_torch_distributed(tmp_path):
    import multiprocessing as mp
    import socket

    path = write_parquet_shards(tmp_path / "d", 4, 10)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("fork")
    out = ctx.Queue()
    procs = [ctx.Process(target=_gather_worker, args=(r, path, port, out)) for r in range(2)]
    for p in procs:
        p.start()
    results = dict((r, (st, mix)) for r, st, mix in (out.get(timeout=60) for _ in procs))
    for p in procs:
        p.join(timeout=30)
    assert all(p.exitcode == 0 for p in procs)
    for r in range(2):
        state, mix = results[r]
        assert sorted(state["stream"]["readers"]) == [0, 1]  # rank 0's reader and rank 1's, on every rank
        assert sum(state["realised_mixture"]["pairs"].values()) == 3 * 8 == sum(mix["pairs"].values())


def _gz_mixture(tmp_path, tok, name):
    srcs = {"b": Source(str(tmp_path / name))}
    return connected(PairDataModule(srcs, seed=5, streaming=True), tok, n_negatives=1, require_teacher=True)


def test_gzip_jsonl_streams_like_plain_jsonl_and_resumes_inside_the_file(tmp_path, tokenizer):
    import gzip

    records = pairs(30, negs=2, lang="de")
    write_jsonl(tmp_path / "b.jsonl", records)
    (tmp_path / "b.jsonl.gz").write_bytes(gzip.compress((tmp_path / "b.jsonl").read_bytes()))
    plain = run(_gz_mixture(tmp_path, tokenizer, "b.jsonl"), 10)  # 30 pairs / 8: several epochs of the file
    full = run(_gz_mixture(tmp_path, tokenizer, "b.jsonl.gz"), 10)
    for a, b in zip(plain, full, strict=True):
        _same(a, b)
    first = _gz_mixture(tmp_path, tokenizer, "b.jsonl.gz")
    run(first, 2)  # 16 of 30 lines: the reader stops in the middle of the gzip stream
    state = json.loads(json.dumps(first.state_dict()))
    epoch, unit, line, byte, _ = state["stream"]["readers"]["0"]["positions"]["b"]
    assert (epoch, unit, line) == (0, 0, 16) and 0 < byte < (tmp_path / "b.jsonl").stat().st_size  # inside the file
    resumed = _gz_mixture(tmp_path, tokenizer, "b.jsonl.gz")
    resumed.load_state_dict(state)
    for a, b in zip(full[2:], run(resumed, 8), strict=True):
        _same(a, b)


class _FreezeCount:
    """A collator that reports how many objects its process has frozen out of the garbage collector."""

    def __call__(self, items):
        import gc

        return {"frozen": torch.tensor(gc.get_freeze_count()), "n": len(items)}


@pytest.mark.parametrize("streaming", [False, True])
def test_loader_workers_freeze_what_they_inherit_and_the_main_process_is_untouched(tmp_path, tokenizer, streaming):
    import gc

    write_jsonl(tmp_path / "r.jsonl", pairs(64))
    dm = connected(PairDataModule({"r": Source(str(tmp_path / "r.jsonl"))}, streaming=streaming, num_workers=1),
                   tokenizer)
    if streaming:
        stream = dm.build_stream(_FreezeCount())
    else:
        stream = in_memory_stream(dm, _FreezeCount(), weights=dm.weights(), seed=0)
    before = gc.get_freeze_count()
    batch = next(iter(DataLoader(stream, batch_size=None, num_workers=1)))
    assert batch["frozen"] > 10_000  # the worker froze the objects it inherited (torch and all: far more than 10k)
    assert gc.get_freeze_count() == before  # not the process that trains
    assert next(iter(stream))["frozen"] == before  # iterated in the main process (num_workers=0): nothing frozen


def _c4_file(path, n, *, lang_field=None, gz=False):
    import gzip

    recs = [{"text": f"w{i}\nw{i} w{(i + 1) % 200}", "url": "https://example.org/a", "timestamp": "t",
             **({"lang": lang_field} if lang_field else {})} for i in range(n)]
    data = "".join(json.dumps(r) + "\n" for r in recs).encode()
    path.write_bytes(gzip.compress(data) if gz else data)
    return path


def test_language_temperature_over_raw_files_named_by_language(tmp_path, tokenizer):
    from me5.data.sources import MC4Pairs

    raw = tmp_path / "multilingual"
    raw.mkdir()
    _c4_file(raw / "c4-de.tfrecord-00000-of-00001.json.gz", 450, gz=True)
    _c4_file(raw / "c4-fr.tfrecord-00000-of-00001.json", 50)
    dm = connected(PairDataModule({"mc4": MC4Pairs(path=str(raw))}, lang_temperature_alpha=0.0, seed=1,
                                  streaming=True), tokenizer, global_batch_size=64)
    assert dm.lang_sizes("mc4") == {"de": 450, "fr": 50}
    assert dm.lang_weights() == {"mc4": {"de": 1.0, "fr": 1.0}}
    run(dm, 30)
    langs = dm.realised_mixture()["mc4"]
    assert set(langs) == {"de", "fr"} and abs(langs["fr"] / 1920 - 0.5) < 0.045  # uniform, not 10%
    # beside a one-language source whose files carry no language (Reddit: English)
    from me5.data.sources import RedditPairs

    reddit = RedditPairs(path=str(Path(__file__).parent / "fixtures" / "raw" / "stage1" / "reddit"))
    mixed = PairDataModule({"mc4": MC4Pairs(path=str(raw)), "reddit": reddit}, weights={"mc4": 1, "reddit": 1},
                           lang_temperature_alpha=0.5, streaming=True)
    mixed = connected(mixed, tokenizer, global_batch_size=16)
    assert mixed.lang_weights()["reddit"] == {"en": pytest.approx(5**0.5)}  # 5 lines, alpha 0.5
    run(mixed, 4)
    assert set(mixed.realised_mixture()["reddit"]) == {"en"}


def test_language_temperature_over_raw_files_checks_each_record(tmp_path, tokenizer):
    from me5.data.sources import MC4Pairs

    raw = tmp_path / "multilingual"
    raw.mkdir()
    _c4_file(raw / "c4-de.tfrecord-00000-of-00001.json", 40)
    bad = _c4_file(raw / "c4-fr.tfrecord-00000-of-00001.json", 40, lang_field="it")  # records say otherwise
    dm = connected(PairDataModule({"mc4": MC4Pairs(path=str(raw))}, lang_temperature_alpha=0.0, seed=1,
                                  streaming=True), tokenizer, global_batch_size=16)
    with pytest.raises(DataError, match="'it' is not 'fr'") as info:
        run(dm, 20)
    assert info.value.file == str(bad) and info.value.field == "lang"
    # files whose names give no language: a clear error up front
    other = tmp_path / "other"
    other.mkdir()
    _c4_file(other / "pages.jsonl", 10)
    with pytest.raises(ConfigError, match="published name"):
        connected(PairDataModule({"mc4": MC4Pairs(path=str(other))}, lang_temperature_alpha=0.0, streaming=True),
                  tokenizer)
