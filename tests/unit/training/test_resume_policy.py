"""Which training.* values a resumed run takes (polarmace.training.policy.resume_training_section)."""

from __future__ import annotations

import logging

from polarmace.training.policy import resume_training_section

LOGGER = "polarmace.training"


def test_a_key_missing_from_an_older_checkpoint_takes_the_new_value_and_is_logged(caplog):
    saved = {"epochs": 10, "lr": 0.01}  # written before electrostatics_accuracy existed
    new = {"epochs": 20, "lr": 0.01, "electrostatics_accuracy": 1e-4}
    with caplog.at_level(logging.INFO, logger=LOGGER):
        effective, changes = resume_training_section(new, saved)
    assert effective["electrostatics_accuracy"] == 1e-4
    assert changes == {"epochs": (10, 20)}
    lines = [r.getMessage() for r in caplog.records]
    assert ("resume: training.electrostatics_accuracy is not in the checkpoint (written before the key "
            "existed): the run takes 0.0001") in lines
    assert not any("training.lr" in line or "training.epochs" in line for line in lines)


def test_an_ignored_key_keeps_the_checkpoint_value(caplog):
    with caplog.at_level(logging.INFO, logger=LOGGER):
        effective, changes = resume_training_section({"optimizer": "adamw"}, {"optimizer": "adam"})
    assert effective["optimizer"] == "adam" and changes == {}
    assert any("training.optimizer = 'adamw' is ignored" in r.getMessage() for r in caplog.records)
