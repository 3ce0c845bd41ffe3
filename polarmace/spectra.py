"""Vibrational spectra from MD time series (docs/method.md §5): IR from dP/dt, Raman from α(t).

Units: time fs, dipole e·Å, velocities Å/fs, polarizability Å³, frequencies cm⁻¹ (ν̃ = ω/2πc).

Estimator (one function, `power_spectrum`): the signal x(t) [T, d] (mean removed) is cut into
overlapping blocks of `block_length` frames (`overlap` fraction shared by consecutive blocks);
per block the autocorrelation C(τ) = ⟨x(t)·x(t+τ)⟩ (summed over components, unbiased: divided by
the number of pairs at each lag) is computed by zero-padded FFT; the block ACFs are averaged,
multiplied by the decaying half of a Hann window, w(τ) = cos²(πτ/2M) for τ = 0..M−1, and
cosine-transformed,

    S(ν̃_k) = Δt [C(0) + 2 Σ_{τ=1}^{M−1} w(τ) C(τ) cos(2π ν̃_k c τ Δt)],  ν̃_k = k / (2 M Δt c),

i.e. S(ω) = ∫ C(t) e^{−iωt} dt on a grid of spacing 1/(2MΔt c) cm⁻¹ (M = block length).

IR. With Born effective charges and velocities, dP/dt = Σ_i Z*_i v_i exactly; without them the
total dipole series P(t) is used and S_Ṗ(ω) = ω² S_P(ω). The classical absorption coefficient
times refractive index is

    α(ω) n(ω) = S_Ṗ(ω) / (6 ε0 V c k_B T)       (cm⁻¹, when volume V and temperature T are given)

otherwise the spectrum is S_Ṗ in e²Å²/fs. Quantum corrections (multiplying the classical
spectrum; T required): "harmonic" βħω/(1 − e^{−βħω}) (exact for harmonic systems with linear
dipoles), "standard" 2/(1 + e^{−βħω}).

Raman. From the cell polarizability α(t) [T,3,3]: isotropic a = tr α/3, anisotropic part
β = α − a·I; I_iso = S_a, I_aniso = S_β (ACF of β(0):β(t), summed over the 9 components).
The same corrections apply.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Tuple

import numpy as np

from polarmace import units

__all__ = ["Spectrum", "autocorrelation", "power_spectrum", "quantum_correction", "ir_spectrum",
           "ir_spectrum_from_dipoles", "dipole_derivative", "raman_spectra", "hbar_ev_fs"]

CORRECTIONS = ("none", "harmonic", "standard")


def hbar_ev_fs() -> float:
    """ħ in eV·fs (polarmace.units.HBAR when defined, else CODATA through ase.units)."""
    value = getattr(units, "HBAR", None)
    if value is not None:
        return float(value)
    import ase.units

    return float(ase.units._hbar / ase.units._e * 1e15)


@dataclass
class Spectrum:
    """A spectrum on a uniform grid: frequency [K] cm⁻¹, intensity [K] (unit in `unit`)."""

    frequency: np.ndarray
    intensity: np.ndarray
    unit: str = "arb."

    def peak(self, low: float = 0.0, high: float = np.inf) -> float:
        """Frequency (cm⁻¹) of the largest intensity within [low, high], refined between grid
        points by the parabola through the maximum and its two neighbours (the vertex, which
        stays within half a grid spacing of the maximum; at the window's edge the grid point)."""
        sel = np.flatnonzero((self.frequency >= low) & (self.frequency <= high))
        if not len(sel):
            raise ValueError(f"no frequencies in [{low}, {high}] cm⁻¹")
        k = int(sel[np.argmax(self.intensity[sel])])
        nu = float(self.frequency[k])
        if k == sel[0] or k == sel[-1]:
            return nu
        y0, y1, y2 = (float(v) for v in self.intensity[k - 1:k + 2])
        curvature = y0 - 2.0 * y1 + y2
        if curvature >= 0.0:  # flat top: no vertex
            return nu
        shift = 0.5 * (y0 - y2) / curvature
        return nu + shift * float(self.frequency[k + 1] - self.frequency[k])

    def band_centroid(self, low: float, high: float) -> float:
        """Intensity-weighted mean frequency (cm⁻¹) within [low, high]: a band position that,
        unlike the maximum, does not jump between the spikes of a short, noisy spectrum."""
        sel = (self.frequency >= low) & (self.frequency <= high)
        weight = np.clip(self.intensity[sel], 0.0, None)
        if not sel.any() or weight.sum() <= 0.0:
            raise ValueError(f"no positive intensity in [{low}, {high}] cm⁻¹")
        return float((weight * self.frequency[sel]).sum() / weight.sum())

    @property
    def resolution(self) -> float:
        """Grid spacing, cm⁻¹."""
        return float(self.frequency[1] - self.frequency[0]) if len(self.frequency) > 1 else math.inf


def autocorrelation(x: np.ndarray, max_lag: int) -> np.ndarray:
    """Unbiased ACF C(τ) = Σ_d mean_t x_d(t) x_d(t+τ) for τ = 0..max_lag−1; x [T] or [T, d]."""
    x = np.asarray(x, dtype=np.float64)
    if x.ndim == 1:
        x = x[:, None]
    t = x.shape[0]
    max_lag = min(int(max_lag), t)
    size = 1 << int(np.ceil(np.log2(2 * t)))
    f = np.fft.rfft(x, n=size, axis=0)
    acf = np.fft.irfft((f * f.conj()).real.sum(axis=1), n=size)[:max_lag]
    return acf / (t - np.arange(max_lag))


def _blocks(t: int, length: int, overlap: float) -> np.ndarray:
    step = max(1, int(round(length * (1.0 - overlap))))
    return np.arange(0, t - length + 1, step)


def power_spectrum(x: np.ndarray, dt: float, block_length: Optional[int] = None,
                   overlap: float = 0.5, window: str = "hann") -> Spectrum:
    """S(ν̃) = ∫ C(t) e^{−iωt} dt of x [T] or [T, d] sampled every `dt` fs (module docstring).

    block_length: frames per block (default T//2, at most T); overlap in [0, 1);
    window: "hann" or "none". Intensity unit: [x]²·fs.
    """
    x = np.asarray(x, dtype=np.float64)
    if x.ndim == 1:
        x = x[:, None]
    x = x.reshape(x.shape[0], -1)
    t = x.shape[0]
    if t < 4:
        raise ValueError(f"need at least 4 frames for a spectrum, got {t}")
    if not 0.0 <= overlap < 1.0:
        raise ValueError(f"overlap must be in [0, 1), got {overlap}")
    m = min(int(block_length or max(t // 2, 2)), t)
    acf = np.zeros(m)
    starts = _blocks(t, m, overlap)
    for s in starts:
        block = x[s:s + m]
        acf += autocorrelation(block - block.mean(axis=0), m)
    acf /= len(starts)
    if window == "hann":
        acf = acf * np.cos(0.5 * np.pi * np.arange(m) / m) ** 2
    elif window != "none":
        raise ValueError(f"unknown window {window!r} (use 'hann' or 'none')")
    sym = np.concatenate([acf, [0.0], acf[:0:-1]])            # even extension, length 2M
    spectrum = np.fft.rfft(sym).real * dt                      # k = 0..M
    frequency = np.arange(len(spectrum)) / (len(sym) * dt * units.SPEED_OF_LIGHT_CM_PER_FS)
    return Spectrum(frequency, spectrum)


def quantum_correction(frequency_cm: np.ndarray, temperature: float, kind: str = "harmonic") -> np.ndarray:
    """Factor multiplying a classical spectrum: "harmonic" βħω/(1−e^{−βħω}), "standard"
    2/(1+e^{−βħω}), "none" 1. frequency in cm⁻¹, temperature in K."""
    if kind == "none":
        return np.ones_like(frequency_cm, dtype=float)
    if temperature is None or temperature <= 0:
        raise ValueError("a quantum correction needs a temperature > 0 K")
    omega = 2.0 * np.pi * units.SPEED_OF_LIGHT_CM_PER_FS * np.asarray(frequency_cm, float)  # rad/fs
    x = hbar_ev_fs() * omega / (units.KB * temperature)
    if kind == "harmonic":
        with np.errstate(invalid="ignore", divide="ignore"):
            out = np.where(x > 1e-12, x / -np.expm1(-np.maximum(x, 1e-300)), 1.0)
        return out
    if kind == "standard":
        return 2.0 / (1.0 + np.exp(-x))
    raise ValueError(f"unknown correction {kind!r}; use one of {CORRECTIONS}")


def dipole_derivative(bec: np.ndarray, velocities: np.ndarray) -> np.ndarray:
    """dP/dt [T,3] e·Å/fs = Σ_i Z*_i v_i from bec [T,N,3,3] (Z*[i,a,b] = ∂P_a/∂r_ib) and
    velocities [T,N,3] Å/fs."""
    return np.einsum("tnab,tnb->ta", np.asarray(bec, float), np.asarray(velocities, float))


def _finish(spec: Spectrum, temperature: Optional[float], correction: str,
            volume: Optional[float]) -> Spectrum:
    intensity = spec.intensity * quantum_correction(spec.frequency, temperature, correction)
    unit = "e^2 A^2 / fs"
    if volume is not None and temperature is not None:
        # S [e²Å²/fs] / (6 ε0 [e²/(eV Å)] V [Å³] c [Å/fs] kT [eV]) -> 1/Å -> 1/cm
        c_ang_fs = units.SPEED_OF_LIGHT_CM_PER_FS * 1e8
        intensity = intensity / (6.0 * units.EPSILON0 * volume * c_ang_fs * units.KB * temperature) * 1e8
        unit = "cm^-1 (alpha*n)"
    return Spectrum(spec.frequency, intensity, unit)


def ir_spectrum(dpdt: np.ndarray, dt: float, block_length: Optional[int] = None, overlap: float = 0.5,
                window: str = "hann", temperature: Optional[float] = None, correction: str = "none",
                volume: Optional[float] = None) -> Spectrum:
    """IR spectrum from dP/dt [T,3] (e·Å/fs) sampled every dt fs (module docstring).

    With `volume` (Å³) and `temperature` (K) the result is α(ω)n(ω) in cm⁻¹."""
    return _finish(power_spectrum(dpdt, dt, block_length, overlap, window), temperature,
                   correction, volume)


def ir_spectrum_from_dipoles(dipoles: np.ndarray, dt: float, block_length: Optional[int] = None,
                             overlap: float = 0.5, window: str = "hann",
                             temperature: Optional[float] = None, correction: str = "none",
                             volume: Optional[float] = None) -> Spectrum:
    """IR spectrum from the total dipole series P(t) [T,3] (e·Å): S_Ṗ(ω) = ω² S_P(ω).

    For periodic cells the dipole must be continuous in time (no jumps by a polarization
    quantum); prefer `ir_spectrum` with Born effective charges there."""
    spec = power_spectrum(dipoles, dt, block_length, overlap, window)
    omega = 2.0 * np.pi * units.SPEED_OF_LIGHT_CM_PER_FS * spec.frequency      # rad/fs
    return _finish(Spectrum(spec.frequency, spec.intensity * omega ** 2), temperature, correction, volume)


def raman_spectra(polarizability: np.ndarray, dt: float, block_length: Optional[int] = None,
                  overlap: float = 0.5, window: str = "hann", temperature: Optional[float] = None,
                  correction: str = "none") -> Tuple[Spectrum, Spectrum]:
    """(isotropic, anisotropic) Raman power spectra from α(t) [T,3,3] (Å³), intensity Å⁶·fs."""
    alpha = np.asarray(polarizability, dtype=np.float64)
    if alpha.ndim != 3 or alpha.shape[1:] != (3, 3):
        raise ValueError(f"polarizability must be [T,3,3], got {alpha.shape}")
    iso = np.trace(alpha, axis1=1, axis2=2) / 3.0
    aniso = alpha - iso[:, None, None] * np.eye(3)
    out = []
    for signal in (iso, aniso.reshape(len(alpha), 9)):
        spec = power_spectrum(signal, dt, block_length, overlap, window)
        factor = quantum_correction(spec.frequency, temperature, correction)
        out.append(Spectrum(spec.frequency, spec.intensity * factor, "A^6 fs"))
    return out[0], out[1]
