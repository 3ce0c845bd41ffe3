#!/usr/bin/env python
"""Accuracy of the long-range variants on one data set, trained under identical conditions.

Every variant (sr, les, u, uQ, uiq, uiu, uQiqiu) is trained from the same base YAML config:
same trunk, seeds, data split and budget; only ``long_range.variant`` differs (the five
multipole flags are reset so that the preset applies). Each trained model is evaluated on the
held-out test set (``data.test``, or the ``data.test_fraction`` split of the training file) with
the project's evaluation (`polarmace.cli.eval.evaluate_file`) plus the electrical observables:

  energy MAE/RMSE (meV/atom), force MAE/RMSE (meV/Å)                 every variant
  BEC MAE/RMSE (e) and R² after ONE global sign s = ±1, and s         test set with BEC
  acoustic-sum-rule residual  mean_b ‖Σ_i Z*_i − Q_b·I‖_F / N_b (e per atom, model, no sign)
  dipole MAE (e·Å, vector components per structure), raw and with s   test set with dipoles
  polarizability MAE (Å³): α = k_e ∂P/∂E_ext (autograd, the           test set with
    definition of the references) for the response variants            `polarizability`
    (uiq, uiu, uQiqiu; open test sets only); "Σα" = the model output `polarizability` =
    k_e Σ_i α_i (uiu, uQiqiu)

The sign: for neutral structures the energy is even in the latent charges, so their sign is
arbitrary; with a net charge Q the flip that keeps Q is only weakly fixed by training. The flip
applied is that one, q_i → Q/N + s·(q_i − Q/N), i.e.
Z*_i → (Q/N)·I + s·(Z*_i − (Q/N)·I) and P → Q·r̄ + s·(P − Q·r̄) (r̄ = mean position); for
neutral structures this is plain s·Z*, s·P. One s for the whole test set minimises the squared
BEC error (the dipole error when there are no BEC).

    python benchmarks/accuracy.py --config configs/nacl_xtb_cpu.yaml --budget 1800 --jobs 2 \\
        --out runs/accuracy_nacl
    python benchmarks/accuracy.py --config configs/quickstart.yaml --variants sr les --budget 60 \\
        --jobs 2 --out /tmp/acc_smoke

Run it from the repository root (data paths in configs are relative to the working directory).
``--budget S`` sets ``training.max_time`` (wall seconds of training per variant; without
``--epochs`` the epoch count is then unbounded, so the budget alone ends each run, and a
``stage_two.start_fraction`` applies to the budget). Wall-time budgets are only comparable when
the variants run on equally loaded cores. Output in ``--out``: ``runs/<variant>/`` (the
training runs, resumable), ``results/<variant>.json`` (a variant with results is skipped
unless ``--force``), ``results.json`` (all numbers, configs, timings, git commit),
``accuracy.csv`` and ``accuracy.png``.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
VARIANT_ORDER = ("sr", "les", "u", "uQ", "uiq", "uiu", "uQiqiu")
RESPONSE_VARIANTS = ("uiq", "uiu", "uQiqiu")
MULTIPOLE_FLAGS = ("charges", "dipoles", "quadrupoles", "induced_charges", "induced_dipoles")
#: (json key, column title, format) of the printed table
COLUMNS = (
    ("E_mae", "E MAE", "{:.3f}"), ("E_rmse", "E RMSE", "{:.3f}"),
    ("F_mae", "F MAE", "{:.2f}"), ("F_rmse", "F RMSE", "{:.2f}"),
    ("BEC_mae", "BEC MAE", "{:.4f}"), ("BEC_r2", "BEC R2", "{:.4f}"), ("sign", "s", "{:+.0f}"),
    ("ASR", "ASR", "{:.2e}"),
    ("D_mae", "D MAE", "{:.4f}"), ("D_mae_sign", "D MAE(s)", "{:.4f}"),
    ("alpha_mae", "a MAE", "{:.4f}"), ("alpha_sum_mae", "Sa MAE", "{:.4f}"),
    ("epochs", "epochs", "{:d}"), ("train_s", "train s", "{:.0f}"),
)
UNITS_LINE = ("E meV/atom, F meV/Å, BEC e (global sign s, charge-preserving flip), ASR = mean ‖Σ_i Z*_i − Q·I‖/N e/atom, "
              "D e·Å (components; (s): with the flip s), a = k_e ∂P/∂E Å³, Sa = k_e Σα_i Å³")


# ============================================================================== arguments
def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--config", required=True, help="base YAML config (the variants override long_range.variant)")
    p.add_argument("--variants", nargs="+", default=list(VARIANT_ORDER), choices=VARIANT_ORDER)
    p.add_argument("--budget", type=float, default=None, help="training wall time per variant, s (training.max_time)")
    p.add_argument("--epochs", type=int, default=None,
                   help="training.epochs for every variant (equal-epoch mode: set it without --budget)")
    p.add_argument("--until-plateau", type=int, default=None, metavar="PATIENCE",
                   help="train until the validation loss has not improved for PATIENCE epochs "
                        "(training.patience; the plateau scheduler lowers the lr meanwhile); "
                        "--epochs is then the cap (default 2000)")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--jobs", type=int, default=1, help="variants trained in parallel (separate processes)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads per variant (default: CPUs // jobs, at least 1)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="config override for every variant, e.g. --set model.num_interactions=2")
    p.add_argument("--force", action="store_true", help="redo variants that already have results (their runs are deleted)")
    p.add_argument("--eval-batch-size", type=int, default=None, help="default: data.batch_size")
    return p


# =========================================================================== configuration
def variant_config(base: Mapping[str, Any], variant: str, out: Path, budget: Optional[float],
                   epochs: Optional[int], overrides: Sequence[str],
                   patience: Optional[int] = None) -> Dict[str, Any]:
    """Config dict of one variant: base + user overrides + the variant preset + run length + its
    own run directory (as written, not resolved: the trainer tells explicit loss weights from
    defaults by what is written; checked with load_config)."""
    from polarmace.config import apply_overrides, load_config

    items = list(overrides) + [f"long_range.variant={variant}"]
    items += [f"long_range.{flag}=null" for flag in MULTIPOLE_FLAGS]  # the preset decides the flags
    if budget is not None:
        items.append(f"training.max_time={float(budget)}")
        if epochs is None:
            items.append("training.epochs=1000000000")  # only the budget ends the run
    if epochs is not None:
        items.append(f"training.epochs={int(epochs)}")
    if patience is not None:
        items.append(f"training.patience={int(patience)}")
        if epochs is None and budget is None:
            items.append("training.epochs=2000")
    items += [f"output.directory={out / 'runs' / variant}", f"output.name={variant}"]
    raw = apply_overrides(base, items)
    load_config(raw)
    return raw


def git_state() -> Dict[str, Any]:
    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(ROOT), *args], capture_output=True, text=True, check=True).stdout.strip()

    try:
        return {"commit": git("rev-parse", "HEAD"), "dirty": bool(git("status", "--porcelain", "--untracked-files=no"))}
    except (OSError, subprocess.CalledProcessError) as exc:
        return {"commit": None, "error": str(exc)}


# ============================================================================= evaluation
def test_set_path(cfg: Mapping[str, Any], run_dir: Path) -> Path:
    """The test file: data.test, or the trainer's test split (run_dir/splits.json) of the
    training file written to run_dir/test_split.extxyz."""
    from polarmace.data.sources import open_source as read_source

    dcfg = cfg["data"]
    if dcfg.get("test"):
        return Path(dcfg["test"])
    split = json.loads((run_dir / "splits.json").read_text())
    if not split.get("test"):
        raise ValueError("no test set: give data.test or data.test_fraction > 0 in the config")
    path = run_dir / "test_split.extxyz"
    if not path.exists():
        import ase.io

        source = read_source(str(dcfg["train"]), dcfg)
        frames = [source[i].to_atoms(dcfg.get("keys")) for i in split["test"]]
        tmp = path.with_name(path.name + ".tmp.extxyz")
        ase.io.write(str(tmp), frames, format="extxyz")
        os.replace(tmp, path)
    return path


def _ase_label(atoms, key: str) -> Optional[np.ndarray]:
    """A per-structure label from atoms.info or the calculator results ASE moved it to."""
    if key in atoms.info:
        return np.asarray(atoms.info[key], dtype=np.float64)
    results = getattr(atoms.calc, "results", None) if atoms.calc is not None else None
    if results and key in results:
        return np.asarray(results[key], dtype=np.float64)
    return None


def reference_polarizabilities(path: Path, key: str = "polarizability") -> Optional[np.ndarray]:
    """[B,3,3] Å³ from info[key] (9 values) of every frame, or None when any frame lacks it.
    (polarmace.data does not read polarizability labels, so they are read here with ASE.)"""
    import ase.io

    if path.suffix.lower() not in (".xyz", ".extxyz"):
        return None
    out = []
    for atoms in ase.io.iread(str(path), index=":"):
        value = _ase_label(atoms, key)
        if value is None:
            return None
        out.append(value.reshape(3, 3))
    return np.stack(out)


def field_polarizability(model, configs: Sequence, batch_size: int) -> np.ndarray:
    """α = k_e ∂P/∂E_ext per structure [B,3,3] in Å³ by autograd through the model (open
    structures: the engine ignores an external field in periodic cells)."""
    import torch

    from polarmace.electrostatics.observables import field_response
    from polarmace.data.batching import to_device
    from polarmace.data.graph import collate as collate_graph
    from polarmace.units import COULOMB

    dtype = next(model.parameters()).dtype
    r_max = float(model.config["model"]["r_max"])
    model.eval()
    out = []
    with torch.enable_grad():
        for start in range(0, len(configs), batch_size):
            graph = to_device(collate_graph(list(configs[start:start + batch_size]), r_max), torch.device("cpu"), dtype)
            field = torch.zeros_like(graph["external_field"]).requires_grad_(True)
            graph["external_field"] = field
            pred = model(graph, compute_forces=False)
            out.append(field_response(pred["dipole"], field).detach().cpu().numpy() * COULOMB)
    return np.concatenate(out)


def global_sign(pred: np.ndarray, ref: np.ndarray) -> float:
    """s ∈ {+1, −1} minimising Σ|s·pred − ref|² (ties: +1)."""
    return -1.0 if float(np.sum(pred * ref)) < 0 else 1.0


def sign_flipped_bec(z: np.ndarray, total_charge: float, s: float) -> np.ndarray:
    """Z*[N,3,3] of the charges q_i = Q/N + s·(q_i − Q/N): the flip of the latent charges that
    keeps the total charge Q (plain s·Z* for Q = 0; Σ_i Z*_i = Q·I is preserved)."""
    mean = (total_charge / len(z)) * np.eye(3)
    return mean + s * (z - mean)


def sign_flipped_dipole(p: np.ndarray, positions: np.ndarray, total_charge: float, s: float) -> np.ndarray:
    """Dipole (about the origin) of the same charge-preserving flip: Q·r̄ + s·(P − Q·r̄), r̄ the
    mean atomic position."""
    centre = total_charge * positions.mean(0)
    return centre + s * (p - centre)


def bec_metrics(pred: Sequence[np.ndarray], ref: Sequence[np.ndarray],
                total_charge: Optional[Sequence[float]] = None) -> Dict[str, float]:
    """BEC errors after one global sign s (the charge-preserving flip of `sign_flipped_bec`,
    s minimising the squared error): MAE, RMSE (e), R² = 1 − SSE/SST over all components, s."""
    charges = [0.0] * len(pred) if total_charge is None else list(total_charge)
    centred = [(z - (q / len(z)) * np.eye(3), zr - (q / len(z)) * np.eye(3)) for z, zr, q in zip(pred, ref, charges)]
    s = global_sign(np.concatenate([a.reshape(-1) for a, _ in centred]), np.concatenate([b.reshape(-1) for _, b in centred]))
    err = np.concatenate([(sign_flipped_bec(z, q, s) - zr).reshape(-1) for z, zr, q in zip(pred, ref, charges)])
    r = np.concatenate([x.reshape(-1) for x in ref])
    sst = float(np.sum((r - r.mean()) ** 2))
    return {"sign": s, "BEC_mae": float(np.mean(np.abs(err))), "BEC_rmse": float(np.sqrt(np.mean(err ** 2))),
            "BEC_r2": 1.0 - float(np.sum(err ** 2)) / sst if sst > 0 else float("nan")}


def asr_residual(bec: Sequence[np.ndarray], total_charge: Sequence[float]) -> float:
    """mean over structures of ‖Σ_i Z*_i − Q·I‖_F / N (e per atom); bec[b] is [N_b,3,3].

    Not zero for a periodic model whose charges depend on the geometry, and not a bug: the
    phase-form Z* weighs a charge moved by Δs (fractional) with sin(2πΔs)/2π instead of Δs,
    and the uniform neutralising shift makes every charge depend on every atom. A rigid
    translation then appears to move charge. It is 0 for open structures and fixed charges."""
    res = [np.linalg.norm(z.sum(0) - q * np.eye(3)) / len(z) for z, q in zip(bec, total_charge)]
    return float(np.mean(res))


def electrical_metrics(records: Sequence[Mapping[str, Any]], refs: Sequence, alpha_ref: Optional[np.ndarray],
                       alpha_field: Optional[np.ndarray], alpha_sum: Optional[np.ndarray]) -> Dict[str, float]:
    """BEC (global sign), ASR, dipole and polarizability metrics; `records` from evaluate_file
    and `refs` (Configurations of the same test file) in the same order."""
    out: Dict[str, float] = {}
    with_bec = [b for b, c in enumerate(refs) if c.bec is not None and "bec" in records[b]["atoms"]]
    sign = None
    if with_bec:
        out.update(bec_metrics([records[b]["atoms"]["bec"] for b in with_bec], [refs[b].bec for b in with_bec],
                               [refs[b].total_charge for b in with_bec]))
        sign = out["sign"]
        out["ASR"] = asr_residual([records[b]["atoms"]["bec"] for b in with_bec], [refs[b].total_charge for b in with_bec])
        out["ASR_ref"] = asr_residual([refs[b].bec for b in with_bec], [refs[b].total_charge for b in with_bec])
        out["num_bec_structures"] = len(with_bec)
    with_dip = [b for b, c in enumerate(refs) if c.dipole is not None and records[b]["dipole"] is not None]
    if with_dip:
        pred = np.stack([records[b]["dipole"] for b in with_dip])
        ref = np.stack([refs[b].dipole for b in with_dip])
        centres = np.stack([refs[b].total_charge * refs[b].positions.mean(0) for b in with_dip])
        if sign is None:
            sign = global_sign(pred - centres, ref - centres)
            out["D_sign"] = sign
        flipped = np.stack([sign_flipped_dipole(pred[k], refs[b].positions, refs[b].total_charge, sign)
                            for k, b in enumerate(with_dip)])
        out["D_mae"] = float(np.mean(np.abs(pred - ref)))
        out["D_rmse"] = float(np.sqrt(np.mean((pred - ref) ** 2)))
        out["D_mae_sign"] = float(np.mean(np.abs(flipped - ref)))
        out["D_rmse_sign"] = float(np.sqrt(np.mean((flipped - ref) ** 2)))
    if alpha_ref is not None:
        if alpha_field is not None:
            out["alpha_mae"] = float(np.mean(np.abs(alpha_field - alpha_ref)))
            out["alpha_rmse"] = float(np.sqrt(np.mean((alpha_field - alpha_ref) ** 2)))
        if alpha_sum is not None:
            out["alpha_sum_mae"] = float(np.mean(np.abs(alpha_sum - alpha_ref)))
    return out


def evaluate_variant(model_path: Path, test_path: Path, cfg: Mapping[str, Any], batch_size: int) -> Dict[str, Any]:
    """Every metric of one trained model on the test file."""
    import torch

    from polarmace.cli.eval import evaluate_file, load_model
    from polarmace.data.sources import open_source as read_source

    model = load_model(str(model_path))
    with torch.enable_grad():
        metrics, records, _ = evaluate_file(model, str(test_path), batch_size=batch_size)
    out: Dict[str, Any] = {k: metrics[k] for k in ("E_mae", "E_rmse", "F_mae", "F_rmse") if k in metrics}
    if "BEC_mae" in metrics:  # the evaluation's own numbers use a sign per structure
        out["BEC_mae_per_structure_sign"] = metrics["BEC_mae"]
        out["BEC_r2_per_structure_sign"] = metrics.get("BEC_r2")
    dcfg = dict(cfg["data"], required_labels=[])
    refs = read_source(str(test_path), dcfg)
    if len(refs) != len(records):
        raise RuntimeError(f"{test_path}: {len(refs)} reference structures but {len(records)} evaluated")
    alpha_ref = reference_polarizabilities(test_path)
    lr = cfg["long_range"]
    responds = bool(lr.get("induced_charges") or lr.get("induced_dipoles"))
    # the engine applies a uniform external field to open structures only (a periodic cell
    # in a field needs the Berry-phase coupling), so ∂P/∂E_ext is measured on open sets only
    open_set = all(not np.any(c.pbc) for c in refs)
    alpha_field = (field_polarizability(model, refs, batch_size)
                   if (alpha_ref is not None and responds and open_set) else None)
    alpha_sum = None
    if alpha_ref is not None and lr.get("induced_dipoles"):
        alpha_sum = model_polarizability_output(model, refs, batch_size)
    out.update(electrical_metrics(records, refs, alpha_ref, alpha_field, alpha_sum))
    out["num_test_structures"] = len(refs)
    return out


def model_polarizability_output(model, configs: Sequence, batch_size: int) -> np.ndarray:
    """The model's `polarizability` output (k_e Σ_i α_i, Å³) per structure [B,3,3]."""
    import torch

    from polarmace.data.batching import to_device
    from polarmace.data.graph import collate as collate_graph

    dtype = next(model.parameters()).dtype
    r_max = float(model.config["model"]["r_max"])
    out = []
    with torch.no_grad():
        for start in range(0, len(configs), batch_size):
            graph = to_device(collate_graph(list(configs[start:start + batch_size]), r_max), torch.device("cpu"), dtype)
            out.append(model(graph, compute_forces=False)["polarizability"].cpu().numpy())
    return np.concatenate(out)


# ================================================================================ workers
class _Progress:
    """epoch_end callback: a one-line status on the real stdout at most every `every` s."""

    def __init__(self, variant: str, budget: Optional[float], every: float = 15.0):
        self.variant, self.budget, self.every = variant, budget, every
        self.last = 0.0
        self.elapsed = 0.0

    def __call__(self, event: str, state: Dict[str, Any]) -> None:
        if event != "epoch_end":
            return
        row = state["row"]
        self.elapsed += float(row.get("time_s", 0.0))
        now = time.time()
        if now - self.last < self.every:
            return
        self.last = now
        budget = f"/{self.budget:.0f}" if self.budget else ""
        f_rmse = row.get("valid_F_rmse", row.get("train_F_rmse"))
        e_rmse = row.get("valid_E_rmse", row.get("train_E_rmse"))
        text = (f"[{self.variant}] epoch {row['epoch']} stage {row['stage']} {self.elapsed:.0f}{budget} s"
                + (f"  valid E_rmse {e_rmse:.3g} meV/atom F_rmse {f_rmse:.3g} meV/Å" if f_rmse is not None else ""))
        print(text, file=sys.__stdout__, flush=True)


def run_variant(job: Dict[str, Any]) -> Dict[str, Any]:
    """Train (or resume) and evaluate one variant; returns its result dict (also written to
    results/<variant>.json). Runs in a worker process when --jobs > 1."""
    import torch

    from polarmace.training.checkpoint import atomic_write_text
    from polarmace.training.policy import training_time
    from polarmace.training.trainer import train

    from polarmace.config import load_config

    variant, out = job["variant"], Path(job["out"])
    cfg = load_config(job["config"]).to_dict()  # resolved (every default filled)
    torch.set_num_threads(int(job["threads"]))
    run_dir = Path(cfg["output"]["directory"])
    if job["force"] and run_dir.exists():
        shutil.rmtree(run_dir)
    resume = run_dir.exists() and any(run_dir.glob("checkpoint-*.pt"))
    run_dir.mkdir(parents=True, exist_ok=True)
    print(f"[{variant}] {'resuming' if resume else 'training'} in {run_dir} ({job['threads']} thread(s); log "
          f"{run_dir / 'train.log'})", file=sys.__stdout__, flush=True)
    t0 = time.time()
    with open(run_dir / "stdout.log", "a") as sink, contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink):
        result = train(job["config"], resume=resume, callbacks=[_Progress(variant, cfg["training"].get("max_time"))])
        train_wall = time.time() - t0
        t1 = time.time()
        test_path = test_set_path(cfg, run_dir)
        metrics = evaluate_variant(result.model_path, test_path, cfg, job["eval_batch_size"])
        eval_wall = time.time() - t1
    history = result.history
    max_time = cfg["training"].get("max_time")
    stages = [int(r.get("stage", 1)) for r in history]
    trained = training_time(history)
    record = {
        "variant": variant, "status": "ok", "metrics": metrics,
        "timings": {"train_s": trained, "train_wall_s_this_call": train_wall, "eval_s": eval_wall,
                    "epochs": len(history), "threads": int(job["threads"]), "jobs": int(job["jobs"]),
                    "stage_two_from_epoch": (stages.index(2) + 1) if 2 in stages else None,
                    "stopped_by": ("budget" if max_time is not None and trained >= float(max_time) else
                                   "epochs" if len(history) >= int(cfg["training"]["epochs"]) else "patience")},
        "final_valid": (history[-1] if history else {}),
        "run_dir": str(run_dir), "model": str(result.model_path), "test_set": str(test_path),
        "config": cfg,
    }
    summary = run_dir / "electrical.json"  # the trainer's learned-electrostatics summary (test split)
    if summary.exists():
        record["electrical"] = json.loads(summary.read_text())
    path = out / "results" / f"{variant}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(json.dumps(record, indent=1, default=str), path)
    m = metrics
    print(f"[{variant}] done: {len(history)} epochs, {trained:.0f} s training ({record['timings']['stopped_by']}), "
          f"test E_rmse {m.get('E_rmse', float('nan')):.3g} meV/atom, F_rmse {m.get('F_rmse', float('nan')):.3g} meV/Å",
          file=sys.__stdout__, flush=True)
    return record


def _exit_with_parent(parent: int, every: float = 2.0) -> None:
    """In a worker process: exit when `parent` (the accuracy.py that spawned it) is gone, so that
    killing the benchmark stops its trainings too (they resume from their last checkpoint)."""
    import threading

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(every)
        print(f"accuracy.py (pid {parent}) has gone: stopping worker {os.getpid()}", file=sys.__stderr__, flush=True)
        os._exit(143)

    threading.Thread(target=watch, daemon=True, name="exit-with-parent").start()


def _run_guarded(job: Dict[str, Any]) -> Dict[str, Any]:
    """run_variant, but a failing variant is reported instead of stopping the others."""
    import traceback

    if job.get("parent_pid") is not None:
        _exit_with_parent(int(job["parent_pid"]))
    try:
        return run_variant(job)
    except Exception as exc:  # noqa: BLE001 - reported in the table and results.json, not swallowed
        print(f"[{job['variant']}] FAILED: {type(exc).__name__}: {exc}", file=sys.__stdout__, flush=True)
        return {"variant": job["variant"], "status": "failed", "error": f"{type(exc).__name__}: {exc}",
                "traceback": traceback.format_exc(), "config": job["config"]}


# ================================================================================ report
def _value(result: Mapping[str, Any], key: str) -> Optional[float]:
    if result.get("status") != "ok":
        return None
    if key == "epochs":
        return result["timings"]["epochs"]
    if key == "train_s":
        return result["timings"]["train_s"]
    v = result["metrics"].get(key)
    return None if v is None or (isinstance(v, float) and math.isnan(v)) else v


def format_table(results: Mapping[str, Mapping[str, Any]], variants: Sequence[str]) -> str:
    cols = [c for c in COLUMNS if any(_value(results[v], c[0]) is not None for v in variants if v in results)]
    rows = []
    for v in variants:
        if v not in results:
            continue
        r = results[v]
        if r.get("status") != "ok":
            rows.append([v] + ["FAILED"] + [""] * (len(cols) - 1))
            continue
        cells = [v]
        for key, _, fmt in cols:
            x = _value(r, key)
            cells.append("-" if x is None else fmt.format(int(x) if fmt == "{:d}" else x))
        rows.append(cells)
    header = ["variant"] + [title for _, title, _ in cols]
    widths = [max(len(str(row[k])) for row in rows + [header]) for k in range(len(header))]
    lines = ["  ".join(h.rjust(w) for h, w in zip(header, widths))]
    lines += ["  ".join(str(c).rjust(w) for c, w in zip(row, widths)) for row in rows]
    return "\n".join(lines) + "\n(" + UNITS_LINE + ")"


def learned_lines(results: Mapping[str, Mapping[str, Any]], order: Sequence[str]) -> List[str]:
    """Per variant, what it learned per element on the test split: mean latent charge q (e), isotropic
    BEC against the reference (e) and polarizability α (Å³) where the model has them."""
    lines = []
    for v in order:
        summary = results.get(v, {}).get("electrical")
        if not summary:
            continue
        parts = []
        for element, e in summary.get("elements", {}).items():
            text = f"{element} q {e['charge_mean']:+.3f}"
            if "bec_iso_mean_pred" in e:
                text += f", BEC {e['bec_iso_mean_pred']:+.3f}"
                if "bec_iso_mean_ref" in e:
                    text += f" (ref {e['bec_iso_mean_ref']:+.3f})"
            if "alpha_iso_mean" in e:
                text += f", α {e['alpha_iso_mean']:.3g} Å³"
            parts.append(text)
        if parts:
            lines.append(f"{v:>7}: " + "; ".join(parts))
    return lines


def improvements(results: Mapping[str, Mapping[str, Any]]) -> List[str]:
    """Relative RMSE reductions: les vs sr and uQiqiu vs les (positive = better)."""
    lines = []
    for new, old in (("les", "sr"), ("uiq", "les"), ("uiu", "les"), ("uQiqiu", "les")):
        if new not in results or old not in results:
            continue
        parts = []
        for key, name in (("F_rmse", "force RMSE"), ("E_rmse", "energy RMSE")):
            a, b = _value(results[old], key), _value(results[new], key)
            if a and b is not None:
                parts.append(f"{name} {100.0 * (a - b) / a:+.1f}% ({a:.3g} -> {b:.3g})")
        if parts:
            lines.append(f"{new} vs {old}: " + ", ".join(parts) + "  (+ = lower error)")
    return lines


def write_csv(results: Mapping[str, Mapping[str, Any]], variants: Sequence[str], path: Path) -> None:
    keys: List[str] = []
    for v in variants:
        for k in (results.get(v, {}).get("metrics") or {}):
            if k not in keys:
                keys.append(k)
    with open(path, "w", newline="") as handle:
        w = csv.writer(handle)
        w.writerow(["variant", "status"] + keys + ["epochs", "train_s", "stopped_by"])
        for v in variants:
            r = results.get(v)
            if r is None:
                continue
            m, t = r.get("metrics") or {}, r.get("timings") or {}
            w.writerow([v, r.get("status")] + [m.get(k, "") for k in keys]
                       + [t.get("epochs", ""), t.get("train_s", ""), t.get("stopped_by", "")])


def bar_plot(results: Mapping[str, Mapping[str, Any]], variants: Sequence[str], path: Path, title: str) -> Optional[Path]:
    try:
        import matplotlib

        matplotlib.use("Agg", force=True)
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot")
        return None
    ok = [v for v in variants if v in results and results[v].get("status") == "ok"]
    panels = [("F_rmse", "force RMSE (meV/Å)"), ("E_rmse", "energy RMSE (meV/atom)")]
    if any(_value(results[v], "BEC_r2") is not None for v in ok):
        panels.append(("BEC_r2", "BEC R² (global sign)"))
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.6))
    for ax, (key, label) in zip(np.atleast_1d(axes), panels):
        vals = [_value(results[v], key) for v in ok]
        x = np.arange(len(ok))
        ax.bar(x, [np.nan if y is None else y for y in vals], color="tab:blue")
        for xi, y in zip(x, vals):
            if y is not None:
                ax.annotate(f"{y:.3g}", (xi, y), ha="center", va="bottom", fontsize=8)
        ax.set_xticks(x, ok)
        ax.set_title(label)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


# ================================================================================== main
def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parser().parse_args(argv)
    import yaml

    from polarmace.config import ConfigError, load_config
    from polarmace.training.checkpoint import atomic_write_text

    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    try:
        base_raw = yaml.safe_load(Path(args.config).read_text()) or {}
        load_config(base_raw, args.overrides)  # check the base before anything runs
        if args.budget is not None and args.budget <= 0:
            raise ConfigError("--budget must be > 0 seconds")
        configs = {v: variant_config(base_raw, v, out, args.budget, args.epochs, args.overrides,
                                     args.until_plateau)
                   for v in args.variants}
        resolved = {v: load_config(c).to_dict() for v, c in configs.items()}
    except (ConfigError, OSError) as exc:
        print(f"accuracy.py: {exc}", file=sys.stderr)
        return 2
    jobs = max(1, int(args.jobs))
    threads = args.threads or max(1, (os.cpu_count() or 1) // jobs)
    results: Dict[str, Dict[str, Any]] = {}
    todo = []
    for v in args.variants:
        done = out / "results" / f"{v}.json"
        if done.exists() and not args.force:
            results[v] = json.loads(done.read_text())
            print(f"[{v}] results exist in {done}: skipped (--force to redo)")
            continue
        todo.append({"variant": v, "config": configs[v], "out": str(out), "threads": threads, "jobs": jobs,
                     "force": args.force,
                     "eval_batch_size": args.eval_batch_size or int(resolved[v]["data"]["batch_size"])})
    t0 = time.time()
    epochs = args.epochs if args.epochs is not None else (
        "unbounded" if args.budget else resolved[args.variants[0]]["training"]["epochs"])
    print(f"training {len(todo)} variant(s) ({', '.join(j['variant'] for j in todo) or 'none'}) with "
          f"{jobs} job(s) x {threads} thread(s); budget {args.budget} s, epochs {epochs}", flush=True)
    if jobs == 1 or len(todo) <= 1:
        for job in todo:
            results[job["variant"]] = _run_guarded(job)
    else:
        import multiprocessing as mp
        from concurrent.futures import ProcessPoolExecutor

        os.environ.setdefault("OMP_NUM_THREADS", str(threads))
        for job in todo:
            job["parent_pid"] = os.getpid()
        with ProcessPoolExecutor(max_workers=jobs, mp_context=mp.get_context("spawn")) as pool:
            for job, res in zip(todo, pool.map(_run_guarded, todo)):
                results[job["variant"]] = res
    wall = time.time() - t0

    order = [v for v in VARIANT_ORDER if v in args.variants]
    table = format_table(results, order)
    print("\n" + f"test-set errors ({Path(args.config).name}; budget {args.budget} s, epochs {args.epochs})")
    print(table)
    for line in improvements(results):
        print(line)
    learned = learned_lines(results, order)
    if learned:
        print("learned per element (test split; q e, BEC iso e, α Å³):")
        for line in learned:
            print(line)
    summary = {
        "base_config": str(args.config), "command": [sys.executable] + sys.argv, "overrides": args.overrides,
        "budget_s": args.budget, "epochs": args.epochs, "jobs": jobs, "threads": threads, "wall_s_this_call": wall,
        "git": git_state(), "machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                                         "python": platform.python_version()},
        "versions": _versions(), "units": UNITS_LINE, "variants": {v: results[v] for v in order if v in results},
        "table": table, "improvements": improvements(results), "learned": learned,
    }
    atomic_write_text(json.dumps(summary, indent=1, default=str), out / "results.json")
    write_csv(results, order, out / "accuracy.csv")
    plot = bar_plot(results, order, out / "accuracy.png",
                    f"{Path(args.config).name}: test set, budget {args.budget} s / variant")
    print(f"wrote {out / 'results.json'}, {out / 'accuracy.csv'}" + (f", {plot}" if plot else ""))
    return 0 if all(results[v].get("status") == "ok" for v in order if v in results) else 1


def _versions() -> Dict[str, str]:
    import torch

    import polarmace

    return {"polarmace": getattr(polarmace, "__version__", "?"), "torch": str(torch.__version__),
            "numpy": np.__version__}


if __name__ == "__main__":
    sys.exit(main())
