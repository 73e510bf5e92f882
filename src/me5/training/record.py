"""The results record of a run folder: ``metrics.json`` (every row's metrics, timings, data counts, run metadata),
``results.md`` (the table), and which stages finished (``checkpoints/<stage>/done.json``).

A stage is finished once it trained, exported and was evaluated; a rerun in the same folder skips it and reads
its rows back. Every file is written atomically (:mod:`me5.jsonio`): a kill mid-write leaves the previous one.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from me5.jsonio import read_json, write_json, write_text

DONE = "done.json"  # <run dir>/checkpoints/<stage>/done.json: the stage trained, exported and evaluated


@dataclass
class RunRecord:
    """What a run folder says about the run: ``results`` ``{row: {metric: value}}`` (rows: untrained, pretrain,
    finetune), ``timings`` (seconds), ``data_counts`` ``{stage: {reason: count}}`` and ``meta`` (git, command,
    parameters)."""

    out_dir: Path
    results: dict[str, dict[str, float]] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    data_counts: dict[str, dict[str, int]] = field(default_factory=dict)
    meta: dict = field(default_factory=dict)

    @property
    def metrics_file(self) -> Path:
        return Path(self.out_dir) / "metrics.json"

    @classmethod
    def load(cls, out_dir: Path, *, meta: Mapping | None = None) -> RunRecord:
        """The record of an earlier attempt in ``out_dir`` (empty when there is none); ``meta`` replaces its
        metadata (this attempt's command and git state)."""
        old = read_json(Path(out_dir) / "metrics.json") or {}
        return cls(Path(out_dir), dict(old.get("results", {})), dict(old.get("timings_s", {})),
                   dict(old.get("data_counts", {})), meta if meta is not None else dict(old.get("meta", {})))

    def write(self, *, show: bool = False) -> Path:
        """Write ``metrics.json`` and ``results.md``; with ``show``, print the results table."""
        from me5.eval.retrieval import format_table

        table = format_table(dict(self.results)) if self.results else "(no evaluation configured)"
        payload = {"results": self.results, "timings_s": self.timings, "data_counts": self.data_counts,
                   "meta": self.meta}
        write_json(self.metrics_file, payload, indent=2, end="", default=str)
        write_text(Path(self.out_dir) / "results.md", table + "\n")
        if show:
            print("\n" + table + f"\n\nmetrics: {self.metrics_file}\n", flush=True)
        return self.metrics_file

    def finished_stages(self, stages: Sequence[str]) -> list[str]:
        """The stages of this run folder that completed (their ``done.json`` and export exist)."""
        return [s for s in stages if (self.checkpoint_dir(s) / DONE).is_file() and self.export_dir(s).is_dir()]

    def mark_done(self, stage: str, global_step: int) -> None:
        """Stage ``stage`` is complete: a rerun skips it and reads its results back."""
        write_text(self.checkpoint_dir(stage) / DONE,
                   json.dumps({"global_step": int(global_step), "export": str(self.export_dir(stage))}) + "\n")

    def checkpoint_dir(self, stage: str) -> Path:
        return Path(self.out_dir) / "checkpoints" / stage

    def export_dir(self, stage: str) -> Path:
        return Path(self.out_dir) / "export" / stage

    def write_eval_job(self, stage: str) -> Path:
        """``<run dir>/evaluate_<stage>.sh``: the command that evaluates this stage's export on the run's ``eval``
        group (``bash`` it, ``sbatch`` it, or run it under ``torchrun --nproc-per-node N``)."""
        script = Path(self.out_dir) / f"evaluate_{stage}.sh"
        write_text(script,
                   "#!/usr/bin/env bash\n# evaluates the export of stage " + stage + " on this run's eval group; "
                   "for many GPUs: torchrun --nproc-per-node N -m me5.evaluate ...\n"
                   f"exec {sys.executable} -m me5.evaluate --run {Path(self.out_dir).resolve()} --stage {stage} "
                   "\"$@\"\n")
        script.chmod(0o755)
        return script
