"""What a run tells its user: log handlers, the epoch table, metrics.csv/json and the learning
curve, the final table and the learned-electrostatics summary."""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Dict, Iterator, List, Mapping, Optional

import torch

from . import plots
from .checkpoint import atomic_write_text
from .metrics import format_table

log = logging.getLogger("polarmace.training")

__all__ = ["training_log", "EPOCH_COLUMNS", "epoch_line", "write_history", "write_config",
           "log_start", "log_epoch", "report_final", "report_electrical"]


@contextmanager
def training_log(run_dir: Path, is_main: bool) -> Iterator[None]:
    """stdout and ``run_dir/train.log`` handlers on the training logger (rank 0 only) for the
    length of a run. The logger's level and propagation are put back afterwards, so that a run
    inside a notebook or a test session leaves the caller's logging as it found it."""
    saved_level, saved_propagate = log.level, log.propagate
    added: List[logging.Handler] = []
    log.setLevel(logging.INFO)
    log.propagate = False  # the run's own handlers print each line once, not again via the root
    try:
        if is_main:
            fmt = logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%H:%M:%S")
            try:
                run_dir.mkdir(parents=True, exist_ok=True)
                file_handler = logging.FileHandler(run_dir / "train.log")
            except OSError as exc:
                from polarmace.errors import output_error

                raise output_error(run_dir / "train.log", exc) from exc
            for h in (logging.StreamHandler(sys.stdout), file_handler):
                h.setFormatter(fmt)
                log.addHandler(h)
                added.append(h)
        yield
    finally:
        for h in added:
            log.removeHandler(h)
            h.close()
        log.setLevel(saved_level)
        log.propagate = saved_propagate


EPOCH_COLUMNS = ("epoch", "stage", "train_loss", "valid_loss", "valid_E_rmse", "valid_E_mae",
                 "valid_F_rmse", "valid_F_mae", "lr", "time_s")


def _cell(col: str, v: Any) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "-"
    if col in ("epoch", "stage"):
        return str(int(v))
    if col == "lr":
        return f"{v:.2e}"
    if col == "time_s":
        return f"{v:.1f}s"
    return f"{v:.4g}"


def epoch_line(row: Mapping[str, Any], header: bool = False) -> str:
    """One line of the epoch table (E in meV/atom, F in meV/Å), or its header."""
    names = ("epoch", "st", "loss(train)", "loss(valid)", "E_rmse", "E_mae", "F_rmse", "F_mae", "lr", "time")
    widths = (5, 2, 11, 11, 9, 9, 9, 9, 9, 7)
    if header:
        return " ".join(n.rjust(w) for n, w in zip(names, widths)) + \
            "   (E meV/atom, F meV/Å, valid set, EMA weights when enabled)"
    return " ".join(_cell(col, row.get(col)).rjust(w) for col, w in zip(EPOCH_COLUMNS, widths))


def write_history(history: List[Dict[str, Any]], run_dir: Path, make_plot: bool) -> None:
    """metrics.csv and metrics.json (one row per epoch) and, with `make_plot`, the learning curve."""
    cols: List[str] = []
    for row in history:
        for k in row:
            if k not in cols:
                cols.append(k)
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=cols)
    writer.writeheader()
    for row in history:
        writer.writerow(row)
    atomic_write_text(buf.getvalue(), run_dir / "metrics.csv")
    atomic_write_text(json.dumps(history, indent=1), run_dir / "metrics.json")
    if make_plot:
        try:
            plots.learning_curve(history, run_dir / "learning_curve.png")
        except Exception as exc:  # a plot never kills a run
            log.warning("learning curve not drawn: %s", exc)


def write_config(cfg: Mapping[str, Any], run_dir: Path) -> None:
    """The run's resolved config as config.json and config.yaml."""
    import yaml

    atomic_write_text(json.dumps(cfg, indent=1, default=str), run_dir / "config.json")
    atomic_write_text(yaml.safe_dump(json.loads(json.dumps(cfg, default=str)), sort_keys=False),
                      run_dir / "config.yaml")


def log_start(run_dir: Path, latest: Optional[Path], data: Any, stats: Mapping[str, Any], origin: str = "") -> None:
    """The run's first lines: directory, data sizes, and the statistics with `origin`, where
    they come from (e.g. "stored in train.h5 ...", "computed on the 18 training structures")."""
    log.info("run directory %s (%s)", run_dir, "resuming " + latest.name if latest else "new run")
    log.info("data: %d train, %d valid, %d test configurations; elements %s",
             len(data.train), len(data.valid or []), len(data.test or []), stats["elements"])
    log.info("E0s (eV): %s; avg_num_neighbors %.3f; shift %.5g eV/atom; scale %.5g eV/Å%s",
             {k: round(v, 6) for k, v in stats["e0s"].items()}, stats["avg_num_neighbors"],
             stats["shift"], stats["scale"], f"; statistics {origin}" if origin else "")


def log_epoch(row: Mapping[str, Any], improved: bool, header: bool) -> None:
    if header:
        log.info(epoch_line({}, header=True))
    log.info(epoch_line(row) + ("  *" if improved else ""))


def report_final(table: Mapping[str, Mapping[str, float]], which: str, run_dir: Path) -> None:
    """The final table in the log and final_metrics.json."""
    log.info("\n" + format_table(table, title=f"final errors ({which})"))
    atomic_write_text(json.dumps(table, indent=1), run_dir / "final_metrics.json")


def report_electrical(model: torch.nn.Module, data: Any, run_dir: Path, batch_size: int) -> None:
    """Log the learned charges per element (and BEC R² where the set has reference BEC) on the
    test split, else the validation split; also written to electrical.json."""
    from polarmace.training.electrical import electrical_summary, format_electrical

    name, ds = ("test", data.test) if data.test is not None and len(data.test) else ("valid", data.valid)
    if ds is None or not len(ds):
        return
    summary = electrical_summary(model, ds, batch_size=batch_size)
    if summary is None:
        return
    log.info("\n" + format_electrical(summary, title=f"learned electrostatics, {name} split"))
    atomic_write_text(json.dumps(summary, indent=1), run_dir / "electrical.json")
