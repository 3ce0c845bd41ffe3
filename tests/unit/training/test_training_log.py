"""The trainer's log handlers live for one run and leave the caller's logging as they found it
(polarmace.training.reporting.training_log)."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from polarmace.training.reporting import training_log

log = logging.getLogger("polarmace.training")


def test_a_run_writes_train_log_and_restores_the_logger(tmp_path: Path, capsys) -> None:
    before = (log.level, log.propagate, list(log.handlers))
    with training_log(tmp_path / "run", is_main=True):
        assert log.propagate is False and len(log.handlers) == len(before[2]) + 2
        log.info("epoch 1 done")
    assert (log.level, log.propagate, list(log.handlers)) == before
    assert "epoch 1 done" in (tmp_path / "run" / "train.log").read_text()
    assert "epoch 1 done" in capsys.readouterr().out


def test_the_logger_is_restored_when_the_run_fails(tmp_path: Path) -> None:
    before = (log.level, log.propagate, list(log.handlers))
    with pytest.raises(RuntimeError, match="diverged"):
        with training_log(tmp_path / "run", is_main=True):
            raise RuntimeError("diverged")
    assert (log.level, log.propagate, list(log.handlers)) == before


def test_after_a_run_records_reach_the_root_logger_again(tmp_path: Path, caplog) -> None:
    """A notebook's (or pytest's) root handler sees the training logger once the run is over."""
    with training_log(tmp_path / "run", is_main=False):
        pass
    with caplog.at_level(logging.INFO):
        log.info("after the run")
    assert "after the run" in caplog.messages
