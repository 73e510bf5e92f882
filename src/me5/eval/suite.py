"""Evaluation orchestration: every evaluator of a run on the encoder's device, split over the ranks of a job.

A retrieval corpus encoded under ``work_dir`` is read, encoded and searched in parts, one per rank; the
evaluators that cannot be split (MTEB, bitext mining, a corpus in memory) run on rank 0 alone while the others
wait on a separate gloo group with a long timeout (:func:`on_rank0`), so no rank times out in the next stage's
first collective. Used by the training run loop (:mod:`me5.training.run`) and ``python -m me5.evaluate``.
"""

from __future__ import annotations

from collections.abc import Mapping

RANK0_WAIT_S = 48 * 3600  # how long the other ranks wait for rank 0's evaluators (MTEB's 56 tasks: hours)


def evaluate_all(evaluators: Mapping, encoder, tokenizer, *, wait_s: float = RANK0_WAIT_S) -> dict[str, float]:
    """Run every evaluator on the encoder's device; merged flat metrics, the same on every rank.

    In a distributed job an evaluator runs on every rank unless its ``shares_ranks`` is false: a retrieval corpus
    encoded under ``work_dir`` (each rank reads, encodes and searches its part) runs everywhere; MTEB, bitext
    mining and a retrieval corpus in memory run on rank 0 alone (:func:`on_rank0`), and the others receive their
    metrics. An evaluator without the attribute runs on every rank (it may use collectives, as before). An
    FSDP-sharded encoder runs collectives in its forward, so then every evaluator runs on every rank.
    """
    from me5.distributed import world_info
    from me5.embed.encode import is_fsdp_sharded

    device = next(encoder.parameters()).device
    _, world = world_info()
    everyone = world == 1 or is_fsdp_sharded(encoder)
    shared = [k for k, ev in evaluators.items() if everyone or getattr(ev, "shares_ranks", True)]
    alone = [k for k in evaluators if k not in shared]
    by_name = {k: evaluators[k].evaluate(encoder, tokenizer, device=device, show_progress=True) for k in shared}
    if alone:
        by_name.update(on_rank0(lambda: {k: evaluators[k].evaluate(encoder, tokenizer, device=device,
                                                                   show_progress=True) for k in alone},
                                wait_s=wait_s))
    out: dict[str, float] = {}
    for k in evaluators:  # the config's order
        out.update(by_name[k])
    return out


def on_rank0(fn, *, wait_s: float = RANK0_WAIT_S):
    """``fn()`` on rank 0 of the default process group, its result on every rank (``fn()`` alone in one process).

    The other ranks wait in a broadcast on a gloo group made for this call, whose timeout is ``wait_s``: not in
    a collective of the training group, whose timeout (Lightning's 30 min) an hours-long MTEB pass would exceed,
    nor in the next stage's first collective. An error on rank 0 reaches the others as a ``RuntimeError`` (after
    rank 0's own), so no rank is left waiting for a result that will not come.
    """
    from datetime import timedelta

    import torch.distributed as dist

    from me5.distributed import world_info

    rank, world = world_info()
    if world == 1:
        return fn()
    group = dist.new_group(backend="gloo", timeout=timedelta(seconds=wait_s))
    try:
        box: list = [None]
        error = None
        if rank == 0:
            try:
                box = [(True, fn())]
            except Exception as err:  # sent to the others, then raised here
                error, box = err, [(False, f"{type(err).__name__}: {err}")]
        dist.broadcast_object_list(box, src=0, group=group)
        if error is not None:
            raise error
        ok, value = box[0]
        if not ok:
            raise RuntimeError(f"rank 0's evaluation failed: {value}")
        return value
    finally:
        dist.destroy_process_group(group)
