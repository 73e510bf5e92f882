"""``python -m me5.app.report [RUN_OR_SWEEP_DIR] [--wandb]`` (``make report``): the report of one run or one sweep.

A run folder gets ``report.md`` (what ran, the final losses, the evaluation tables) and ``report.png`` (loss
curves per stage, macro scores per row); a sweep folder (Hydra's multirun folder) gets ``report.md`` with one
table across its jobs, the swept parameters as columns, and ``report.png`` (every job's loss curve). Without a
folder: the newest run or sweep under ``$ME5_LOG_DIR``, else under ``outputs/`` (see :func:`me5.report.find_target`).
``--wandb`` also logs the table (and the figure) to W&B, in the sweep's W&B group; online with credentials,
offline without, ``WANDB_MODE`` wins (as the training loggers).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from me5 import report


def _wandb_settings(target: Path, sweep: bool) -> dict:
    """project / entity / group of the runs being reported, read from a job's ``.hydra/config.yaml`` (the W&B
    group of a sweep is ``<group>@<sweep folder name>``, as :func:`me5.app.train.sweep_group` makes it)."""
    from omegaconf import OmegaConf

    job = (report.sweep_jobs(target) or [target])[0] if sweep else target
    out: dict = {"project": "me5", "entity": None, "group": None}
    cfg_file = job / ".hydra" / "config.yaml"
    if cfg_file.is_file():
        cfg = OmegaConf.load(cfg_file)
        for key in ("project", "entity"):
            try:
                out[key] = OmegaConf.select(cfg, f"logger.{key}", default=out[key])
            except Exception:  # an interpolation that only resolves inside the job (e.g. ${hydra:...})
                pass
        try:
            base = OmegaConf.select(cfg, "logger.group", default=None) or OmegaConf.select(cfg, "run_name")
        except Exception:
            base = None
        if base:
            out["group"] = f"{base}@{target.name}" if sweep else str(base)
    return out


def log_to_wandb(target: Path, out_dir: Path, *, project: str | None = None) -> str:
    """Log the report's table (and figure) as one W&B run of ``job_type=report``; returns the run's folder."""
    import wandb

    from me5.app.loggers import resolve_wandb_mode

    sweep = report.is_sweep(target)
    settings = _wandb_settings(target, sweep)
    run = wandb.init(project=project or settings["project"], entity=settings["entity"], group=settings["group"],
                     job_type="report", name=f"report-{target.name}", dir=str(out_dir), mode=resolve_wandb_mode(),
                     config={"report_of": str(target), "kind": "sweep" if sweep else "run"})
    try:
        frame = report.summary(target).reset_index()
        payload = {("sweep" if sweep else "results"): wandb.Table(dataframe=frame)}
        png = out_dir / report.LOSS_PNG
        if png.is_file():
            payload["loss_curves"] = wandb.Image(str(png))
        run.log(payload)
        return str(Path(run.dir).parent)
    finally:
        run.finish()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m me5.app.report", description=__doc__.split("\n\n")[0])
    parser.add_argument("folder", nargs="?", help="a run or sweep folder, or a folder holding them (default: "
                        "$ME5_LOG_DIR, else outputs/); the newest run or sweep inside is reported")
    parser.add_argument("--out", help="where report.md and report.png go (default: the reported folder)")
    parser.add_argument("--wandb", action="store_true", help="also log the table (and figure) to W&B")
    parser.add_argument("--wandb-project", help="W&B project (default: the runs' logger.project, else me5)")
    args = parser.parse_args(argv)

    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    try:
        target, why = report.find_target(args.folder)
    except FileNotFoundError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"report of {target}: {why}")
    path = report.write_report(target, args.out)
    print(path.read_text())
    print(f"wrote {path}" + (f" and {path.parent / report.LOSS_PNG}" if (path.parent / report.LOSS_PNG).is_file()
                             else ""))
    if args.wandb:
        print(f"W&B: logged to {log_to_wandb(target, path.parent, project=args.wandb_project)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
