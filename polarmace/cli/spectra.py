"""polarmace-spectra: IR or Raman spectrum of an MD trajectory (CSV + PNG).

    polarmace-spectra ir trajectory.extxyz --model model.pt [--eps-infty 1.78] -o ir
    polarmace-spectra raman trajectory.extxyz --model model.pt -o raman

IR: dP/dt = Σ Z*_i v_i with Born effective charges from the model (or a per-atom "bec" array in
the file, 9 columns) and the frames' velocities; without velocities the total dipole series
(model, or info "dipole") is used. Raman: the cell polarizability from the model (or info
"polarizability", 9 values), isotropic and anisotropic parts. Frame spacing: --timestep (fs), else
the difference of info "time" (fs). With --temperature (and a periodic cell for IR) the IR output
is α(ω)n(ω) in cm⁻¹. --experimental overlays a curve (CSV or whitespace columns; '#' comments),
scaled to the computed maximum in the plotted range. See polarmace.spectra for the estimator.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, List, Optional, Sequence, Tuple

import numpy as np

from polarmace.errors import DataError, InputError


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="polarmace-spectra", description=__doc__.split("\n")[0])
    p.add_argument("kind", choices=["ir", "raman"])
    p.add_argument("trajectory", help="extxyz (or any ASE-readable) trajectory")
    p.add_argument("--model", default=None, help="model file (.pt from save, or exported .ts)")
    p.add_argument("-o", "--output", default=None, help="output prefix (writes PREFIX.csv, PREFIX.png)")
    p.add_argument("--eps-infty", type=float, default=None, help="ε∞ for physical BEC/polarizability")
    p.add_argument("--timestep", type=float, default=None, help="fs between frames")
    p.add_argument("--every", type=int, default=1, help="use every n-th frame")
    p.add_argument("--block-length", type=int, default=None, help="frames per block (default T/2)")
    p.add_argument("--overlap", type=float, default=0.5)
    p.add_argument("--window", choices=["hann", "none"], default="hann")
    p.add_argument("--temperature", type=float, default=None, help="K (corrections, α·n units)")
    p.add_argument("--correction", choices=["none", "harmonic", "standard"], default="none")
    p.add_argument("--source", choices=["auto", "bec", "dipole"], default="auto",
                   help="IR from Σ Z*·v (bec) or from the dipole series (dipole)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--experimental", default=None, help="experimental curve to overlay")
    p.add_argument("--experimental-columns", default="0,1", help="ν and intensity columns, e.g. 0,4")
    p.add_argument("--xmax", type=float, default=4500.0, help="plot range upper limit, cm⁻¹")
    return p


def _timestep(frames: List[Any], given: Optional[float], every: int) -> float:
    if given is not None:
        return float(given) * every
    times = [f.info.get("time") for f in frames[:2]]
    if len(frames) >= 2 and all(t is not None for t in times):
        return float(times[1]) - float(times[0])
    raise InputError("give --timestep (fs between frames); the frames carry no info['time']")


def _velocities(frames: List[Any]) -> Optional[np.ndarray]:
    from ase import units

    if not all("momenta" in f.arrays for f in frames):
        return None
    return np.array([f.get_velocities() * units.fs for f in frames])      # Å/fs


def _model_series(frames: List[Any], args: argparse.Namespace, want: str) -> np.ndarray:
    from polarmace.calculator import PolarMACECalculator

    calc = PolarMACECalculator(args.model, device=args.device, eps_infty=args.eps_infty,
                               compute_bec=want == "bec")
    out = []
    for frame in frames:
        atoms = frame.copy()
        atoms.calc = calc
        out.append(np.array(calc.get_property(want, atoms)))
    return np.array(out)


def _stored(frame: Any, key: str) -> Optional[Any]:
    """A value stored in a frame: info, arrays, or (ASE moves energy/dipole/forces/charges
    there on reading) the frame's SinglePointCalculator."""
    if key in frame.info:
        return frame.info[key]
    if key in frame.arrays:
        return frame.arrays[key]
    calc = getattr(frame, "calc", None)
    if calc is not None and key in getattr(calc, "results", {}):
        return calc.results[key]
    return None


def _info_series(frames: List[Any], key: str, shape: Tuple[int, ...]) -> Optional[np.ndarray]:
    """[T, *shape] (per structure) or [T, N, *shape] (per atom) from the frames, or None."""
    values = []
    for f in frames:
        v = _stored(f, key)
        if v is None:
            return None
        v = np.asarray(v, float)
        per_atom = v.size == len(f) * int(np.prod(shape)) and v.size != int(np.prod(shape))
        values.append(v.reshape((len(f),) + shape if per_atom else shape))
    return np.array(values)


def _ir(frames: List[Any], args: argparse.Namespace, dt: float):
    from polarmace import spectra

    vel = _velocities(frames)
    use_bec = args.source == "bec" or (args.source == "auto" and vel is not None)
    if use_bec:
        if vel is None:
            raise InputError("--source bec needs velocities in the trajectory")
        bec = _info_series(frames, "bec", (3, 3)) if args.model is None else None
        if bec is None:
            if args.model is None:
                raise InputError("give --model (no per-atom 'bec' in the file)")
            bec = _model_series(frames, args, "bec")
        signal = spectra.dipole_derivative(bec, vel)
        fn = spectra.ir_spectrum
    else:
        dip = _info_series(frames, "dipole", (3,)) if args.model is None else None
        if dip is None:
            if args.model is None:
                raise InputError("give --model (no info 'dipole' in the file)")
            dip = _model_series(frames, args, "dipole")
        signal = dip
        fn = spectra.ir_spectrum_from_dipoles
    periodic = bool(frames[0].pbc.all())
    volume = float(np.mean([f.get_volume() for f in frames])) if periodic and args.temperature else None
    spec = fn(signal, dt, args.block_length, args.overlap, args.window, args.temperature,
              args.correction, volume)
    return ["wavenumber_cm-1", f"ir [{spec.unit}]"], spec.frequency, [spec.intensity]


def _raman(frames: List[Any], args: argparse.Namespace, dt: float):
    from polarmace import spectra

    alpha = _info_series(frames, "polarizability", (3, 3)) if args.model is None else None
    if alpha is None:
        if args.model is None:
            raise InputError("give --model (no info 'polarizability' in the file)")
        alpha = _model_series(frames, args, "polarizability")
    iso, aniso = spectra.raman_spectra(alpha, dt, args.block_length, args.overlap, args.window,
                                       args.temperature, args.correction)
    return ["wavenumber_cm-1", "isotropic", "anisotropic"], iso.frequency, [iso.intensity, aniso.intensity]


def read_curve(path: str, columns: str = "0,1") -> Tuple[np.ndarray, np.ndarray]:
    """(ν, intensity) from a CSV or whitespace-separated file ('#' comments); DataError naming
    the file (and line) when it cannot be read."""
    try:
        ix, iy = (int(c) for c in columns.split(","))
    except ValueError:
        raise InputError(f"--experimental-columns {columns!r}: expected two column numbers, e.g. 0,1") from None
    if not Path(path).is_file():
        raise DataError(f"{path}: no such file (--experimental)")
    lines = [(k, line) for k, line in enumerate(Path(path).read_text().splitlines(), 1)
             if line.strip() and not line.lstrip().startswith("#")]
    if not lines:
        raise DataError(f"{path}: no data lines")
    delimiter = "," if "," in lines[0][1] else None
    rows = []
    for k, line in lines:
        try:
            row = [float(v) for v in (line.split(delimiter) if delimiter else line.split())]
            rows.append((row[ix], row[iy]))
        except (ValueError, IndexError):
            raise DataError(f"{path}: line {k}: cannot read columns {ix} and {iy} as numbers: {line.strip()!r}") from None
    data = np.array(rows)
    return data[:, 0], data[:, 1]


def _plot(path: Path, kind: str, header: List[str], freq: np.ndarray, curves: List[np.ndarray],
          experimental: Optional[Tuple[np.ndarray, np.ndarray]], xmax: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    sel = freq <= xmax
    top = 0.0
    for name, y in zip(header[1:], curves):
        ax.plot(freq[sel], y[sel], label=name)
        top = max(top, float(np.max(y[sel][freq[sel] > 50])) if np.any(freq[sel] > 50) else 0.0)
    if experimental is not None:
        x, y = experimental
        in_range = x <= xmax
        if in_range.any() and np.max(y[in_range]) > 0 and top > 0:
            ax.plot(x[in_range], y[in_range] * top / np.max(y[in_range]), "k--", label="experiment (scaled)")
    ax.set_xlabel("wavenumber (cm$^{-1}$)")
    ax.set_ylabel("intensity")
    ax.set_title(f"{kind.upper()} spectrum")
    ax.set_xlim(0, xmax)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def read_frames(path: str, every: int) -> List[Any]:
    """Every `every`-th frame of a trajectory; DataError naming the file when it cannot be read."""
    import ase.io

    if every < 1:
        raise InputError(f"--every must be >= 1, got {every}")
    if not Path(path).is_file():
        raise DataError(f"{path}: no such trajectory file")
    try:
        frames = ase.io.read(path, index=f"::{every}")
    except Exception as exc:  # ASE raises many kinds; the message names the file
        raise DataError(f"{path}: cannot read the trajectory: {exc}") from exc
    frames = frames if isinstance(frames, list) else [frames]
    if len(frames) < 4:
        raise DataError(f"{path} has {len(frames)} frames (every {every}); need at least 4")
    return frames


def main(argv: Optional[Sequence[str]] = None) -> int:
    from polarmace.cli import run_cli

    args = parser().parse_args(argv)
    return run_cli("polarmace-spectra", lambda: _run(args))


def _run(args: argparse.Namespace) -> int:
    from polarmace.errors import output_error

    frames = read_frames(args.trajectory, args.every)
    dt = _timestep(frames, args.timestep, args.every)
    header, freq, curves = (_ir if args.kind == "ir" else _raman)(frames, args, dt)
    prefix = Path(args.output or f"{Path(args.trajectory).stem}_{args.kind}")
    csv_path = prefix.with_name(prefix.name + ".csv")
    experimental = read_curve(args.experimental, args.experimental_columns) if args.experimental else None
    try:
        prefix.parent.mkdir(parents=True, exist_ok=True)
        np.savetxt(csv_path, np.column_stack([freq] + curves), delimiter=",", header=",".join(header),
                   comments="")
        _plot(prefix.with_name(prefix.name + ".png"), args.kind, header, freq, curves, experimental, args.xmax)
    except OSError as exc:
        raise output_error(csv_path, exc) from exc
    print(f"wrote {csv_path} and {prefix.with_name(prefix.name + '.png')} "
          f"(resolution {freq[1] - freq[0]:.2f} cm^-1, {len(frames)} frames, dt {dt} fs)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
