"""Data: readers (extxyz, n2p2), validation errors, HDF5 round trip, batching, loaders, splits."""

import pickle

import h5py
import numpy as np
import pytest
import torch

from polarmace.cli import prepare
from polarmace.config import ConfigError, KeysConfig, load_config
from polarmace.data import (
    BatchSampler,
    Configuration,
    DataError,
    HDF5Dataset,
    KeySpec,
    collate,
    compute_statistics,
    load_split,
    open_source,
    read_configurations,
    save_split,
    split_indices,
    write_dataset,
)
from polarmace.data import graph as g
from repo_paths import DATASETS, TESTS


def make_loader(dataset, cutoff, batch_size, max_atoms_per_batch=None, shuffle=False, seed=0, num_workers=0,
                dtype=torch.float64, drop_last=False):
    """A DataLoader over `dataset` batched by BatchSampler (the sampler the trainer's batches come from)."""
    import functools

    sizes = [dataset[i].num_atoms for i in range(len(dataset))] if not hasattr(dataset, "num_atoms") \
        else dataset.num_atoms
    sampler = BatchSampler(sizes, batch_size=batch_size, max_size=max_atoms_per_batch, shuffle=shuffle, seed=seed,
                           drop_last=drop_last)
    return torch.utils.data.DataLoader(dataset, batch_sampler=sampler, num_workers=num_workers,
                                       collate_fn=functools.partial(collate, cutoff=float(cutoff), dtype=dtype))

FIXTURE = TESTS / "data" / "labelled.extxyz"

# hand conversion constants (CODATA 2018), independent of polarmace.units
BOHR_IN_ANGSTROM = 0.529177210903
HARTREE_IN_EV = 27.211386245988


def _write(path, text):
    path.write_text(text)
    return path


def _xyz(symbols_positions, header='Properties=species:S:1:pos:R:3 pbc="F F F"'):
    lines = [str(len(symbols_positions)), header]
    lines += [f"{s} {x} {y} {z}" for s, (x, y, z) in symbols_positions]
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------ extxyz reading


def test_fixture_labels_as_stored():
    frames = read_configurations(FIXTURE)
    assert len(frames) == 3
    a, b, c = frames
    # frame 0: triclinic periodic, every label
    assert a.atomic_numbers.tolist() == [8, 1, 1] and a.pbc.tolist() == [True] * 3
    np.testing.assert_allclose(a.cell, [[6, 0, 0], [1, 5.5, 0], [0.5, 0.3, 7]])
    assert a.energy == -14.25 and a.weight == 2.0 and a.total_charge == 0.0
    np.testing.assert_allclose(a.forces[0], [0.1, -0.2, 0.3])
    np.testing.assert_allclose(a.stress, [[0.01, 0.002, 0.003], [0.002, -0.02, 0.004], [0.003, 0.004, 0.005]])
    np.testing.assert_allclose(a.virials, [[-1.5, 0.2, 0.1], [0.2, 1.1, -0.3], [0.1, -0.3, 0.4]])
    np.testing.assert_allclose(a.dipole, [0.1, -0.2, 0.3])
    assert a.bec.shape == (3, 3, 3)  # 9 columns, row-major
    np.testing.assert_allclose(a.bec[0], [[-2.0, 0.1, 0.0], [0.1, -1.9, 0.05], [0.0, 0.05, -1.8]])
    # frame 1: open, total charge from info `charge`, no stress/BEC
    assert b.pbc.tolist() == [False] * 3 and not b.cell.any()
    assert b.total_charge == 1.0 and b.stress is None and b.bec is None and b.virials is None
    assert b.info == {"config_type": "dimer"}
    # frame 2: slab pbc, no energy, initial_charges ignored
    assert c.pbc.tolist() == [True, True, False] and c.energy is None and c.forces.shape == (4, 3)
    np.testing.assert_allclose(c.forces[2], [0.11, 0.12, 0.13])
    assert c.dipole is None


def test_custom_keys_voigt_stress_and_default_total_charge(tmp_path):
    path = _write(tmp_path / "custom.extxyz", "\n".join([
        "2",
        'Properties=species:S:1:pos:R:3:REF_forces:R:3 REF_energy=-2.0 REF_stress="1 2 3 4 5 6" w=0.5 pbc="F F F"',
        "H 0 0 0 1 2 3",
        "H 0 0 0.75 -1 -2 -3",
    ]) + "\n")
    keys = {"energy": "REF_energy", "forces": "REF_forces", "stress": "REF_stress", "weight": "w"}
    (c,) = read_configurations(path, keys, default_total_charge=1.0)
    assert c.energy == -2.0 and c.weight == 0.5 and c.total_charge == 1.0
    np.testing.assert_allclose(c.forces, [[1, 2, 3], [-1, -2, -3]])
    # Voigt order xx yy zz yz xz xy
    np.testing.assert_allclose(c.stress, [[1, 6, 5], [6, 2, 4], [5, 4, 3]])
    with pytest.raises(ConfigError, match="did you mean 'data.keys.forces'"):
        KeySpec.from_config({"force": "F"})


def test_required_label_missing_names_file_frame_and_label():
    with pytest.raises(DataError) as info:
        read_configurations(FIXTURE, required=["energy"])
    assert "labelled.extxyz: frame 2" in str(info.value) and "'energy'" in str(info.value)
    # required labels come with a DataConfig/Config
    config = load_config({"data": {"required_labels": ["stress"]}})
    with pytest.raises(DataError, match="frame 1: required label 'stress'"):
        read_configurations(FIXTURE, config)


def test_nan_force_names_the_frame(tmp_path):
    good = "2\nProperties=species:S:1:pos:R:3:forces:R:3 energy=-1.0 pbc=\"F F F\"\nH 0 0 0 0 0 1\nH 0 0 0.7 0 0 -1\n"
    bad = good.replace("0 0 -1", "0 nan -1")
    path = _write(tmp_path / "nan.extxyz", good + bad)
    with pytest.raises(DataError) as info:
        read_configurations(path)
    message = str(info.value)
    assert "nan.extxyz: frame 1" in message and "forces" in message and "NaN" in message and "atom 1" in message
    path = _write(tmp_path / "nan_energy.extxyz", good.replace("energy=-1.0", "energy=inf"))
    with pytest.raises(DataError, match="frame 0: energy is inf"):
        read_configurations(path)
    path = _write(tmp_path / "nan_pos.extxyz", good + good.replace("H 0 0 0.7", "H 0 0 nan"))
    with pytest.raises(DataError, match="frame 1: positions contains NaN"):
        read_configurations(path)


def test_forces_of_wrong_shape(tmp_path):
    path = _write(tmp_path / "q.extxyz",
                  '2\nProperties=species:S:1:pos:R:3:q:R:1 pbc="F F F"\nH 0 0 0 0.1\nH 0 0 0.7 -0.1\n')
    with pytest.raises(DataError, match=r"frame 0: forces \('q'\) have shape \(2,\), expected \(2, 3\)"):
        read_configurations(path, {"forces": "q"})


def test_unknown_element(tmp_path):
    path = _write(tmp_path / "xx.extxyz", _xyz([("H", (0, 0, 0))]) + _xyz([("H", (0, 0, 0)), ("Xx", (1, 0, 0))]))
    with pytest.raises(DataError, match=r"xx.extxyz: frame 1: unknown element symbol 'Xx'"):
        read_configurations(path)
    dummy = _write(tmp_path / "x.extxyz", _xyz([("H", (0, 0, 0)), ("X", (1, 0, 0))]))
    with pytest.raises(DataError, match="frame 0: unknown element"):
        read_configurations(dummy)


def test_overlapping_atoms(tmp_path):
    path = _write(tmp_path / "close.extxyz", _xyz([("O", (0, 0, 0)), ("H", (1, 0, 0)), ("H", (1.05, 0, 0))]))
    with pytest.raises(DataError, match=r"close.extxyz: frame 0: overlapping atoms 1 \(H\) and 2 \(H\) are 0.0500 Å"):
        read_configurations(path)
    # across the periodic boundary
    periodic = _write(tmp_path / "pbc.extxyz", _xyz(
        [("Na", (0.02, 1, 1)), ("Cl", (3.95, 1, 1))],
        'Lattice="4 0 0 0 4 0 0 0 4" Properties=species:S:1:pos:R:3 pbc="T T T"'))
    with pytest.raises(DataError, match="across the periodic boundary"):
        read_configurations(periodic)
    # the same file with open boundaries is fine
    assert len(read_configurations(periodic, min_distance=None)) == 1
    tiny = _write(tmp_path / "tiny.extxyz", _xyz(
        [("H", (0, 0, 0))], 'Lattice="0.05 0 0 0 4 0 0 0 4" Properties=species:S:1:pos:R:3 pbc="T T T"'))
    with pytest.raises(DataError, match="own periodic image"):
        read_configurations(tiny)


def test_missing_and_unparsable_files(tmp_path):
    with pytest.raises(DataError, match="nothere.xyz: no such file"):
        read_configurations(tmp_path / "nothere.xyz")
    bad = _write(tmp_path / "garbage.xyz", "this is not xyz\n")
    with pytest.raises(DataError, match="garbage.xyz: frame 0: cannot parse"):
        read_configurations(bad)
    cell = _write(tmp_path / "nocell.extxyz", _xyz([("H", (0, 0, 0))], 'Properties=species:S:1:pos:R:3 pbc="T T T"'))
    with pytest.raises(DataError, match="nocell.extxyz: frame 0: pbc is"):
        read_configurations(cell)


def test_to_atoms_round_trip(tmp_path):
    import ase.io

    frames = read_configurations(FIXTURE)
    ase.io.write(tmp_path / "out.extxyz", [c.to_atoms() for c in frames])
    again = read_configurations(tmp_path / "out.extxyz")
    for a, b in zip(frames, again):
        _assert_same(a, b)


# ------------------------------------------------------------------------------ n2p2


N2P2 = """begin
comment periodic water-ish frame
lattice 10.0 0.0 0.0
lattice 0.0 12.0 0.0
lattice 1.0 0.0 14.0
atom 2.0 3.0 4.0 O -0.8 0.0 0.01 -0.02 0.03
atom 3.5 3.0 4.0 H 0.4 0.0 -0.5 0.0 0.0
atom 2.0 4.5 4.0 H 0.4 0.0 0.0 -0.5 0.0
energy -1.0
charge 0.0
end
begin
comment open cation
atom 0.0 0.0 0.0 Na 0.9 0.0 0.0 0.0 0.0
atom 0.0 0.0 5.0 Cl -0.4 0.0 0.0 0.0 0.01
energy -2.5
charge 1.0
end
"""


def test_n2p2_units_are_converted(tmp_path):
    path = _write(tmp_path / "input.data", N2P2)
    a, b = read_configurations(path)
    assert a.pbc.tolist() == [True] * 3 and b.pbc.tolist() == [False] * 3 and not b.cell.any()
    assert a.atomic_numbers.tolist() == [8, 1, 1] and b.atomic_numbers.tolist() == [11, 17]
    np.testing.assert_allclose(a.positions[0], [1.058354421806, 1.5875316327090, 2.1167088436120], rtol=1e-12)
    np.testing.assert_allclose(a.cell[0], [5.29177210903, 0, 0], rtol=1e-12)
    np.testing.assert_allclose(a.cell[2], [0.529177210903, 0, 7.408480952642], rtol=1e-12)
    assert a.energy == pytest.approx(-27.211386245988, rel=1e-12)
    assert b.energy == pytest.approx(-2.5 * HARTREE_IN_EV, rel=1e-12)
    np.testing.assert_allclose(a.forces[0], [0.514220674763259, -1.028441349526518, 1.542662024289777], rtol=1e-12)
    np.testing.assert_allclose(a.forces[1], [-25.711033738162943, 0, 0], rtol=1e-12)
    np.testing.assert_allclose(b.positions[1], [0, 0, 5 * BOHR_IN_ANGSTROM], rtol=1e-12)
    assert a.total_charge == 0.0 and b.total_charge == 1.0
    assert a.info["comment"] == "periodic water-ish frame"
    # already in Å / eV: no conversion; index selection
    (m,) = read_configurations(path, n2p2_units="metal", index=-1)
    assert m.energy == -2.5 and m.positions[1, 2] == 5.0


@pytest.mark.parametrize("text, match", [
    (N2P2.replace(" H 0.4 0.0 0.0 -0.5", " Qq 0.4 0.0 0.0 -0.5"), r"frame 0 \(line 8\): unknown element symbol 'Qq'"),
    (N2P2.rsplit("end", 1)[0], "started at line 12 has no 'end'"),
    (N2P2.replace("charge 1.0", "charge 1.0\nspin 2"), "unknown keyword 'spin'"),
    (N2P2.replace("atom 0.0 0.0 5.0 Cl -0.4 0.0 0.0 0.0 0.01", "atom 0.0 0.0 5.0 Cl -0.4 0.0 0.0 0.0"),
     r"frame 1 \(line 15\): cannot parse"),
    (N2P2.replace("energy -2.5", "energy nan"), "frame 1 .*energy is nan"),
    (N2P2.replace("lattice 1.0 0.0 14.0\n", ""), "2 lattice lines"),
])
def test_n2p2_errors_name_file_and_line(tmp_path, text, match):
    path = _write(tmp_path / "input.data", text)
    with pytest.raises(DataError, match=match) as info:
        read_configurations(path)
    assert "input.data" in str(info.value)


# ------------------------------------------------------------------------------ HDF5


def _assert_same(a: Configuration, b: Configuration):
    np.testing.assert_array_equal(a.atomic_numbers, b.atomic_numbers)
    np.testing.assert_allclose(a.positions, b.positions, rtol=0, atol=1e-12)
    np.testing.assert_allclose(a.cell, b.cell, rtol=0, atol=1e-12)
    np.testing.assert_array_equal(a.pbc, b.pbc)
    for name in ("energy", "forces", "stress", "virials", "dipole", "bec", "external_field"):
        va, vb = getattr(a, name), getattr(b, name)
        assert (va is None) == (vb is None), name
        if va is not None:
            np.testing.assert_allclose(va, vb, rtol=0, atol=1e-12, err_msg=name)
    assert a.total_charge == b.total_charge and a.weight == b.weight


def test_extxyz_to_hdf5_to_batch_round_trip(tmp_path):
    frames = read_configurations(FIXTURE)
    stats = write_dataset(tmp_path / "train.h5", frames, r_max=3.0)
    dataset = HDF5Dataset(tmp_path / "train.h5")
    assert len(dataset) == 3 and dataset.elements == ["H", "C", "O", "Na", "Cl"]
    assert dataset.num_atoms.tolist() == [3, 2, 4]
    assert dataset.statistics == stats and stats["r_max"] == 3.0 and stats["num_atoms"] == 9
    assert dataset.label_mask("energy").tolist() == [True, True, False] and dataset.has_label("bec")
    for k, frame in enumerate(frames):
        _assert_same(frame, dataset[k])
    assert dataset[1].info == {"config_type": "dimer"}
    _assert_same(dataset[-1], frames[-1])
    with pytest.raises(IndexError):
        dataset[3]

    batch = next(iter(make_loader(dataset, cutoff=3.0, batch_size=3)))
    assert torch.equal(batch[g.PTR], torch.tensor([0, 3, 5, 9]))
    assert torch.equal(batch[g.BATCH], torch.tensor([0, 0, 0, 1, 1, 2, 2, 2, 2]))
    assert torch.equal(batch[g.NUM_ATOMS], torch.tensor([3, 2, 4]))
    assert batch[g.POSITIONS].dtype == torch.float64 and batch[g.ATOMIC_NUMBERS].dtype == torch.int64
    np.testing.assert_allclose(batch[g.POSITIONS].numpy(), np.concatenate([f.positions for f in frames]))
    np.testing.assert_allclose(batch[g.CELL].numpy(), np.stack([f.cell for f in frames]))
    assert batch[g.PBC].tolist() == [[True] * 3, [False] * 3, [True, True, False]]
    assert batch[g.TOTAL_CHARGE].tolist() == [0.0, 1.0, 0.0] and batch[g.WEIGHT].tolist() == [2.0, 1.0, 1.0]
    assert batch[g.EXTERNAL_FIELD].shape == (3, 3) and not batch[g.EXTERNAL_FIELD].any()
    assert batch[g.ENERGY].tolist() == [-14.25, -3.5, 0.0] and batch[g.ENERGY_MASK].tolist() == [1.0, 1.0, 0.0]
    assert batch[g.FORCES].shape == (9, 3) and batch[g.FORCES_MASK].tolist() == [1.0] * 9
    np.testing.assert_allclose(batch[g.FORCES].numpy(), np.concatenate([f.forces for f in frames]))
    assert batch[g.STRESS_MASK].tolist() == [1.0, 0.0, 0.0] and batch[g.VIRIALS_MASK].tolist() == [1.0, 0.0, 0.0]
    np.testing.assert_allclose(batch[g.STRESS][0].numpy(), frames[0].stress)
    assert not batch[g.STRESS][1:].any()
    np.testing.assert_allclose(batch[g.DIPOLE][:2].numpy(), [frames[0].dipole, frames[1].dipole])
    assert batch[g.DIPOLE_MASK].tolist() == [1.0, 1.0, 0.0]
    assert batch[g.BEC].shape == (9, 3, 3) and batch[g.BEC_MASK].tolist() == [1.0] * 3 + [0.0] * 6
    np.testing.assert_allclose(batch[g.BEC][:3].numpy(), frames[0].bec)
    # the same batch straight from the list of structures
    direct = collate(frames, cutoff=3.0)
    assert direct.keys() == batch.keys()
    for key in direct:
        assert torch.equal(direct[key], batch[key]), key


def test_labels_absent_from_a_batch_are_absent_from_the_dict():
    frames = read_configurations(FIXTURE)
    graph = collate(frames[1:2], cutoff=3.0, dtype=torch.float32)
    for key in (g.STRESS, g.VIRIALS, g.BEC, g.STRESS_MASK, g.VIRIALS_MASK, g.BEC_MASK):
        assert key not in graph
    assert graph[g.POSITIONS].dtype == torch.float32 and graph[g.ENERGY].dtype == torch.float32
    assert graph[g.SHIFTS].dtype == torch.float32


def test_edges_follow_the_convention_and_match_ase():
    from ase.neighborlist import neighbor_list

    frames = read_configurations(FIXTURE)
    cutoff = 5.0
    graph = collate(frames, cutoff=cutoff)
    i, j = graph[g.EDGE_INDEX]
    vectors = graph[g.POSITIONS][j] - graph[g.POSITIONS][i] + \
        torch.einsum("ea,eab->eb", graph[g.SHIFTS], graph[g.CELL][graph[g.BATCH][i]])
    assert (vectors.norm(dim=1) < cutoff).all()
    assert torch.equal(graph[g.BATCH][i], graph[g.BATCH][j])
    expected = sum(len(neighbor_list("i", f.to_atoms(), cutoff)) for f in frames)
    assert graph[g.EDGE_INDEX].shape[1] == expected


def test_corrupt_hdf5_gives_a_clear_error(tmp_path):
    frames = read_configurations(FIXTURE)
    path = tmp_path / "train.h5"
    write_dataset(path, frames * 50)
    data = path.read_bytes()
    truncated = tmp_path / "truncated.h5"
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match="truncated.h5"):
        HDF5Dataset(truncated)[0]
    garbage = tmp_path / "garbage.h5"
    garbage.write_bytes(b"this is not an HDF5 file" * 10)
    with pytest.raises(DataError, match="garbage.h5: not a readable HDF5 file"):
        HDF5Dataset(garbage)
    with pytest.raises(DataError, match="missing.h5: no such file"):
        HDF5Dataset(tmp_path / "missing.h5")
    other = tmp_path / "other.h5"
    with h5py.File(other, "w") as f:
        f["x"] = np.zeros(3)
    with pytest.raises(DataError, match="other.h5: not a polarmace dataset"):
        HDF5Dataset(other)
    with h5py.File(path, "a") as f:
        f.attrs["format_version"] = 99
    with pytest.raises(DataError, match="train.h5: dataset format version 99"):
        HDF5Dataset(path)


def test_hdf5_dataset_pickles_and_works_in_worker_processes(tmp_path):
    frames = read_configurations(FIXTURE)
    path = tmp_path / "train.h5"
    write_dataset(path, frames * 4, compression="gzip")
    dataset = HDF5Dataset(path)
    assert dataset._file is None  # nothing held open after __init__
    _assert_same(dataset[0], frames[0])  # opens the file in this process
    clone = pickle.loads(pickle.dumps(dataset))
    assert clone._file is None
    _assert_same(clone[4], frames[1])
    serial = list(make_loader(dataset, cutoff=3.0, batch_size=2, shuffle=True, seed=3))
    parallel = list(make_loader(dataset, cutoff=3.0, batch_size=2, shuffle=True, seed=3, num_workers=2))
    assert len(serial) == len(parallel) == 6
    for a, b in zip(serial, parallel):
        assert a.keys() == b.keys()
        assert all(torch.equal(a[k], b[k]) for k in a)


def test_statistics_e0s_force_rms_and_neighbours():
    rng = np.random.default_rng(0)
    e0 = {1: -13.6, 8: -432.1}
    frames = []
    for n_h, n_o in [(2, 1), (4, 1), (2, 2), (6, 3), (1, 3)]:
        z = np.array([1] * n_h + [8] * n_o)
        positions = np.stack(np.meshgrid(*[np.arange(3)] * 3), -1).reshape(-1, 3)[: len(z)] * 1.5
        frames.append(Configuration(z, positions, energy=sum(e0[int(k)] for k in z) + 0.01 * len(z),
                                    forces=rng.normal(size=(len(z), 3))))
    stats = compute_statistics(frames, r_max=2.0)
    assert stats["elements"] == ["H", "O"]
    assert stats["e0s"]["H"] == pytest.approx(-13.6 + 0.01) and stats["e0s"]["O"] == pytest.approx(-432.1 + 0.01)
    assert stats["shift"] == pytest.approx(0.0, abs=1e-10)  # the mean interaction energy per atom
    f = np.concatenate([c.forces for c in frames])
    assert stats["scale"] == pytest.approx(np.sqrt(np.mean(f ** 2)))  # the force RMS
    graph = collate(frames, cutoff=2.0)
    assert stats["avg_num_neighbors"] == pytest.approx(graph[g.EDGE_INDEX].shape[1] / graph[g.POSITIONS].shape[0])
    assert stats["num_structures"] == 5 and stats["num_atoms"] == len(f) and stats["labels"]["forces"] == len(f)
    with pytest.raises(ConfigError, match=r"'model.elements': \['H'\] lacks \['O'\], present in the data"):
        compute_statistics(frames, r_max=2.0, elements=["H"])
    assert compute_statistics([Configuration(c.atomic_numbers, c.positions) for c in frames], r_max=2.0)["e0s"] is None


# ------------------------------------------------------------------------------ batching


def test_batching_by_max_atoms_respects_the_bound():
    sizes = np.random.default_rng(1).integers(1, 40, size=200)
    for batch_size, max_atoms in [(None, 60), (5, 60), (50, 39), (3, None)]:
        sampler = BatchSampler(sizes, batch_size=batch_size, max_size=max_atoms, shuffle=True, seed=7)
        batches = list(sampler)
        assert len(batches) == len(sampler.batches(0))
        flat = np.concatenate(batches)
        assert sorted(flat.tolist()) == list(range(200))  # every structure exactly once
        for batch in batches:
            if max_atoms is not None:
                assert sizes[batch].sum() <= max_atoms
            if batch_size is not None:
                assert len(batch) <= batch_size
        if max_atoms is not None and batch_size is None:  # greedy: a batch closes only when the next one overflows
            order = flat
            ends = np.cumsum([len(b) for b in batches])[:-1]
            for b, end in zip(batches, ends):
                assert sizes[b].sum() + sizes[order[end]] > max_atoms
    with pytest.raises(ValueError, match="structure 0 has size 10"):
        BatchSampler([10, 2], max_size=5)


def test_loader_batches_by_atoms(tmp_path):
    frames = read_configurations(FIXTURE) * 5
    loader = make_loader(frames, cutoff=3.0, batch_size=10, max_atoms_per_batch=7, shuffle=True, seed=0)
    seen = 0
    for batch in loader:
        assert batch[g.POSITIONS].shape[0] <= 7
        seen += batch[g.NUM_ATOMS].shape[0]
    assert seen == 15


def _order(loader):
    return [batch[g.ENERGY].tolist() + batch[g.NUM_ATOMS].tolist() + batch[g.POSITIONS].sum(0).tolist()
            for batch in loader]


def test_loader_is_reproducible_for_a_seed():
    rng = np.random.default_rng(5)
    frames = [Configuration(np.ones(n, dtype=int), rng.uniform(0, 10, size=(n, 3)) + 3 * np.arange(n)[:, None],
                            energy=float(k)) for k, n in enumerate(rng.integers(1, 6, size=40))]
    a = make_loader(frames, cutoff=2.0, batch_size=4, max_atoms_per_batch=12, shuffle=True, seed=11)
    b = make_loader(frames, cutoff=2.0, batch_size=4, max_atoms_per_batch=12, shuffle=True, seed=11)
    c = make_loader(frames, cutoff=2.0, batch_size=4, max_atoms_per_batch=12, shuffle=True, seed=12)
    epochs_a = [_order(a) for _ in range(2)]
    epochs_b = [_order(b) for _ in range(2)]
    assert epochs_a == epochs_b
    assert epochs_a[0] != epochs_a[1]  # a new order each epoch
    assert _order(c) != epochs_a[0]
    a.batch_sampler.set_epoch(1)
    assert _order(a) == epochs_a[1]
    plain = make_loader(frames, cutoff=2.0, batch_size=4)
    energies = [e for batch in plain for e in batch[g.ENERGY].tolist()]
    assert energies == [float(k) for k in range(40)]


# ------------------------------------------------------------------------------ splits


def test_split_indices_and_json(tmp_path):
    split = split_indices(100, valid_fraction=0.1, test_fraction=0.05, seed=3)
    assert [len(split[k]) for k in ("train", "valid", "test")] == [85, 10, 5]
    assert sorted(np.concatenate(list(split.values())).tolist()) == list(range(100))
    again = split_indices(100, 0.1, 0.05, seed=3)
    assert all(np.array_equal(split[k], again[k]) for k in split)
    assert not np.array_equal(split["valid"], split_indices(100, 0.1, 0.05, seed=4)["valid"])
    assert len(split_indices(5, 0.01, 0.0, seed=1)["valid"]) == 1  # a nonzero fraction gets at least one
    path = save_split(tmp_path, split, {"n": 100, "seed": 3})
    assert path == tmp_path / "splits.json"
    loaded = load_split(tmp_path)
    assert all(np.array_equal(split[k], loaded[k]) for k in split) and loaded["metadata"]["seed"] == 3
    with pytest.raises(ValueError, match="no training structures"):
        split_indices(2, 0.5, 0.4, seed=0)
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(DataError, match="bad.json"):
        load_split(tmp_path / "bad.json")
    (tmp_path / "dup.json").write_text('{"train": [0, 1], "valid": [1], "test": []}')
    with pytest.raises(DataError, match="twice"):
        load_split(tmp_path / "dup.json")


# ------------------------------------------------------------------------------ CLI


def test_prepare_cli(tmp_path, capsys):
    out = tmp_path / "train.h5"
    n2p2 = _write(tmp_path / "input.data", N2P2)
    assert prepare.main([str(FIXTURE), str(n2p2), "-o", str(out), "--r-max", "3", "--no-progress"]) == 0
    dataset = HDF5Dataset(out)
    assert len(dataset) == 5 and dataset.statistics["avg_num_neighbors"] is not None
    assert "wrote" in capsys.readouterr().out
    assert isinstance(open_source(out, {}), HDF5Dataset)
    assert len(open_source(FIXTURE, {})) == 3
    with pytest.raises(DataError, match="required label 'stress'"):
        open_source(out, {"required_labels": ["stress"]})

    assert prepare.main([str(FIXTURE), "-o", str(out), "--keys", "energi=E", "--no-progress"]) == 2
    assert "unknown label 'energi'; did you mean 'energy'?" in capsys.readouterr().err
    assert prepare.main([str(FIXTURE), "-o", str(out), "--required", "stress", "--no-progress"]) == 2
    assert "frame 1: required label 'stress' is missing" in capsys.readouterr().err

    config = tmp_path / "c.yaml"
    config.write_text("model:\n  r_max: 2.5\ndata:\n  default_total_charge: 1\n  keys:\n    energy: nothing\n")
    assert prepare.main([str(FIXTURE), "-o", str(out), "--config", str(config), "--no-progress"]) == 0
    dataset = HDF5Dataset(out)
    assert dataset.statistics["r_max"] == 2.5 and dataset.statistics["e0s"] is None
    assert [dataset[i].total_charge for i in range(3)] == [0.0, 1.0, 1.0]


# ------------------------------------------------------------------------------ reference data


def _shared(relative):
    path = DATASETS / relative
    if not path.exists():
        pytest.skip(f"reference data {relative} not available")
    return path


def test_real_water16():
    frames = read_configurations(_shared("water_rpbe_d3/water16_rpbe_d3_20.extxyz"))
    assert len(frames) == 20
    for c in frames:
        assert c.num_atoms == 48 and c.pbc.all() and c.forces.shape == (48, 3)
        assert sorted(np.bincount(c.atomic_numbers).nonzero()[0].tolist()) == [1, 8]
        assert c.total_charge == 0.0 and np.isfinite(c.energy) and c.bec is None and c.stress is None
    assert frames[0].energy == pytest.approx(-33339.98035483936)


def test_real_carbon_chain_total_charges(tmp_path):
    frames = read_configurations(_shared("carbon_chain/carbon_chain_4g_128.extxyz"))
    assert len(frames) == 128
    for c in frames:
        assert c.num_atoms in (12, 13) and not c.pbc.any()
        # C10H2 is neutral, C10H3+ carries +1
        assert c.total_charge == c.num_atoms - 12
    assert {c.total_charge for c in frames} == {0.0, 1.0}
    write_dataset(tmp_path / "cc.h5", frames, r_max=5.0)
    batch = next(iter(make_loader(HDF5Dataset(tmp_path / "cc.h5"), cutoff=5.0, batch_size=128)))
    assert batch[g.TOTAL_CHARGE].tolist() == [c.total_charge for c in frames]
    assert batch[g.POSITIONS].shape[0] == sum(c.num_atoms for c in frames)


def test_real_nacl_format_sample_with_default_total_charge():
    path = _shared("nacl/test_NaCl_first2_FORMAT_SAMPLE.xyz")
    data = load_config({}, ["data.default_total_charge=1"]).data
    frames = read_configurations(path, data, default_total_charge=data.default_total_charge)
    assert [c.num_atoms for c in frames] == [17, 16]
    assert [c.total_charge for c in frames] == [1.0, 1.0]
    assert all(c.forces.shape == (c.num_atoms, 3) and c.energy is not None for c in frames)
    assert all("initial_charges" not in c.info for c in frames)
    assert [c.total_charge for c in read_configurations(path)] == [0.0, 0.0]


def test_keyspec_accepts_the_config_objects():
    assert KeySpec.from_config(None).key("bec") == "BEC"
    assert KeySpec.from_config(KeysConfig(bec="Z")).key("bec") == "Z"
    config = load_config({"data": {"keys": {"energy": "E"}, "required_labels": ["forces"]}})
    spec = KeySpec.from_config(config)
    assert spec.key("energy") == "E" and spec.required == ("forces",)
    assert KeySpec.from_config(config.data, required=()).required == ()
