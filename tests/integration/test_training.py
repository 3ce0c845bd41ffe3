"""Training end to end: the trainer with missing labels, CLI train/eval, kill-and-resume bitwise,
DDP gradients, the time budget, resumes and the run-directory lock. (The loss, EMA and
checkpoint pieces on their own: tests/unit/training/test_loss_ema_checkpoint.py.)"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

import toy_model
from polarmace.training.checkpoint import CheckpointHandler
from polarmace.training.loss import WeightedLoss
from repo_paths import ROOT, TESTS
from toy_data import make_dataset, toy_config, write_yaml


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    return make_dataset(tmp_path_factory.mktemp("data") / "cu_au.xyz")



# ----------------------------------------------------------------------------- trainer, labels
def test_missing_label_through_the_trainer(dataset, tmp_path):
    from polarmace.training.trainer import train

    cfg = toy_config(dataset, tmp_path / "run", epochs=1)
    cfg["training"]["loss_weights"]["dipole"] = 3.0  # the data has no dipoles
    cfg["output"]["plots"] = False
    with pytest.warns(UserWarning, match="'dipole' \\(weight 3\\).*absent from the training data"):
        train(cfg, model_factory=toy_model.build_toy_model)
    log = (tmp_path / "run" / "train.log").read_text()
    assert "active loss terms: energy=1, forces=10, stress=1" in log


# ------------------------------------------------------------------------------- CLI runs
def _check_run_outputs(run: Path, name: str = "toy") -> None:
    assert list(run.glob("checkpoint-e*-s*.pt")), "no checkpoint written"
    assert (run / f"{name}.model").is_file()
    rows = json.loads((run / "metrics.json").read_text())
    assert [r["epoch"] for r in rows] == [1, 2]
    assert {"train_loss", "valid_loss", "valid_E_rmse", "valid_F_mae", "lr"} <= set(rows[0])
    assert (run / "metrics.csv").read_text().splitlines()[0].startswith("epoch,")
    assert (run / "config.yaml").is_file() and (run / "splits.json").is_file()
    final = json.loads((run / "final_metrics.json").read_text())
    assert "test" in final and "E_rmse" in final["test"]


def _check_eval_outputs(out: Path, n_frames: int) -> None:
    import ase.io

    metrics = json.loads((out / "metrics.json").read_text())["metrics"]
    assert {"E_mae", "E_rmse", "F_mae", "F_rmse", "S_rmse"} <= set(metrics)
    frames = ase.io.read(str(out / "predictions.xyz"), ":")
    assert len(frames) == n_frames
    assert frames[0].get_forces().shape == (len(frames[0]), 3)
    assert np.isfinite(frames[0].get_potential_energy())
    pytest.importorskip("matplotlib")
    assert (out / "parity_energy.png").is_file() and (out / "parity_forces.png").is_file()


def test_two_epoch_cli_run_and_eval_with_the_toy_model(dataset, tmp_path, capsys):
    from polarmace.cli import eval as eval_cli
    from polarmace.cli import train as train_cli

    cfg = write_yaml(toy_config(dataset, tmp_path / "run"), tmp_path / "cfg.yaml")
    rc = train_cli.main([str(cfg), "--model-factory", "toy_model:build_toy_model", "training.lr=0.02"])
    assert rc == 0
    run = tmp_path / "run"
    _check_run_outputs(run)
    assert yaml.safe_load((run / "config.yaml").read_text())["training"]["lr"] == 0.02
    rc = eval_cli.main(["--model", str(run / "toy.model"), "--data", str(dataset), "--output", str(tmp_path / "ev"),
                        "--model-class", "toy_model:ToyModel"])
    assert rc == 0
    assert "E_rmse" in capsys.readouterr().out
    _check_eval_outputs(tmp_path / "ev", 20)
    # a second run into the same directory without --resume is refused, not silently overwritten
    assert train_cli.main([str(cfg), "--model-factory", "toy_model:build_toy_model"]) == 2


def test_cli_missing_data_file_is_a_clean_error(dataset, tmp_path, capsys, monkeypatch):
    from polarmace.cli import train as train_cli

    cfg = toy_config(dataset, tmp_path / "run")
    cfg["data"]["train"] = "no/such/train.xyz"
    path = write_yaml(cfg, tmp_path / "cfg.yaml")
    monkeypatch.chdir(tmp_path)
    assert train_cli.main([str(path), "--model-factory", "toy_model:build_toy_model"]) == 2
    err = capsys.readouterr().err
    assert "no/such/train.xyz" in err and str(tmp_path) in err and "Traceback" not in err
    assert not (tmp_path / "run" / "toy.model").exists()


def test_two_epoch_cli_run_and_eval_with_polarmace(dataset, tmp_path):
    from polarmace.cli import eval as eval_cli
    from polarmace.cli import train as train_cli

    cfg = toy_config(dataset, tmp_path / "run")
    cfg["model"].update({"hidden_irreps": "8x0e+8x1o", "max_ell": 1, "correlation": 2, "num_interactions": 1,
                         "radial_mlp": [8]})
    cfg["long_range"] = {"variant": "sr"}
    cfg_path = write_yaml(cfg, tmp_path / "cfg.yaml")
    assert train_cli.main([str(cfg_path)]) == 0
    _check_run_outputs(tmp_path / "run")
    # the model of the last checkpoint, with its EMA weights, is the model the run saved (the
    # last epoch was the best one here: asserted, so that the comparison means something)
    from polarmace.model import PolarMACE

    assert json.loads((tmp_path / "run" / "metrics.json").read_text())[-1]["valid_loss"] == min(
        row["valid_loss"] for row in json.loads((tmp_path / "run" / "metrics.json").read_text()))
    saved = PolarMACE.load(str(tmp_path / "run" / "toy.model"))
    from_ckpt = PolarMACE.from_checkpoint(str(CheckpointHandler(tmp_path / "run").latest()))
    for key, value in saved.state_dict().items():
        assert torch.equal(value, from_ckpt.state_dict()[key]), key
    assert from_ckpt.statistics == saved.statistics and "scale" in saved.statistics
    assert eval_cli.main(["--model", str(tmp_path / "run" / "toy.model"), "--data", str(dataset),
                          "--output", str(tmp_path / "ev")]) == 0
    _check_eval_outputs(tmp_path / "ev", 20)


# ---------------------------------------------------------------------- kill and resume
_DRIVER = textwrap.dedent("""
    import os, signal, sys
    sys.path.insert(0, {tests!r})
    import toy_model
    from polarmace.training.trainer import train

    kill_at = int(sys.argv[2])
    count = [0]

    def killer(event, state):
        if event == "step_end":
            count[0] += 1
            if count[0] == kill_at:
                os.kill(os.getpid(), signal.SIGKILL)

    train(sys.argv[1], model_factory=toy_model.build_toy_model, checkpoint_steps=2,
          callbacks=[killer] if kill_at > 0 else [], resume="--resume" in sys.argv)
""")


def _final_state(run: Path):
    handler = CheckpointHandler(run)
    state = handler.load()
    blob = torch.load(run / "toy.model", weights_only=False)
    return state, blob["state_dict"]


def test_sigkill_mid_epoch_then_resume_is_bitwise_identical(dataset, tmp_path):
    driver = tmp_path / "driver.py"
    driver.write_text(_DRIVER.format(tests=str(TESTS)))
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    common = dict(epochs=4, stage_two={"start_epoch": 2, "energy_weight": 100.0, "forces_weight": 10.0, "lr": 0.005})
    cfgs = {}
    for name in ("straight", "killed"):
        cfg = toy_config(dataset, tmp_path / name, **common)
        cfg["output"]["plots"] = False
        cfgs[name] = write_yaml(cfg, tmp_path / f"{name}.yaml")
    # 14 train configurations, batch 4 -> 4 steps per epoch; kill at global step 7 = epoch 2, step 3
    # (after the step-2 checkpoint, so step 3 is lost and redone)
    straight = subprocess.run([sys.executable, str(driver), str(cfgs["straight"]), "0"], env=env,
                              capture_output=True, text=True, timeout=300)
    assert straight.returncode == 0, straight.stdout + straight.stderr
    killed = subprocess.run([sys.executable, str(driver), str(cfgs["killed"]), "7"], env=env,
                            capture_output=True, text=True, timeout=300)
    assert killed.returncode == -signal.SIGKILL, killed.stdout + killed.stderr
    latest = CheckpointHandler(tmp_path / "killed").load()
    assert (latest["epoch"], latest["step"]) == (1, 2)
    resumed = subprocess.run([sys.executable, str(driver), str(cfgs["killed"]), "0", "--resume"], env=env,
                             capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert "resumed at epoch 1 step 2" in resumed.stdout
    (sa, ma), (sb, mb) = _final_state(tmp_path / "straight"), _final_state(tmp_path / "killed")
    for key in sa["model"]:
        assert torch.equal(sa["model"][key], sb["model"][key]), key
    for key in ma:
        assert torch.equal(ma[key], mb[key]), key
    for key in sa["ema"]["shadow"]:
        assert torch.equal(sa["ema"]["shadow"][key], sb["ema"]["shadow"][key]), key
    assert sa["ema"]["num_updates"] == sb["ema"]["num_updates"] == 16
    assert sa["optimizer"]["param_groups"][0]["lr"] == sb["optimizer"]["param_groups"][0]["lr"]
    strip = lambda rows: [{k: v for k, v in r.items() if k != "time_s"} for r in rows]  # noqa: E731
    assert strip(sa["history"]) == strip(sb["history"])


# ------------------------------------------------------------------------------------ DDP
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _global_batch(data_path: str):
    from polarmace.data.atoms import read_configurations
    return read_configurations(data_path)[:6]


def _ddp_worker(rank: int, world: int, port: int, data_path: str, out_dir: str) -> None:
    import torch.distributed as dist

    from polarmace.training import distributed as ddp
    from polarmace.data.graph import collate
    from polarmace.training.loop import train_step

    torch.set_default_dtype(torch.float64)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        info = ddp.DistInfo(rank, world, rank, "gloo")
        configs = _global_batch(data_path)
        mine = ddp.shard(list(range(len(configs))), rank, world)
        graph = collate([configs[i] for i in mine], 4.0)
        model = toy_model.ToyModel({"model": {"elements": ["Cu", "Au"], "r_max": 4.0, "num_bessel": 6, "seed": 1}})
        loss_fn = WeightedLoss({"energy": 1.0, "forces": 10.0, "stress": 1.0})
        loss_fn.resolve(["energy", "forces", "stress"], log_active=False)
        opt = torch.optim.SGD(model.parameters(), lr=0.0)
        res = train_step(model, opt, loss_fn, graph, info, None, None, torch.float64, torch.device("cpu"))
        if rank == 0:
            torch.save({"loss": res.loss, "grads": {n: p.grad.clone() for n, p in model.named_parameters()}},
                       os.path.join(out_dir, "ddp.pt"))
        dist.barrier()  # no rank tears gloo down while its peer still talks to it
    finally:
        dist.destroy_process_group()


def test_ddp_gradients_equal_single_process_on_the_global_batch(dataset, tmp_path):
    import torch.multiprocessing as mp

    from polarmace.training import distributed as ddp
    from polarmace.data.graph import collate
    from polarmace.training.loop import train_step

    mp.spawn(_ddp_worker, args=(2, _free_port(), str(dataset), str(tmp_path)), nprocs=2, join=True)
    ddp_result = torch.load(tmp_path / "ddp.pt", weights_only=False)

    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        configs = _global_batch(str(dataset))
        graph = collate(configs, 4.0)
        model = toy_model.ToyModel({"model": {"elements": ["Cu", "Au"], "r_max": 4.0, "num_bessel": 6, "seed": 1}})
        loss_fn = WeightedLoss({"energy": 1.0, "forces": 10.0, "stress": 1.0})
        loss_fn.resolve(["energy", "forces", "stress"], log_active=False)
        opt = torch.optim.SGD(model.parameters(), lr=0.0)
        res = train_step(model, opt, loss_fn, graph, ddp.DistInfo(), None, None, torch.float64, torch.device("cpu"))
    finally:
        torch.set_default_dtype(old)
    assert ddp_result["loss"] == pytest.approx(res.loss, rel=1e-12)
    for name, p in model.named_parameters():
        torch.testing.assert_close(ddp_result["grads"][name], p.grad, rtol=1e-12, atol=1e-14)
        assert p.grad.abs().sum() > 0


# ------------------------------------------------------------------------ wall-time budget
class _FakeClock:
    """Replaces the training loop's `time` module; every optimiser step costs exactly 1 s."""

    def __init__(self, monkeypatch):
        from polarmace.training import loop

        self.now = 1000.0
        step = loop.train_step

        def timed_step(*args, **kwargs):
            self.now += 1.0
            return step(*args, **kwargs)

        monkeypatch.setattr(loop, "time", self)
        monkeypatch.setattr(loop, "train_step", timed_step)

    def time(self) -> float:
        return self.now


def _budget_config(dataset: Path, out: Path, **training) -> dict:
    # 20 frames -> 14 train; batch 4 -> 4 steps = 4 fake seconds per epoch
    cfg = toy_config(dataset, out, epochs=100, max_time=10.0, **training)
    cfg["output"]["plots"] = False
    return cfg


def test_max_time_stops_after_the_epoch_that_passes_the_budget(dataset, tmp_path, monkeypatch):
    from polarmace.config import ConfigError, load_config
    from polarmace.training import trainer

    with pytest.raises(ConfigError, match="training.max_time"):
        load_config({"training": {"max_time": 0}})
    _FakeClock(monkeypatch)
    result = trainer.train(_budget_config(dataset, tmp_path / "run"), model_factory=toy_model.build_toy_model)
    run = tmp_path / "run"
    # epochs end at 4, 8, 12 fake seconds: the third passes the 10 s budget
    assert [r["epoch"] for r in result.history] == [1, 2, 3]
    assert [r["time_s"] for r in result.history] == [4.0, 4.0, 4.0]
    assert "valid_loss" in result.history[-1]  # the last epoch is always validated
    assert (run / "toy.model").is_file() and (run / "best.pt").is_file()
    final = json.loads((run / "final_metrics.json").read_text())
    assert {"E_rmse", "F_rmse"} <= set(final["test"]) and result.test_metrics == final["test"]
    log = (run / "train.log").read_text()
    assert "time budget: 12.0 s of training >= training.max_time 10 s after epoch 3: stopping" in log
    assert CheckpointHandler(run).load()["finished"]


def test_max_time_moves_the_stage_two_start_to_a_fraction_of_the_budget(dataset, tmp_path, monkeypatch):
    from polarmace.training import trainer

    stage_two = {"start_fraction": 0.5, "energy_weight": 100.0, "forces_weight": 10.0, "lr": 0.003}
    clock = _FakeClock(monkeypatch)
    straight = trainer.train(_budget_config(dataset, tmp_path / "straight", stage_two=stage_two),
                             model_factory=toy_model.build_toy_model)
    # by epochs, stage two would start at epoch 50 of 100; by time it starts with the first epoch
    # beginning after 0.5 x 10 s: epochs begin at 0, 4, 8 s -> the third epoch
    assert [r["stage"] for r in straight.history] == [1, 1, 2]
    assert straight.history[-1]["lr"] == pytest.approx(0.003)
    assert "stage two from epoch 2 (8 s of the 10 s budget)" in (tmp_path / "straight" / "train.log").read_text()

    # interrupted in the middle of epoch 2 (after its step-2 checkpoint) and resumed: the
    # elapsed time comes back from the checkpoint, so the stages and the stop are the same
    class Interrupt(Exception):
        pass

    def interrupt(event, state):
        if event == "step_end" and state["epoch"] == 1 and state["step"] == 3:
            raise Interrupt

    cfg = _budget_config(dataset, tmp_path / "killed", stage_two=stage_two)
    with pytest.raises(Interrupt):
        trainer.train(cfg, model_factory=toy_model.build_toy_model, callbacks=[interrupt],
                      checkpoint_steps=2)
    clock.now += 500.0  # wall time while the run was down does not count
    resumed = trainer.train(cfg, model_factory=toy_model.build_toy_model, checkpoint_steps=2, resume=True)
    assert [r["stage"] for r in resumed.history] == [1, 1, 2]
    assert [r["time_s"] for r in resumed.history] == [4.0, 4.0, 4.0]
    assert [r["train_loss"] for r in resumed.history] == [r["train_loss"] for r in straight.history]


def test_a_finished_run_continues_when_resumed_with_more_epochs(dataset, tmp_path):
    from polarmace.cli import train as train_cli

    cfg = write_yaml(toy_config(dataset, tmp_path / "run"), tmp_path / "cfg.yaml")
    factory = ["--model-factory", "toy_model:build_toy_model"]
    assert train_cli.main([str(cfg)] + factory) == 0
    assert len(_final_state(tmp_path / "run")[0]["history"]) == 2
    # the same limit: nothing more to do; a raised limit: two more epochs
    assert train_cli.main([str(cfg), "--resume"] + factory) == 0
    assert len(_final_state(tmp_path / "run")[0]["history"]) == 2
    assert train_cli.main([str(cfg), "--resume", "training.epochs=4"] + factory) == 0
    state = _final_state(tmp_path / "run")[0]
    assert [row["epoch"] for row in state["history"]] == [1, 2, 3, 4]


# ------------------------------------------------------------ resume, epochs 0, intervals, lock
def _toy(dataset: Path, out: Path, **training) -> dict:
    cfg = toy_config(dataset, out, **training)
    cfg["output"]["plots"] = False
    return cfg


def test_resume_applies_a_changed_lr_and_reports_ignored_keys(dataset, tmp_path):
    """training.lr=0.05 on resume is the lr of the next epochs (the restored optimizer state
    used to keep 0.01); a key that cannot change (optimizer) is reported as ignored."""
    from polarmace.training import trainer

    cfg = _toy(dataset, tmp_path / "run", epochs=1, lr=0.01)
    trainer.train(cfg, model_factory=toy_model.build_toy_model)
    cfg["training"].update(epochs=3, lr=0.05, optimizer="adamw", weight_decay=0.001)
    result = trainer.train(cfg, model_factory=toy_model.build_toy_model, resume=True)
    assert [row["lr"] for row in result.history] == pytest.approx([0.01, 0.05, 0.05])
    log = (tmp_path / "run" / "train.log").read_text()
    assert "resume: training.lr changed from 0.01 to 0.05: applied (the optimizer continues at lr 0.05)" in log
    assert "resume: training.optimizer = 'adamw' is ignored (the run keeps 'adam')" in log
    state = CheckpointHandler(tmp_path / "run").load()
    assert state["optimizer"]["param_groups"][0]["weight_decay"] == 0.001
    # the checkpoint records what is in effect: resuming again reports no change
    assert state["config"]["training"]["lr"] == 0.05 and state["config"]["training"]["optimizer"] == "adam"
    trainer.train(cfg, model_factory=toy_model.build_toy_model, resume=True)
    assert (tmp_path / "run" / "train.log").read_text().count("training.lr changed") == 1


def test_zero_epochs_trains_nothing_and_a_resume_can_train(dataset, tmp_path):
    from polarmace.training import trainer

    cfg = _toy(dataset, tmp_path / "run", epochs=0)
    result = trainer.train(cfg, model_factory=toy_model.build_toy_model)
    assert result.history == [] and result.model_path.is_file()
    assert "E_rmse" in json.loads((tmp_path / "run" / "final_metrics.json").read_text())["test"]
    state = CheckpointHandler(tmp_path / "run").load()
    assert state["finished"] and state["epoch"] == 0
    cfg["training"]["epochs"] = 1
    assert len(trainer.train(cfg, model_factory=toy_model.build_toy_model, resume=True).history) == 1


def test_checkpoint_interval_is_the_epochs_between_checkpoints(dataset, tmp_path):
    from polarmace.training import trainer

    cfg = _toy(dataset, tmp_path / "run", epochs=5)
    cfg["output"].update(checkpoint_interval=2, keep_checkpoints=10)
    trainer.train(cfg, model_factory=toy_model.build_toy_model)
    # every second epoch, and the last one
    assert [epoch for epoch, _, _ in CheckpointHandler(tmp_path / "run").list()] == [2, 4, 5]


def test_final_evaluation_resumed_uses_the_last_stage_loss_weights(dataset, tmp_path):
    """A run killed during its final evaluation and resumed recomputes the same table (the
    loss column used stage-one weights)."""
    from polarmace.training import trainer

    cfg = _toy(dataset, tmp_path / "run", epochs=2,
               stage_two={"start_epoch": 1, "energy_weight": 1000.0, "forces_weight": 1.0, "lr": 0.005})
    trainer.train(cfg, model_factory=toy_model.build_toy_model)
    path = tmp_path / "run" / "final_metrics.json"
    first = json.loads(path.read_text())
    path.unlink()  # as if killed before the table was written
    (tmp_path / "run" / "toy.model").unlink()
    trainer.train(cfg, model_factory=toy_model.build_toy_model, resume=True)
    assert json.loads(path.read_text()) == first


def test_a_second_run_in_a_locked_directory_names_the_holder_and_writes_nothing(dataset, tmp_path):
    from polarmace.errors import RunLockedError
    from polarmace.training import trainer
    from polarmace.training.lock import RunLock

    run = tmp_path / "run"
    with RunLock(run, "polarmace-train"):
        with pytest.raises(RunLockedError, match=rf"{run} is in use by another run \(polarmace-train pid {os.getpid()}"):
            trainer.train(_toy(dataset, run, epochs=1), model_factory=toy_model.build_toy_model)
        assert [p.name for p in run.iterdir()] == [".lock"]
    trainer.train(_toy(dataset, run, epochs=1), model_factory=toy_model.build_toy_model)  # free again


# ------------------------------------------------------------ electrostatics accuracy in training
def _accuracies_seen(monkeypatch) -> list:
    """(module in training mode, engine accuracy) of every Electrostatics call from now on."""
    from polarmace.electrostatics.engine import Electrostatics

    seen = []
    original = Electrostatics.forward

    def spy(self, *args, **kwargs):
        seen.append((torch.is_grad_enabled() and self.training, self.accuracy))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(Electrostatics, "forward", spy)
    return seen


@pytest.mark.parametrize("train_accuracy, model_accuracy, expected", [
    (1e-4, 1e-6, 1e-4),    # the steps sum more loosely than the model
    (None, 1e-6, 1e-6),    # null: the model's own
    (1e-4, 1e-3, 1e-3),    # never tighter than the model's own
])
def test_optimiser_steps_use_the_training_electrostatics_accuracy(dataset, tmp_path, monkeypatch,
                                                                  train_accuracy, model_accuracy, expected):
    from polarmace.model import PolarMACE
    from polarmace.training.trainer import train

    cfg = toy_config(dataset, tmp_path / "run", epochs=1, electrostatics_accuracy=train_accuracy)
    cfg["model"].update({"hidden_irreps": "8x0e+8x1o", "max_ell": 1, "correlation": 2, "num_interactions": 1,
                         "radial_mlp": [8]})
    cfg["long_range"] = {"variant": "les", "accuracy": model_accuracy}
    cfg["output"]["plots"] = False
    seen = _accuracies_seen(monkeypatch)
    train(cfg)
    steps = {acc for training, acc in seen if training}
    others = {acc for training, acc in seen if not training}
    assert steps == {expected}
    # validation, the final test evaluation and the saved model keep long_range.accuracy
    assert others == {model_accuracy}
    saved = PolarMACE.load(str(tmp_path / "run" / "toy.model"))
    assert saved.engine.accuracy == model_accuracy
