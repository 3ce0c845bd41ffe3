"""Import a mace-torch model (exported by scripts/export_mace_weights.py) into a PolarMACE.

    model = import_mace("my.mace.npz", variant="les")        # trunk = the MACE model, + fresh heads
    model.save("my.pt")                                        # polarmace-import-mace does both

The export file is an .npz (no pickles): the MACE state dict plus JSON metadata describing the
weight layout (irreps, instructions with their path weights, activation constants). No MACE code
is needed here. The PolarMACE built has MACE's trunk, E0s, scale and shift, so that with
``variant="sr"`` energies, forces and stress equal MACE's to round-off; other variants add the
long-range heads at their small initial scale (the trunk is unchanged).

What the mapping does (MACE → polarmace), all exact in float64:

* copies the embedding, linear_up, radial MLP, linears, product linears and readouts, moving
  e3nn's per-instruction normalisation (path weights) into polarmace's 1/sqrt(fan_in);
* reshapes the element skip [irrep, u, element, w] → [element, irrep, u, w];
* permutes the tensor-product path blocks (MACE sorts them by output ℓ; polarmace orders them by
  input irrep, ℓ₂, ℓ₃) in the last radial layer and the linear after the tensor product;
* flips the sign of odd-ℓ₂ paths: MACE's edge vector points from sender to receiver,
  polarmace's from receiver to sender, and Y_ℓ(−r̂) = (−1)^ℓ Y_ℓ(r̂);
* rescales for the SiLU normalisation (polarmace: the exact second moment, e3nn: a Monte-Carlo
  estimate stored with each activation); the next layer's weights absorb the ratio;
* projects the product-basis weights onto polarmace's reduced symmetric basis: with both bases
  written as polynomial coefficients on the monomials of A, W' = T W with T the least-squares
  solution of C_pm T = C_mace (the residual is checked: the span is the same).

Supported: `MACE` and `ScaleShiftMACE`, non-residual or residual first block, residual later
blocks, Bessel radial basis with the polynomial cutoff, SiLU, natural-parity hidden irreps of one
multiplicity, any radial MLP, readout MLP width and number of layers (one layer: the linear
readout), use_agnostic_product (one set of product weights for every element), one head of a
multi-head model (`head`), a subset of the elements (`elements`).
Everything else (ZBL pair repulsion, distance transforms, other radial bases, cuEquivariance /
OpenEquivariance layouts, edge irreps, embedding specs, other interaction or readout blocks,
per-layer correlations that differ, ...) is refused with an InputError naming it.
"""

import json
import math
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from e3nn import o3

from polarmace.errors import InputError, ModelFileError

from .embedding import CHEMICAL_SYMBOLS
from .product import SymmetricBasis, monomials
from .radial import SILU_NORM

__all__ = ["MaceExport", "read_export", "import_config", "import_mace", "transfer_trunk", "FORMAT"]

FORMAT = "polarmace-mace-export"
FORMAT_VERSION = 1
_FIRST_BLOCKS = ("RealAgnosticInteractionBlock", "RealAgnosticResidualInteractionBlock")
_REQUIRED_META = ("format", "format_version", "model_class", "atomic_numbers", "r_max", "num_interactions",
                  "heads", "atomic_energies", "modules", "tensors")


class UnsupportedMaceModel(InputError):
    """A MACE model whose architecture polarmace cannot reproduce exactly."""


class MaceExport:
    """A read and checked export file: `meta` (dict) and `tensors` (name -> float64/int array)."""

    def __init__(self, path: str, meta: Dict[str, Any], tensors: Dict[str, np.ndarray]):
        self.path = str(path)
        self.meta = meta
        self.tensors = tensors

    def t(self, name: str) -> torch.Tensor:
        """The tensor `name` as float64."""
        return torch.from_numpy(np.asarray(self.tensors[name], dtype=np.float64))

    def module(self, name: str) -> Dict[str, Any]:
        mods = self.meta["modules"]
        if name not in mods:
            raise UnsupportedMaceModel(f"{self.path}: the MACE model has no module {name!r}")
        return mods[name]

    def cls(self, name: str) -> str:
        return self.module(name)["class"].rsplit(".", 1)[-1]

    @property
    def symbols(self) -> List[str]:
        return [CHEMICAL_SYMBOLS[z] for z in self.meta["atomic_numbers"]]


def read_export(path: Union[str, Path]) -> MaceExport:
    """Read an export file and check that it is complete (every listed tensor present with its
    shape): a truncated or foreign file raises ModelFileError before anything is built."""
    path = Path(path)
    if not path.is_file():
        raise ModelFileError(f"{path}: no such MACE export file (write one with scripts/export_mace_weights.py)")
    try:
        with np.load(str(path), allow_pickle=False) as data:
            if "__meta__" not in data.files:
                raise ModelFileError(f"{path}: not a MACE export file (no __meta__ entry; write one with "
                                     "scripts/export_mace_weights.py)")
            meta = json.loads(bytes(data["__meta__"]).decode("utf-8"))
            tensors = {k: data[k] for k in data.files if k != "__meta__"}
    except ModelFileError:
        raise
    except Exception as exc:  # zipfile.BadZipFile, EOFError, ValueError (pickled), OSError, JSON
        raise ModelFileError(f"{path}: cannot read the MACE export file (truncated or not an .npz from "
                             f"scripts/export_mace_weights.py): {type(exc).__name__}: {exc}") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise ModelFileError(f"{path}: not a MACE export file (format {meta.get('format') if isinstance(meta, dict) else None!r})")
    missing = [k for k in _REQUIRED_META if k not in meta]
    if missing:
        raise ModelFileError(f"{path}: incomplete MACE export file: metadata lacks {', '.join(missing)}")
    if int(meta["format_version"]) > FORMAT_VERSION:
        raise ModelFileError(f"{path}: export format version {meta['format_version']} is newer than this "
                             f"polarmace reads ({FORMAT_VERSION})")
    absent = [e["name"] for e in meta["tensors"] if e["name"] not in tensors]
    if absent:
        more = f" (and {len(absent) - 3} more)" if len(absent) > 3 else ""
        raise ModelFileError(f"{path}: incomplete MACE export file: {len(absent)} tensor(s) missing: "
                             f"{', '.join(absent[:3])}{more}")
    for e in meta["tensors"]:
        if list(tensors[e["name"]].shape) != list(e["shape"]):
            raise ModelFileError(f"{path}: incomplete MACE export file: tensor {e['name']} has shape "
                                 f"{list(tensors[e['name']].shape)}, the metadata says {e['shape']}")
    return MaceExport(str(path), meta, tensors)


# ----------------------------------------------------------------------------------------------
# What is supported
# ----------------------------------------------------------------------------------------------

def _irreps_keys(irreps: str) -> List[Tuple[int, int, int]]:
    """[(mul, l, p)] of an irreps string."""
    return [(mi.mul, mi.ir.l, mi.ir.p) for mi in o3.Irreps(irreps)]


def _check_supported(exp: MaceExport) -> None:
    m = exp.meta
    where = exp.path

    def refuse(what: str) -> None:
        raise UnsupportedMaceModel(f"{where}: unsupported MACE architecture: {what}")

    if m["model_class"] not in ("MACE", "ScaleShiftMACE"):
        refuse(f"model class {m['model_class']} (only MACE and ScaleShiftMACE)")
    if m.get("pair_repulsion"):
        refuse("ZBL pair repulsion (pair_repulsion=True)")
    if m.get("joint_embedding") or m.get("embedding_readout"):
        refuse("embedding_specs (joint embedding of extra node/graph features)")
    if m.get("use_so3"):
        refuse("use_so3=True")
    if m.get("edge_irreps"):
        refuse(f"edge_irreps={m['edge_irreps']}")
    if not m.get("apply_cutoff", True):
        refuse("apply_cutoff=False (cutoff applied after the radial MLP)")
    if m.get("use_last_readout_only"):
        refuse("use_last_readout_only=True")
    n = int(m["num_interactions"])
    rad = exp.module("radial_embedding")
    if rad.get("basis") != "BesselBasis":
        refuse(f"radial basis {rad.get('basis')} (only Bessel)")
    if rad.get("distance_transform"):
        refuse(f"distance transform {rad['distance_transform']}")
    sh = exp.module("spherical_harmonics")
    if not sh.get("normalize", True) or sh.get("normalization") != "component":
        refuse("spherical harmonics other than normalised, component normalisation")
    for name, rec in m["modules"].items():
        if rec.get("cueq_enabled") or rec.get("oeq_enabled"):
            refuse(f"{name}: a cuEquivariance/OpenEquivariance layout (convert the model to e3nn first)")
        if rec.get("biases"):
            refuse(f"{name}: a linear layer with biases")
        if rec.get("conv_fusion"):
            refuse(f"{name}: fused convolution")
        if rec["class"].endswith("normalize2mom") and rec.get("f") != "silu":
            refuse(f"{name}: activation {rec.get('f')} (only SiLU)")
        if rec["class"].endswith("_Layer") and (rec["var_in"] != 1.0 or rec["var_out"] != 1.0):
            refuse(f"{name}: radial MLP with variance_in/out != 1")
    for t in range(n):
        cls = exp.cls(f"interactions.{t}")
        ok = _FIRST_BLOCKS if t == 0 else ("RealAgnosticResidualInteractionBlock",)
        if cls not in ok:
            refuse(f"interaction block {t + 1}: {cls} (supported: {', '.join(ok)})")
        if exp.cls(f"products.{t}") != "EquivariantProductBasisBlock":
            refuse(f"product block {t + 1}: {exp.cls(f'products.{t}')}")
    readouts = int(m.get("num_readouts", n))
    if readouts != n:
        refuse(f"{readouts} readouts for {n} interactions")
    for t in range(n):
        cls = exp.cls(f"readouts.{t}")
        want = "NonLinearReadoutBlock" if (t == n - 1 and n > 1) else "LinearReadoutBlock"
        if cls != want:
            refuse(f"readout {t + 1}: {cls} (expected {want})")
    hidden = exp.module("interactions.0")["hidden_irreps"] if n == 1 else exp.module("interactions.1")["node_feats_irreps"]
    keys = _irreps_keys(hidden)
    if len({k[0] for k in keys}) != 1:
        refuse(f"hidden irreps {hidden} with different multiplicities")
    if any(p != (-1) ** l for _, l, p in keys):
        refuse(f"hidden irreps {hidden} of other than natural parity (0e, 1o, 2e, ...)")
    last = _irreps_keys(exp.module(f"interactions.{n - 1}")["hidden_irreps"])
    if [(l, p) for _, l, p in last] != [(0, 1)]:
        refuse("a last layer with more than scalars (keep_last_layer_irreps=True)")
    corr = {exp.module(f"products.{t}.symmetric_contractions.contractions.0")["correlation"] for t in range(n)}
    if len(corr) != 1:
        refuse(f"different correlation orders per layer {sorted(corr)}")


def _head_index(exp: MaceExport, head: Optional[str]) -> int:
    heads = list(exp.meta["heads"])
    if head is None:
        if len(heads) > 1:
            raise InputError(f"{exp.path}: the MACE model has {len(heads)} heads ({', '.join(heads)}): choose one "
                             "with --head")
        return 0
    if head not in heads:
        raise InputError(f"{exp.path}: no head {head!r} in the MACE model (its heads: {', '.join(heads)})")
    return heads.index(head)


def _element_map(exp: MaceExport, elements: Optional[Sequence[str]]) -> Tuple[List[str], List[int]]:
    """(polarmace element symbols, MACE element index of each)."""
    symbols = exp.symbols
    if elements is None:
        return list(symbols), list(range(len(symbols)))
    elements = [str(e) for e in elements]
    unknown = [e for e in elements if e not in CHEMICAL_SYMBOLS[1:]]
    if unknown:
        raise InputError(f"unknown element symbol(s) {', '.join(unknown)}")
    missing = [e for e in elements if e not in symbols]
    if missing:
        raise InputError(f"{exp.path}: element(s) {', '.join(missing)} not in the MACE model "
                         f"(it knows {', '.join(symbols)})")
    if len(set(elements)) != len(elements):
        raise InputError(f"duplicate elements in {elements}")
    keep = [s for s in symbols if s in set(elements)]  # MACE's order
    return keep, [symbols.index(s) for s in keep]


def import_config(exp: MaceExport, variant: str = "sr", head: Optional[str] = None,
                  elements: Optional[Sequence[str]] = None, dtype: str = "float64",
                  long_range: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """The resolved polarmace config (dict) of the imported model; checks support first."""
    from polarmace.config import load_config

    _check_supported(exp)
    h = _head_index(exp, head)
    symbols, mace_index = _element_map(exp, elements)
    m = exp.meta
    n = int(m["num_interactions"])
    first = exp.module("interactions.0")
    c = _irreps_keys(first["node_feats_irreps"])[0][0]
    if n > 1:
        hidden = exp.module("interactions.1")["node_feats_irreps"]
    else:
        hidden = f"{c}x0e"
    sh_lmax = max(l for _, l, _ in _irreps_keys(exp.module("spherical_harmonics")["irreps_out"]))
    corr = int(exp.module("products.0.symmetric_contractions.contractions.0")["correlation"])
    readout_hidden = 16
    if n > 1:
        nh = len(m["heads"])
        readout_hidden = o3.Irreps(exp.module(f"readouts.{n - 1}")["hidden_irreps"]).dim // nh
    e0 = np.atleast_2d(np.asarray(m["atomic_energies"], dtype=np.float64))[h]
    lr = {"variant": variant}
    lr.update(long_range or {})
    mc = {
        "elements": symbols,
        "r_max": float(m["r_max"]),
        "num_bessel": int(exp.tensors["radial_embedding.bessel_fn.bessel_weights"].shape[0]),
        "num_polynomial_cutoff": int(round(exp.module("radial_embedding.cutoff_fn")["p"])),
        "max_ell": int(sh_lmax),
        "hidden_irreps": str(o3.Irreps(hidden).simplify()),
        "num_interactions": n,
        "correlation": corr,
        "radial_mlp": [int(x) for x in first["radial_MLP"]],
        "avg_num_neighbors": float(first["avg_num_neighbors"]),
        "e0s": {s: float(e0[i]) for s, i in zip(symbols, mace_index)},
        "dtype": dtype,
        "residual_first_block": exp.cls("interactions.0") == "RealAgnosticResidualInteractionBlock",
        "readout": "mlp" if n > 1 else "linear",
        "readout_mlp_hidden": int(readout_hidden),
    }
    cfg = load_config({"model": mc, "long_range": lr}).to_dict()
    lrc = cfg["long_range"]
    vectors = bool(lrc.get("dipoles") or lrc.get("quadrupoles")
                   or (lrc.get("induced_dipoles") and lrc.get("polarizability") == "anisotropic"))
    if n == 1 and vectors:
        # one MACE layer has scalar features only; the vector heads get fresh 1o features (their
        # weights are not in MACE and do not change the short-range energy)
        cfg["model"]["hidden_irreps"] = f"{c}x0e+{c}x1o"
    return cfg


def _scale_shift(exp: MaceExport, head: int) -> Tuple[float, float]:
    if "scale" not in exp.meta:
        return 1.0, 0.0
    scale = np.atleast_1d(np.asarray(exp.meta["scale"], dtype=np.float64))
    shift = np.atleast_1d(np.asarray(exp.meta["shift"], dtype=np.float64))
    return float(scale[head if scale.size > 1 else 0]), float(shift[head if shift.size > 1 else 0])


# ----------------------------------------------------------------------------------------------
# Weight transfer
# ----------------------------------------------------------------------------------------------

def _linear_blocks(rec: Dict[str, Any], weight: torch.Tensor) -> Dict[Tuple[int, int], torch.Tensor]:
    """e3nn o3.Linear: {(i_in, i_out): path_weight · W [mul_in, mul_out]}."""
    out: Dict[Tuple[int, int], torch.Tensor] = {}
    off = 0
    for i_in, i_out, shape, pw in rec["instructions"]:
        size = int(np.prod(shape))
        out[(i_in, i_out)] = weight[off:off + size].view(*shape) * pw
        off += size
    if off != weight.numel():
        raise UnsupportedMaceModel(f"linear layer weight of {weight.numel()} numbers, instructions need {off}")
    return out


def _key_index(irreps: str) -> List[Tuple[int, int]]:
    return [(mi.ir.l, mi.ir.p) for mi in o3.Irreps(irreps)]


def _set_channel_linear(lin: Any, blocks: Dict[Tuple[int, int], torch.Tensor], in_map: Dict[int, int],
                        out_map: Dict[int, int]) -> None:
    """Fill a polarmace ChannelLinear from e3nn blocks; in_map/out_map: e3nn index -> polarmace index.
    Outputs without any e3nn block keep their weights (irreps MACE does not have)."""
    w = lin.weight.detach().clone().double()
    pm_in_of = {v: k for k, v in in_map.items()}
    filled = set()
    for k, src in enumerate(lin.sources):
        if k not in out_map.values():
            continue
        i_out = [e for e, p in out_map.items() if p == k][0]
        fan = lin.fan[k]
        rows = []
        for s in src:
            e_in = pm_in_of.get(s)
            b = blocks.get((e_in, i_out)) if e_in is not None else None
            rows.append(b if b is not None else torch.zeros(lin.c_in, lin.c_out, dtype=torch.float64))
        block = torch.cat(rows, 0) * math.sqrt(fan)
        w[lin.offsets[k]:lin.offsets[k] + fan * lin.c_out] = block.reshape(-1)
        filled.add(k)
    with torch.no_grad():
        lin.weight.copy_(w.to(lin.weight.dtype))


def _tp_blocks(rec: Dict[str, Any], weight: torch.Tensor, elem_index: List[int]) -> Dict[Tuple[int, int], torch.Tensor]:
    """e3nn FullyConnectedTensorProduct (features ⊗ one-hot elements, 'uvw'):
    {(i_in1, i_out): path_weight · W[u, element, w] / sqrt(2l+1) restricted to `elem_index`}
    (the Clebsch–Gordan coefficient of l ⊗ 0 -> l is δ/sqrt(2l+1))."""
    out: Dict[Tuple[int, int], torch.Tensor] = {}
    off = 0
    irreps_out = o3.Irreps(rec["irreps_out"])
    for i1, i2, i_out, mode, has_w, pw, shape in rec["instructions"]:
        if mode != "uvw" or not has_w or i2 != 0:
            raise UnsupportedMaceModel(f"skip tensor product with instruction {mode} {i2}")
        size = int(np.prod(shape))
        cg = 1.0 / math.sqrt(2 * irreps_out[i_out].ir.l + 1)
        block = weight[off:off + size].view(*shape) * (pw * cg)  # [u, element, w]
        out[(i1, i_out)] = block[:, elem_index, :]
        off += size
    if off != weight.numel():
        raise UnsupportedMaceModel(f"skip weight of {weight.numel()} numbers, instructions need {off}")
    return out


def _set_element_linear(el: Any, blocks: Dict[Tuple[int, int], torch.Tensor], in_keys: List[Tuple[int, int]],
                        out_keys: List[Tuple[int, int]], pm_in: List[Tuple[int, int]],
                        pm_out: List[Tuple[int, int]]) -> None:
    w = el.weight.detach().clone().double()
    for (i1, i_out), b in blocks.items():
        key_out = out_keys[i_out]
        if key_out not in pm_out or in_keys[i1] != key_out:
            continue
        k = pm_out.index(key_out)
        w[:, k] = b.permute(1, 0, 2) / el.scale  # [element, u, w]
    with torch.no_grad():
        el.weight.copy_(w.to(el.weight.dtype))


def _set_radial(mlp: Any, exp: MaceExport, prefix: str, columns: torch.Tensor) -> None:
    """Copy the hidden layers of an e3nn FullyConnectedNet into a polarmace RadialMLP, absorbing
    the SiLU normalisation ratio into the next layer; `columns` [H, out] is MACE's last layer
    already permuted/scaled to polarmace's path order (the ratio is applied here)."""
    hs = exp.module(prefix)["hs"]
    if [int(h) for h in hs[:-1]] != mlp.sizes[:-1]:
        raise UnsupportedMaceModel(f"{prefix}: radial MLP {hs} vs polarmace {mlp.sizes}")
    ratio = 1.0
    with torch.no_grad():
        for i, w in enumerate(mlp.hidden_weights):
            wm = exp.t(f"{prefix}.layer{i}.weight") * ratio
            w.copy_(wm.to(w.dtype))
            act = exp.module(f"{prefix}.layer{i}.act")
            cst = 1.0 if act.get("is_id") else float(act["cst"])
            ratio = cst / SILU_NORM
        mlp.last_weight.copy_((columns * ratio).to(mlp.last_weight.dtype))


def _tp_path_columns(exp: MaceExport, prefix: str, pm_paths: List[Tuple[int, int, int]],
                     in_irreps: str, avg_pm: float) -> Tuple[torch.Tensor, Dict[int, int]]:
    """MACE's last radial layer [H, P·C] in polarmace's path order, with the path-weight, edge
    direction and avg_num_neighbors factors; and the map (MACE mid index -> polarmace path index).

    pm_paths: (input key index in `in_irreps` order, l2, l3) per polarmace path.
    """
    rec = exp.module(f"{prefix}.conv_tp")
    mid = o3.Irreps(rec["irreps_out"])
    in1 = o3.Irreps(rec["irreps_in1"])
    in2 = o3.Irreps(rec["irreps_in2"])
    w_last = exp.t(f"{prefix}.conv_tp_weights.layer{len(exp.module(prefix + '.conv_tp_weights')['hs']) - 2}.weight")
    h = w_last.shape[0]
    c = in1[0].mul
    cols = torch.zeros(h, len(pm_paths) * c, dtype=torch.float64)
    lookup = {p: k for k, p in enumerate(pm_paths)}
    pm_in = _key_index(in_irreps)
    avg_mace = float(exp.module(prefix)["avg_num_neighbors"])
    mid_map: Dict[int, int] = {}
    seen = set()
    for n, (i1, i2, i_out, mode, has_w, pw, shape) in enumerate(rec["instructions"]):
        if mode != "uvu" or not has_w:
            raise UnsupportedMaceModel(f"{prefix}.conv_tp: instruction mode {mode}")
        l1, p1 = in1[i1].ir.l, in1[i1].ir.p
        l2 = in2[i2].ir.l
        l3 = mid[i_out].ir.l
        key = (pm_in.index((l1, p1)), l2, l3)
        if key not in lookup:
            raise UnsupportedMaceModel(f"{prefix}.conv_tp: path {l1}x{l2}->{l3} has no polarmace counterpart")
        k = lookup[key]
        seen.add(k)
        mid_map[i_out] = k
        factor = pw / math.sqrt(2 * l3 + 1) * (-1.0) ** l2 * (avg_pm / avg_mace)
        cols[:, k * c:(k + 1) * c] = w_last[:, n * c:(n + 1) * c] * factor
    if len(seen) != len(pm_paths):
        raise UnsupportedMaceModel(f"{prefix}.conv_tp: {len(seen)} paths in MACE, {len(pm_paths)} in polarmace")
    return cols, mid_map


def _monomial_coefficients(u: torch.Tensor, nu: int, dim: int, l: int) -> torch.Tensor:
    """MACE U [(2l+1),] d^ν, K -> polynomial coefficients [K, S_ν, 2l+1] on polarmace's monomials."""
    if l == 0:
        u = u.unsqueeze(0)
    k = u.shape[-1]
    m = u.shape[0]
    flat = u.reshape(m, dim ** nu, k)
    monos = monomials(dim, nu)
    index = {mono: i for i, mono in enumerate(monos)}
    tuples = np.stack(np.unravel_index(np.arange(dim ** nu), (dim,) * nu), axis=1)
    target = torch.tensor([index[tuple(sorted(t))] for t in tuples.tolist()], dtype=torch.long)
    coeff = torch.zeros(m, len(monos), k, dtype=torch.float64)
    coeff.index_add_(1, target, flat)
    return coeff.permute(2, 1, 0).contiguous()  # [K, S, M]


def _set_product(exp: MaceExport, t: int, block: Any, elem_index: List[int], max_ell: int,
                 basis_cache: Dict[Any, SymmetricBasis]) -> None:
    """Symmetric contraction weights (projected) and the product linear of layer t."""
    prefix = f"products.{t}"
    sc = block.contraction
    irreps_out = sc.irreps_out
    key = (max_ell, sc.correlation, str(irreps_out))
    if key not in basis_cache:
        basis_cache[key] = SymmetricBasis(max_ell, sc.correlation, irreps_out)
    basis = basis_cache[key]
    rec = exp.module(f"{prefix}.symmetric_contractions")
    mace_out = _key_index(rec["irreps_out"])
    agnostic = bool(exp.module(prefix).get("use_agnostic_product"))
    w = sc.weight.detach().clone().double()  # [E, K, C]
    col = 0
    for mi in irreps_out:
        l, p = mi.ir.l, mi.ir.p
        if (l, p) not in mace_out:
            for nu in range(1, sc.correlation + 1):  # an irrep MACE's layer lacks: keep the fresh weights
                col += basis.num_paths(nu, l, p)
            continue
        j = mace_out.index((l, p))
        cpref = f"{prefix}.symmetric_contractions.contractions.{j}"
        corr = int(exp.module(cpref)["correlation"])
        if corr != sc.correlation:
            raise UnsupportedMaceModel(f"{cpref}: correlation {corr} vs {sc.correlation}")
        for nu in range(1, corr + 1):
            kp = basis.num_paths(nu, l, p)
            wname = f"{cpref}.weights_max" if nu == corr else f"{cpref}.weights.{corr - 1 - nu}"
            wm = exp.t(wname)  # [E_mace, K_mace, C]
            u = exp.t(f"{cpref}.U_matrix_{nu}")
            cm = _monomial_coefficients(u, nu, basis.dim, l)  # [K_mace, S, M]
            if kp == 0:
                if float(cm.abs().max() if cm.numel() else 0.0) > 1e-12 and float(wm.abs().max() if wm.numel() else 0) > 0:
                    raise UnsupportedMaceModel(f"{cpref}: ν={nu} coupling with no polarmace counterpart")
                continue
            cp = basis.get(nu, l, p)  # [K_pm, S, M]
            a_pm = cp.reshape(kp, -1).t()  # [S·M, K_pm]
            a_mace = cm.reshape(cm.shape[0], -1).t()  # [S·M, K_mace]
            tmat = torch.linalg.lstsq(a_pm, a_mace).solution  # [K_pm, K_mace]
            resid = float((a_pm @ tmat - a_mace).norm()) / max(float(a_mace.norm()), 1e-300)
            if resid > 1e-8:
                raise UnsupportedMaceModel(f"{cpref}: ν={nu} MACE coupling basis outside polarmace's "
                                           f"(residual {resid:.1e})")
            src = wm[[0] * len(elem_index)] if agnostic else wm[elem_index]
            w[:, col:col + kp] = torch.einsum("jk,ekc->ejc", tmat, src)
            col += kp
    if col != w.shape[1]:
        raise UnsupportedMaceModel(f"{prefix}: {col} product weights mapped, polarmace has {w.shape[1]}")
    with torch.no_grad():
        sc.weight.copy_(w.to(sc.weight.dtype))
    lin_rec = exp.module(f"{prefix}.linear")
    blocks = _linear_blocks(lin_rec, exp.t(f"{prefix}.linear.weight"))
    pm_keys = [(mi.ir.l, mi.ir.p) for mi in irreps_out]
    in_keys, out_keys = _key_index(lin_rec["irreps_in"]), _key_index(lin_rec["irreps_out"])
    _set_channel_linear(block.linear, blocks, {i: pm_keys.index(k) for i, k in enumerate(in_keys) if k in pm_keys},
                        {i: pm_keys.index(k) for i, k in enumerate(out_keys) if k in pm_keys})


def _set_readout(exp: MaceExport, t: int, readout: Any, head: int) -> None:
    prefix = f"readouts.{t}"
    nh = len(exp.meta["heads"])
    with torch.no_grad():
        if exp.cls(prefix) == "LinearReadoutBlock":
            rec = exp.module(f"{prefix}.linear")
            blocks = _linear_blocks(rec, exp.t(f"{prefix}.linear.weight"))
            keys = _key_index(rec["irreps_in"])
            b = blocks[(keys.index((0, 1)), 0)]  # [C, heads]
            readout.weight.copy_((b[:, head] / readout.scale).to(readout.weight.dtype))
            return
        r1, r2 = exp.module(f"{prefix}.linear_1"), exp.module(f"{prefix}.linear_2")
        b1 = _linear_blocks(r1, exp.t(f"{prefix}.linear_1.weight"))[(_key_index(r1["irreps_in"]).index((0, 1)), 0)]
        b2 = _linear_blocks(r2, exp.t(f"{prefix}.linear_2.weight"))[(0, 0)]  # [heads·H, heads]
        hid = b1.shape[1] // nh
        sl = slice(head * hid, (head + 1) * hid) if nh > 1 else slice(0, b1.shape[1])
        cst = float(exp.module(f"{prefix}.non_linearity.acts.0")["cst"])
        readout.w1.copy_((b1[:, sl] / readout.s1).to(readout.w1.dtype))
        readout.w2.copy_((b2[sl, head] * (cst / SILU_NORM) / readout.s2).to(readout.w2.dtype))


def transfer_trunk(exp: MaceExport, model: Any, head: Optional[str] = None) -> None:
    """Overwrite the trunk weights, E0s, scale and shift of `model` (a PolarMACE built from
    `import_config(exp, ...)`) with the MACE model's."""
    trunk = model.trunk
    h = _head_index(exp, head)
    symbols = list(model.config["model"]["elements"])
    elem_index = [exp.symbols.index(s) for s in symbols]
    max_ell = trunk.max_ell
    n = trunk.num_interactions
    c = trunk.num_channels
    nz_pm = len(symbols)
    with torch.no_grad():
        # embedding: Linear(Z x 0e -> C x 0e)
        rec = exp.module("node_embedding.linear")
        emb = _linear_blocks(rec, exp.t("node_embedding.linear.weight"))[(0, 0)]  # [Z, C]
        trunk.embedding.weight.copy_((emb[elem_index] / trunk.embedding.scale).to(trunk.embedding.weight.dtype))
        trunk.radial_embedding.bessel.freqs.copy_(exp.t("radial_embedding.bessel_fn.bessel_weights"))
        # layer 1
        first = trunk.first
        p0 = "interactions.0"
        rec = exp.module(f"{p0}.linear_up")
        _set_channel_linear(first.linear_up, _linear_blocks(rec, exp.t(f"{p0}.linear_up.weight")), {0: 0}, {0: 0})
        pm_paths = [(0, l, l) for l in range(max_ell + 1)]
        cols, mid_map = _tp_path_columns(exp, p0, pm_paths, exp.module(p0)["node_feats_irreps"], trunk.avg_num_neighbors)
        _set_radial(first.radial, exp, f"{p0}.conv_tp_weights", cols)
        targets = [(l, (-1) ** l) for l in range(max_ell + 1)]
        rec = exp.module(f"{p0}.linear")
        out_keys = _key_index(rec["irreps_out"])
        _set_channel_linear(first.linear, _linear_blocks(rec, exp.t(f"{p0}.linear.weight")), mid_map,
                            {i: targets.index(k) for i, k in enumerate(out_keys) if k in targets})
        rec = exp.module(f"{p0}.skip_tp")
        blocks = _tp_blocks(rec, exp.t(f"{p0}.skip_tp.weight"), elem_index)
        if trunk.residual_first:
            _set_element_linear(trunk.first_skip[0], blocks, _key_index(rec["irreps_in1"]), _key_index(rec["irreps_out"]),
                                [(0, 1)], list(trunk.layer_keys[0]))
        else:
            _set_element_linear(first.skip, blocks, _key_index(rec["irreps_in1"]), _key_index(rec["irreps_out"]),
                                targets, targets)
        cache: Dict[Any, SymmetricBasis] = {}
        _set_product(exp, 0, trunk.first_product, elem_index, max_ell, cache)
        _set_readout(exp, 0, trunk.first_readout, h)
        # later layers
        for t in range(1, n):
            block = trunk.interactions[t - 1]
            pre = f"interactions.{t}"
            in_keys = list(block.irreps_in)
            rec = exp.module(f"{pre}.linear_up")
            mk = _key_index(rec["irreps_in"])
            m_map = {i: in_keys.index(k) for i, k in enumerate(mk) if k in in_keys}
            _set_channel_linear(block.linear_up, _linear_blocks(rec, exp.t(f"{pre}.linear_up.weight")), m_map,
                                {i: in_keys.index(k) for i, k in enumerate(_key_index(rec["irreps_out"])) if k in in_keys})
            pm_paths = [(p[0], p[1], p[2]) for p in block.paths]
            # polarmace input index -> the MACE node-feature irreps order used in the lookup
            in_irreps = "+".join(f"1x{l}{'e' if p == 1 else 'o'}" for l, p in in_keys)
            cols, mid_map = _tp_path_columns(exp, pre, pm_paths, in_irreps, trunk.avg_num_neighbors)
            _set_radial(block.radial, exp, f"{pre}.conv_tp_weights", cols)
            rec = exp.module(f"{pre}.linear")
            _set_channel_linear(block.linear, _linear_blocks(rec, exp.t(f"{pre}.linear.weight")), mid_map,
                                {i: targets.index(k) for i, k in enumerate(_key_index(rec["irreps_out"])) if k in targets})
            rec = exp.module(f"{pre}.skip_tp")
            blocks = _tp_blocks(rec, exp.t(f"{pre}.skip_tp.weight"), elem_index)
            _set_element_linear(block.skip, blocks, _key_index(rec["irreps_in1"]), _key_index(rec["irreps_out"]),
                                in_keys, list(trunk.layer_keys[t]))
            _set_product(exp, t, trunk.products[t - 1], elem_index, max_ell, cache)
            _set_readout(exp, t, trunk.readouts[t - 1], h)
        e0 = np.atleast_2d(np.asarray(exp.meta["atomic_energies"], dtype=np.float64))[h]
        model.atomic_energies.copy_(torch.tensor(e0[elem_index], dtype=model.atomic_energies.dtype))
    scale, shift = _scale_shift(exp, h)
    model.set_statistics(scale, shift)
    del nz_pm, c


def import_mace(path: Union[str, Path], variant: str = "sr", head: Optional[str] = None,
                elements: Optional[Sequence[str]] = None, dtype: str = "float64",
                long_range: Optional[Dict[str, Any]] = None) -> Any:
    """Build a PolarMACE from a MACE export file (see the module docstring); returns it in eval mode."""
    from polarmace.model import PolarMACE

    exp = read_export(path)
    cfg = import_config(exp, variant=variant, head=head, elements=elements, dtype=dtype, long_range=long_range)
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        model = PolarMACE(cfg).double()
    finally:
        torch.set_default_dtype(old)
    transfer_trunk(exp, model, head)
    model = model.to(getattr(torch, dtype))
    model.eval()
    return model
