"""The shared resumable writer of the reference generators (polarmace.reference.chunk_writer):
atomic files, chunk sets that compute only what is missing, the plan guard, and the frame count
of an appended file that cuts off a torn last frame."""

from __future__ import annotations

from pathlib import Path

import pytest

from polarmace.reference import chunk_writer as cw


def test_write_atomic_leaves_the_file_complete_or_absent(tmp_path: Path) -> None:
    out = tmp_path / "sub" / "a.txt"
    cw.partial_path(out).parent.mkdir(parents=True)
    cw.partial_path(out).write_text("torn")  # left by a killed run
    cw.write_text(out, ["one\n", "two\n"])
    assert out.read_text() == "one\ntwo\n" and not cw.partial_path(out).exists()

    def fail(tmp: Path) -> None:
        tmp.write_text("half")
        raise RuntimeError("killed")

    with pytest.raises(RuntimeError):
        cw.write_atomic(tmp_path / "b.txt", fail)
    assert not (tmp_path / "b.txt").exists() and not cw.partial_path(tmp_path / "b.txt").exists()


def _work(job) -> int:
    path, frames, calls = job
    calls.append(path.name)
    cw.write_text(path, [f"{k}\n" for k in range(frames)])
    return frames


def test_run_chunks_computes_only_the_missing_chunks(tmp_path: Path) -> None:
    sizes = [2, 0, 3, 1]
    paths = [tmp_path / f"chunk_{c}.txt" for c in range(len(sizes))]
    calls: list = []
    jobs = [(p, s, calls) for p, s in zip(paths, sizes)]
    assert not cw.run_chunks(paths, sizes, jobs, _work, "test", progress=False, stop_after=1)
    assert calls == ["chunk_0.txt"]
    assert cw.run_chunks(paths, sizes, jobs, _work, "test", progress=False)
    assert calls == ["chunk_0.txt", "chunk_2.txt", "chunk_3.txt"]  # the empty chunk is never computed
    assert cw.run_chunks(paths, sizes, jobs, _work, "test", progress=False) and len(calls) == 3
    assert paths[2].read_text() == "0\n1\n2\n"


def test_check_plan_refuses_chunks_of_another_plan(tmp_path: Path) -> None:
    cw.check_plan(tmp_path, "Plan(seed=0)")
    cw.check_plan(tmp_path, "Plan(seed=0)")
    with pytest.raises(ValueError, match="different plan"):
        cw.check_plan(tmp_path, "Plan(seed=1)")


def test_complete_frames_cuts_off_a_torn_last_frame(tmp_path: Path) -> None:
    out = tmp_path / "frames.extxyz"
    frame = "3\ncomment\nO 0 0 0\nH 1 0 0\nH 0 1 0\n"
    out.write_text(frame * 2 + "3\ncomment\nO 0 0")
    assert cw.complete_frames(out, 3, atoms_per_molecule=3) == 2
    assert out.read_text() == frame * 2
    with pytest.raises(ValueError, match="has 3 atoms, expected 6"):
        cw.complete_frames(out, 6)
    with pytest.raises(ValueError, match="whole molecules"):
        cw.complete_frames(out, atoms_per_molecule=2)
    assert cw.complete_frames(tmp_path / "absent.extxyz") == 0
