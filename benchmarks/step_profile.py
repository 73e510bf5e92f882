"""Where a GradCache step's time goes: host syncs, ops per chunk and a profiled step (``benchmarks.train_step``).

Two instruments for issue 19 (our 32k step at 0.70x sentence-transformers on an H200):

- :func:`host_cost`: counts, on any device, the aten ops a step dispatches and the ops among them that make the
  host wait for a CUDA device (:data:`SYNC_OPS`, plus ``Tensor.tolist``/``numpy``), with a
  ``TorchDispatchMode``. Run at two chunk counts, it splits both into a cost per chunk and a fixed cost per step
  (:func:`host_cost_rows`), so a sync that creeps into the chunk loop shows on a CPU, without a GPU.
- :func:`profile_step`: one steady-state step under ``torch.profiler``: wall time, device busy time, host time
  spent waiting in syncs, syncs counted from the CUDA runtime calls (and from ``set_sync_debug_mode``),
  allocator deltas, the top kernels, and the number and cost of the chunks from their ``record_function``
  ranges (:data:`CHUNK_RANGES`; sentence-transformers' mini-batches are labelled by :func:`label_st_chunks`).
  On a CPU the device columns are empty and the top ops are by self CPU time.

No Hydra, no W&B; the CLI is ``python -m benchmarks.train_step --profile`` / ``--host-cost``.
"""

from __future__ import annotations

import bisect
import collections
import contextlib
import functools
import gzip
import inspect
import json
import re
import shutil
import statistics
import time
import traceback
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

# ---------------------------------------------------------------------------------------------- sync-forcing ops
#: aten ops whose CUDA kernels make the host wait for the device: a scalar read (``.item()``, ``int(t)``,
#: ``bool(t)``, ``if t:``), an output whose size depends on the data (``nonzero``, ``masked_select``, ``unique``,
#: ``repeat_interleave`` without ``output_size``, ``bincount``), or a bool result (``equal``). Boolean-mask
#: indexing (``t[mask]``, ``t[mask] = v``) calls ``nonzero`` inside the kernel, below the dispatch mode, so
#: :class:`SyncCounter` recognises it by its bool index.
SYNC_OPS = frozenset({
    "_local_scalar_dense", "is_nonzero", "nonzero", "masked_select", "equal", "_unique", "_unique2", "unique_dim",
    "unique_consecutive", "unique_dim_consecutive", "bincount",
})
_INDEX_OPS = frozenset({"index", "index_put", "index_put_", "_index_put_impl_"})
#: reads of a tensor's values by the host that dispatch no aten op on a CPU tensor (on CUDA: a D2H copy + sync)
_HOST_READS = ("tolist", "numpy")
#: ``record_function`` ranges that label one chunk of a GradCache step: (no-grad forward, re-forward + backward)
CHUNK_RANGES = {
    "me5": ("me5.gradcache.forward_chunk", "me5.gradcache.backward_chunk"),
    "st": ("st.forward_chunk", "st.backward_chunk"),
}
STEP_RANGE = "bench.step"
#: the bench's own wait for the device at the end of the profiled step (its syncs are not the step's)
FINAL_SYNC_RANGE = "bench.final_sync"
#: CUDA runtime/driver calls that block the host until the device (or a stream) is done
SYNC_RUNTIME_CALLS = frozenset({
    "cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize", "cudaMemcpy", "cudaMemcpy2D",
    "cuStreamSynchronize", "cuCtxSynchronize", "cuEventSynchronize", "cuMemcpyDtoH_v2",
})


def _call_site() -> str:
    """``file:line function`` of the innermost frame outside torch and this module (who asked for the sync)."""
    for frame in reversed(traceback.extract_stack()[:-2]):
        path = frame.filename.replace("\\", "/")
        if "/torch/" in path or path.endswith("/benchmarks/step_profile.py") or "/contextlib.py" in path:
            continue
        return f"{'/'.join(path.split('/')[-2:])}:{frame.lineno} {frame.name}"
    return "?"


class SyncCounter(TorchDispatchMode):
    """Counts the aten ops dispatched inside ``with SyncCounter() as c:`` and the sync-forcing ones among them.

    ``c.ops``: all ops; ``c.syncs``: Counter by op name (``index[bool]`` for boolean-mask indexing,
    ``Tensor.tolist``/``Tensor.numpy`` for host reads, which a CPU tensor serves without dispatching an op);
    ``c.sites``: Counter of ``"op <- file:line function"`` (where the sync was asked for). Backward ops are
    seen too (the autograd engine carries the mode). Every ``tolist``/``numpy`` counts as a device read: in the
    benchmark every tensor a step receives lives on the device.
    """

    def __init__(self):
        super().__init__()
        self.ops = 0
        self.syncs: collections.Counter[str] = collections.Counter()
        self.sites: collections.Counter[str] = collections.Counter()
        self._patched: dict[str, Callable] = {}

    @property
    def n_syncs(self) -> int:
        return sum(self.syncs.values())

    def _record(self, name: str) -> None:
        self.syncs[name] += 1
        self.sites[f"{name} <- {_call_site()}"] += 1

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops += 1
        name = func.overloadpacket.__name__
        if name in SYNC_OPS:
            self._record(name)
        elif name in _INDEX_OPS and len(args) > 1 and isinstance(args[1], (list, tuple)):
            if any(torch.is_tensor(t) and t.dtype in (torch.bool, torch.uint8) for t in args[1]):
                self._record(f"{name}[bool]")
        return func(*args, **(kwargs or {}))

    def __enter__(self):
        counter = self

        def reader(method: str, original: Callable):
            @functools.wraps(original)
            def read(tensor, *a, **k):
                counter._record(f"Tensor.{method}")
                return original(tensor, *a, **k)

            return read

        for method in _HOST_READS:
            original = getattr(torch.Tensor, method)
            self._patched[method] = original
            setattr(torch.Tensor, method, reader(method, original))
        return super().__enter__()

    def __exit__(self, *exc):
        try:
            return super().__exit__(*exc)
        finally:
            for method, original in self._patched.items():
                setattr(torch.Tensor, method, original)
            self._patched.clear()


# ---------------------------------------------------------------------------------------------- host cost
@dataclass
class HostCost:
    """One step's dispatched ops and sync-forcing ops, and the encoder calls it made."""

    ops: int
    syncs: dict[str, int]
    sites: dict[str, int]
    encoder_calls: int

    @property
    def n_syncs(self) -> int:
        return sum(self.syncs.values())


@dataclass
class Calls:
    """The calls of a module inside :func:`count_calls`: how many, and the (rows, width) of each call's padded
    ``input_ids`` (None where the input is not a padded matrix, e.g. a packed stream)."""

    n: int = 0
    shapes: list[tuple[int, int] | None] = field(default_factory=list)


def _padded_shape(args: tuple) -> tuple[int, int] | None:
    first = args[0] if args else None
    if isinstance(first, dict):  # sentence-transformers: model({"input_ids": ..., "attention_mask": ...})
        first = first.get("input_ids")
    if torch.is_tensor(first) and first.dim() == 2:
        return int(first.shape[0]), int(first.shape[1])
    return None


@contextlib.contextmanager
def count_calls(module: torch.nn.Module):
    """``with count_calls(m) as calls:`` -> ``calls.n`` calls of ``m(...)`` were made inside, with inputs of
    ``calls.shapes``: what a method actually computed, whatever its library version cuts."""
    calls = Calls()

    def hook(_module, args):
        calls.n += 1
        calls.shapes.append(_padded_shape(args))

    handle = module.register_forward_pre_hook(hook)
    try:
        yield calls
    finally:
        handle.remove()


def host_cost(step: Callable[[dict], object], batch: dict, encoder: torch.nn.Module) -> HostCost:
    """Run ``step(batch)`` once under :class:`SyncCounter`; ``encoder`` is the module whose calls are chunks."""
    with count_calls(encoder) as calls, SyncCounter() as counter:
        step(batch)
    return HostCost(counter.ops, dict(counter.syncs), dict(counter.sites), calls.n)


def per_chunk(a: HostCost, b: HostCost, *, calls_per_chunk: int = 2) -> dict:
    """Split two runs of the same step at different chunk counts into a per-chunk and a fixed (per-step) part.

    A GradCache chunk is ``calls_per_chunk`` encoder calls (the no-grad forward and the re-forward; its backward
    comes with the second). The split is a straight line through the two runs: ops = fixed + per_chunk x chunks.
    """
    ca, cb = a.encoder_calls / calls_per_chunk, b.encoder_calls / calls_per_chunk
    if cb == ca:
        raise ValueError(f"both runs made {a.encoder_calls} encoder calls; use two different chunk sizes")
    ops_chunk = (b.ops - a.ops) / (cb - ca)
    syncs_chunk = (b.n_syncs - a.n_syncs) / (cb - ca)
    return {"chunks": (ca, cb), "ops": (a.ops, b.ops), "syncs": (a.n_syncs, b.n_syncs),
            "ops_per_chunk": ops_chunk, "ops_fixed": a.ops - ops_chunk * ca,
            "syncs_per_chunk": syncs_chunk, "syncs_fixed": a.n_syncs - syncs_chunk * ca}


def format_host_cost(rows: Sequence[dict], *, title: str = "") -> str:
    """Markdown table of :func:`per_chunk` rows (each with ``method``, ``chunking`` and ``sync_sites``)."""
    lines = [title, ""] if title else []
    lines += [
        "| method | chunking | chunks/step (a → b) | aten ops/step (a → b) | ops per chunk | ops fixed/step | "
        "syncs/step (a → b) | syncs per chunk | syncs fixed/step | sync ops in run b (op <- call site × count) |",
        "|---|---|---|---|---:|---:|---|---:|---:|---|",
    ]
    for r in rows:
        if r.get("error"):
            lines.append(f"| {r['method']} | {r.get('chunking', '')} | {r['error']} | | | | | | | |")
            continue
        ca, cb = r["chunks"]
        sites = "; ".join(f"`{k}` × {v}" for k, v in sorted(r["sync_sites"].items(), key=lambda kv: -kv[1])) or "none"
        lines.append(
            f"| {r['method']} | {r['chunking']} | {ca:g} → {cb:g} | {r['ops'][0]:,} → {r['ops'][1]:,} | "
            f"{r['ops_per_chunk']:,.0f} | {r['ops_fixed']:,.0f} | {r['syncs'][0]} → {r['syncs'][1]} | "
            f"{r['syncs_per_chunk']:g} | {r['syncs_fixed']:g} | {sites} |")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------- ST labels
def label_st_chunks(loss_fn) -> None:
    """Label sentence-transformers' GradCache mini-batches with :data:`CHUNK_RANGES` ``["st"]`` ranges.

    Patches the loss *instance* (both of its passes, and its backward hook, reach the mini-batches through it):
    a range opens in ``embed_minibatch`` before a mini-batch's forward and closes when the next mini-batch
    starts or the mini-batch iterator ends. In the backward pass it therefore spans the re-forward and the
    surrogate's backward, as ``me5.gradcache.backward_chunk`` does.
    """
    fwd, bwd = CHUNK_RANGES["st"]
    embed, embed_iter = loss_fn.embed_minibatch, loss_fn.embed_minibatch_iter
    signature = inspect.signature(embed)
    state: dict[str, object] = {"range": None}

    def close() -> None:
        if state["range"] is not None:
            state["range"].__exit__(None, None, None)
            state["range"] = None

    @functools.wraps(embed)
    def labelled_embed(*args, **kwargs):
        with_grad = bool(signature.bind(*args, **kwargs).arguments["with_grad"])
        close()
        rf = torch.profiler.record_function(bwd if with_grad else fwd)
        rf.__enter__()
        state["range"] = rf
        return embed(*args, **kwargs)

    @functools.wraps(embed_iter)
    def labelled_iter(*args, **kwargs):
        try:
            yield from embed_iter(*args, **kwargs)
        finally:
            close()

    loss_fn.embed_minibatch = labelled_embed
    loss_fn.embed_minibatch_iter = labelled_iter


# ---------------------------------------------------------------------------------------------- profile analysis
@dataclass
class Ev:
    """A profiler event reduced to what the summary needs (times in µs on the host clock)."""

    name: str
    kind: str  # "op" (CPU op), "range" (record_function), "runtime" (CUDA API call), "device" (kernel/memcpy)
    start: float
    end: float
    device_us: float = 0.0  # "op": the device time of the kernels it launched

    @property
    def dur(self) -> float:
        return self.end - self.start


_RUNTIME_NAME = re.compile(r"^cu(da)?[A-Z]")
_UTILITY_OPS = frozenset({"profiler::_record_function_enter", "profiler::_record_function_enter_new",
                          "profiler::_record_function_exit", "aten::is_leaf", "aten::output_nr", "aten::_version"})
_ALL_RANGES = frozenset({STEP_RANGE, FINAL_SYNC_RANGE, *(n for pair in CHUNK_RANGES.values() for n in pair)})


def events_from_profiler(prof) -> list[Ev]:
    """:class:`Ev` list from a finished ``torch.profiler.profile``."""
    from torch.autograd import DeviceType

    out = []
    for e in prof.events():
        start, end = float(e.time_range.start), float(e.time_range.end)
        activity = str(getattr(e, "activity_type", "") or "")
        if e.device_type != DeviceType.CPU:
            # kernels, copies and memsets; not the device-side copies of the ranges, nor sync markers
            if not (getattr(e, "is_user_annotation", False) or "annotation" in activity or "sync" in activity
                    or e.name in _ALL_RANGES):
                out.append(Ev(e.name, "device", start, end))
        elif getattr(e, "is_user_annotation", False) or activity == "user_annotation":
            out.append(Ev(e.name, "range", start, end))
        elif activity in ("cuda_runtime", "cuda_driver") or _RUNTIME_NAME.match(e.name):
            out.append(Ev(e.name, "runtime", start, end))
        else:
            kernels = sum(float(k.duration) for k in (getattr(e, "kernels", None) or ()))
            out.append(Ev(e.name, "op", start, end, kernels))
    return out


def events_from_kineto(prof) -> list[Ev]:
    """:class:`Ev` list straight from the profiler's raw kineto events, without building torch's
    ``FunctionEvent`` tree: a 32k step records about a million events, which that tree takes a minute to build.
    A kernel's time is credited to the CPU op that launched it (kineto's linked correlation id). Unlike torch's
    event list, an op that re-dispatches to itself (``aten::sum`` calling ``aten::sum``) counts twice."""
    from torch.autograd import DeviceType

    result = prof.profiler.kineto_results
    t0 = result.trace_start_ns()
    out, ops_by_id, device = [], {}, []
    for k in result.events():
        name = k.name()
        if name.startswith("[") or name in _UTILITY_OPS:  # as torch's own event list leaves them out
            continue
        start, end = (k.start_ns() - t0) / 1e3, (k.end_ns() - t0) / 1e3
        activity = str(k.activity_type()) if hasattr(k, "activity_type") else ""
        annotation = bool(k.is_user_annotation()) if hasattr(k, "is_user_annotation") else False
        if k.device_type() != DeviceType.CPU:
            if not (annotation or "annotation" in activity or "sync" in activity or name in _ALL_RANGES):
                ev = Ev(name, "device", start, end)
                out.append(ev)
                device.append((k.linked_correlation_id(), ev.dur))
        elif annotation or activity == "user_annotation":
            out.append(Ev(name, "range", start, end))
        elif activity in ("cuda_runtime", "cuda_driver") or _RUNTIME_NAME.match(name):
            out.append(Ev(name, "runtime", start, end))
        else:
            ev = Ev(name, "op", start, end)
            out.append(ev)
            if k.linked_correlation_id() == 0:  # a frontend op: kernels link to its correlation id
                ops_by_id[k.correlation_id()] = ev
    for corr, dur in device:
        op = ops_by_id.get(corr)
        if op is not None:
            op.device_us += dur
    return out


def _union_us(intervals: Iterable[tuple[float, float]]) -> float:
    total, cur_s, cur_e = 0.0, None, None
    for s, e in sorted(intervals):
        if cur_e is None or s > cur_e:
            if cur_e is not None:
                total += cur_e - cur_s
            cur_s, cur_e = s, e
        else:
            cur_e = max(cur_e, e)
    if cur_e is not None:
        total += cur_e - cur_s
    return total


def _inside(ev: Ev, window: Ev) -> bool:
    return window.start <= ev.start <= window.end


def summarize_events(events: Sequence[Ev], *, chunk_ranges: tuple[str, str], top: int = 15) -> dict:
    """Step figures from :class:`Ev` events: only events that start inside the :data:`STEP_RANGE` range count.

    Device busy time is the union of the kernel/memcpy intervals; host time waiting is the time in
    :data:`SYNC_RUNTIME_CALLS` (the final drain in :data:`FINAL_SYNC_RANGE` included, though it is not counted
    as a sync of the step); a chunk's device time is the time of the kernels launched by ops that started
    inside its range (on any thread: the autograd engine's thread runs the backward while the main thread waits
    in the range).
    """
    steps = [e for e in events if e.kind == "range" and e.name == STEP_RANGE]
    if len(steps) != 1:
        raise ValueError(f"expected one {STEP_RANGE!r} range in the profile, found {len(steps)}")
    step = steps[0]
    device = [e for e in events if e.kind == "device" and step.start <= e.start <= step.end]
    runtime = [e for e in events if e.kind == "runtime" and _inside(e, step)]
    ops = [e for e in events if e.kind == "op" and _inside(e, step)]
    finals = [e for e in events if e.kind == "range" and e.name == FINAL_SYNC_RANGE]
    blocking = [e for e in runtime if e.name in SYNC_RUNTIME_CALLS]
    # the final drain counts as waiting (the host had nothing left to do), not as one of the step's syncs
    syncs = collections.Counter(e.name for e in blocking if not any(_inside(e, f) for f in finals))
    sync_wait_us = sum(e.dur for e in blocking)
    out = {
        "wall_s": step.dur / 1e6,
        "cpu_ops": len(ops),
        "kernels": sum(1 for e in device),
        "device_busy_s": _union_us((e.start, e.end) for e in device) / 1e6 if device else None,
        "syncs": sum(syncs.values()) if runtime else None,
        "syncs_by_call": dict(syncs),
        "sync_wait_s": sync_wait_us / 1e6 if runtime else None,
        "launches": sum(1 for e in runtime if "Launch" in e.name),
    }
    if out["device_busy_s"] is not None:
        out["device_idle_share"] = max(0.0, 1.0 - out["device_busy_s"] / out["wall_s"])
    if out["sync_wait_s"] is not None:
        out["host_busy_s"] = out["wall_s"] - out["sync_wait_s"]
    # chunks: count and cost per pass; ops sorted by start with a running sum of their kernels' device time
    ops.sort(key=lambda e: e.start)
    starts = [o.start for o in ops]
    cum = [0.0]
    for o in ops:
        cum.append(cum[-1] + o.device_us)
    for label, name in zip(("forward", "backward"), chunk_ranges, strict=True):
        ranges = sorted((e for e in events if e.kind == "range" and e.name == name and _inside(e, step)),
                        key=lambda e: e.start)
        out[f"{label}_chunks"] = len(ranges)
        if not ranges:
            continue
        walls = [r.dur / 1e3 for r in ranges]
        out[f"{label}_chunk_wall_ms"] = (statistics.mean(walls), max(walls))
        if device:
            dev = [(cum[bisect.bisect_right(starts, r.end)] - cum[bisect.bisect_left(starts, r.start)]) / 1e3
                   for r in ranges]
            out[f"{label}_chunk_device_ms"] = (statistics.mean(dev), max(dev))
    # top kernels by device time, or top ops by CPU time on a CPU-only profile
    if device:
        agg: dict[str, list[float]] = collections.defaultdict(lambda: [0, 0.0])
        for e in device:
            agg[e.name][0] += 1
            agg[e.name][1] += e.dur
        total = sum(v[1] for v in agg.values()) or 1.0
        out["top"] = [{"name": n, "calls": int(c), "s": t / 1e6, "share": t / total}
                      for n, (c, t) in sorted(agg.items(), key=lambda kv: -kv[1][1])[:top]]
        out["top_kind"] = "kernels by device time"
    return out


def top_cpu_ops(prof, *, top: int = 15) -> list[dict]:
    """The ops with the most self CPU time (the CPU-only stand-in for the top kernels)."""
    rows = sorted((a for a in prof.key_averages() if a.key not in _ALL_RANGES), key=lambda a: -a.self_cpu_time_total)
    total = sum(a.self_cpu_time_total for a in rows) or 1.0
    return [{"name": a.key, "calls": int(a.count), "s": a.self_cpu_time_total / 1e6,
             "share": a.self_cpu_time_total / total} for a in rows[:top]]


# ---------------------------------------------------------------------------------------------- one profiled step
@dataclass
class ProfileResult:
    method: str
    figures: dict
    trace: str | None = None
    notes: list[str] = field(default_factory=list)


_ALLOC_KEYS = ("num_alloc_retries", "num_device_alloc", "num_device_free", "num_ooms")


def profile_step(method: str, run: Callable[[], object], *, device: torch.device, chunk_ranges: tuple[str, str],
                 trace_path: Path | None = None, top: int = 15) -> ProfileResult:
    """Profile one call of ``run`` (a steady-state step: warm it up first; it need not wait for the device, the
    profile does at the end) and summarise it.

    On CUDA: kernels and runtime calls are recorded, ``torch.cuda.set_sync_debug_mode("warn")`` counts the
    syncs torch itself reports, and the allocator's counters are read before and after. ``trace_path``: a
    chrome trace of the step (``.json.gz`` is compressed).
    """
    from torch.profiler import ProfilerActivity, profile, record_function

    cuda = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    before = {}
    if cuda:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_stats(device)
    sync_warnings, wall = 0, [0.0]
    with profile(activities=activities) as prof:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            old_mode = torch.cuda.get_sync_debug_mode() if cuda else 0
            if cuda:
                torch.cuda.set_sync_debug_mode("warn")
            try:
                with record_function(STEP_RANGE):
                    t0 = time.perf_counter()
                    run()
                    with record_function(FINAL_SYNC_RANGE):
                        if cuda:
                            torch.cuda.synchronize(device)
                    wall[0] = time.perf_counter() - t0
            finally:
                if cuda:
                    torch.cuda.set_sync_debug_mode(old_mode)
        sync_warnings = sum(1 for w in caught if "synchroniz" in str(w.message).lower())
    t_post = time.perf_counter()
    try:
        events = events_from_kineto(prof)
    except AttributeError:  # a torch without the raw results: its (slower) FunctionEvents
        events = events_from_profiler(prof)
    figures = summarize_events(events, chunk_ranges=chunk_ranges, top=top)
    figures["wall_timer_s"] = wall[0]
    if "top" not in figures:
        figures["top"] = top_cpu_ops(prof, top=top)
        figures["top_kind"] = "ops by self CPU time"
    if cuda:
        after = torch.cuda.memory_stats(device)
        figures["sync_warnings"] = sync_warnings
        figures["allocator"] = {k: int(after.get(k, 0)) - int(before.get(k, 0)) for k in _ALLOC_KEYS}
        figures["peak_allocated_gib"] = after.get("allocated_bytes.all.peak", 0) / 2**30
        figures["peak_reserved_gib"] = after.get("reserved_bytes.all.peak", 0) / 2**30
    result = ProfileResult(method, figures)
    if trace_path is not None:
        result.trace = str(export_trace(prof, trace_path))
    figures["profiler_post_s"] = time.perf_counter() - t_post  # the cost of looking: summary and trace
    return result


def export_trace(prof, path: Path) -> Path:
    """The chrome trace of ``prof`` at ``path``; a ``.gz`` name is compressed at level 1 (a 32k step's trace is
    hundreds of MB of JSON: the default level would take longer than the step)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix != ".gz":
        prof.export_chrome_trace(str(path))
        return path
    raw = path.with_suffix("")
    prof.export_chrome_trace(str(raw))
    try:
        with open(raw, "rb") as src, gzip.open(path, "wb", compresslevel=1) as dst:
            shutil.copyfileobj(src, dst, 1 << 24)
    finally:
        raw.unlink(missing_ok=True)
    return path


# ---------------------------------------------------------------------------------------------- profile report
def _ms(pair) -> str:
    return "-" if pair is None else f"{pair[0]:,.1f} / {pair[1]:,.1f}"


def _s(v, fmt="{:.3f}") -> str:
    return "-" if v is None else fmt.format(v)


def format_profile(result: ProfileResult, *, header: str) -> str:
    """A markdown section: the step's figures, then its top kernels (or CPU ops)."""
    f = result.figures
    rows = [
        ("wall s (profiled step, profiler on)", _s(f["wall_s"])),
        ("device busy s (union of kernels and copies)",
         "-" if f.get("device_busy_s") is None else f"{f['device_busy_s']:.3f} (device idle {f['device_idle_share']:.0%} of wall)"),
        ("host waiting in syncs s / host busy s", "-" if f.get("sync_wait_s") is None
         else f"{f['sync_wait_s']:.3f} / {f['host_busy_s']:.3f}"),
        ("host-device syncs (blocking CUDA calls)", "-" if f.get("syncs") is None
         else f"{f['syncs']} ({', '.join(f'{k} {v}' for k, v in sorted(f['syncs_by_call'].items())) or 'none'})"),
        ("syncs reported by set_sync_debug_mode", _s(f.get("sync_warnings"), "{}")),
        ("CPU ops / kernel launches / device events", f"{f['cpu_ops']:,} / {f['launches']:,} / {f['kernels']:,}"),
        ("allocator Δ: alloc retries / cudaMalloc / cudaFree / OOMs",
         "-" if "allocator" not in f else " / ".join(str(f["allocator"][k]) for k in _ALLOC_KEYS)),
        ("peak allocated / reserved GiB", "-" if "peak_allocated_gib" not in f
         else f"{f['peak_allocated_gib']:.1f} / {f['peak_reserved_gib']:.1f}"),
        ("chunks: forward / backward", f"{f.get('forward_chunks', 0)} / {f.get('backward_chunks', 0)}"),
        ("forward chunk wall ms (mean / max)", _ms(f.get("forward_chunk_wall_ms"))),
        ("forward chunk device ms (mean / max)", _ms(f.get("forward_chunk_device_ms"))),
        ("backward chunk wall ms (mean / max)", _ms(f.get("backward_chunk_wall_ms"))),
        ("backward chunk device ms (mean / max)", _ms(f.get("backward_chunk_device_ms"))),
    ]
    lines = [header, "", "| figure | value |", "|---|---:|"]
    lines += [f"| {k} | {v} |" for k, v in rows]
    if result.trace:
        lines += ["", f"trace: `{Path(result.trace).name}`"]
    lines += ["", f"Top {len(f['top'])} {f['top_kind']}:", "", "| # | name | calls | s | share |", "|---:|---|---:|---:|---:|"]
    for i, t in enumerate(f["top"], 1):
        name = t["name"] if len(t["name"]) <= 100 else t["name"][:97] + "..."
        lines.append(f"| {i} | `{name.replace('|', '/')}` | {t['calls']:,} | {t['s']:.3f} | {t['share']:.1%} |")
    lines += result.notes
    return "\n".join(lines)


def format_profile_summary(results: Sequence[ProfileResult]) -> str:
    """One row per profiled method, for comparing them at a glance."""
    lines = ["| method | wall s | device busy s | device idle | syncs | sync wait s | chunks fwd/bwd | "
             "fwd chunk ms wall/device | bwd chunk ms wall/device | alloc retries | cudaMalloc | peak GiB |",
             "|---|---:|---:|---:|---:|---:|---|---|---|---:|---:|---:|"]
    def pair(f: dict, label: str) -> str:
        w, d = f.get(f"{label}_chunk_wall_ms"), f.get(f"{label}_chunk_device_ms")
        return f"{'-' if w is None else f'{w[0]:,.1f}'} / {'-' if d is None else f'{d[0]:,.1f}'}"

    for r in results:
        f = r.figures

        alloc = f.get("allocator", {})
        lines.append(
            f"| {r.method} | {f['wall_s']:.3f} | {_s(f.get('device_busy_s'))} | "
            f"{_s(f.get('device_idle_share'), '{:.0%}')} | {_s(f.get('syncs'), '{}')} | {_s(f.get('sync_wait_s'))} | "
            f"{f.get('forward_chunks', 0)}/{f.get('backward_chunks', 0)} | {pair(f, 'forward')} | {pair(f, 'backward')} | "
            f"{alloc.get('num_alloc_retries', '-')} | {alloc.get('num_device_alloc', '-')} | "
            f"{_s(f.get('peak_allocated_gib'), '{:.1f}')} |")
    return "\n".join(lines)


def profile_json(result: ProfileResult) -> str:
    return json.dumps({"method": result.method, "trace": result.trace, **result.figures})
