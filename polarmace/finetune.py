"""Fine-tuning: start a polarmace-train run from a model file (`model.init_from`), e.g. a MACE
model imported with polarmace-import-mace, optionally with the trunk frozen for the first epochs.

    model:
      init_from: mace_nacl.pt        # polarmace model file (PolarMACE.save / polarmace-import-mace)
      freeze_trunk_epochs: 5         # train only the long-range heads (and nothing of the trunk) first
      init_statistics: model         # E0s, scale, shift of the file ("data": E0s and shift refitted)
    long_range: {variant: les}

What is taken from the file: every trunk hyper-parameter and the element list (they replace the
config's), the trunk weights, and every other weight whose name and shape match (long-range heads
of a file that has them); new heads keep their fresh, small initialisation. The data's elements
must be among the file's. A resumed run takes everything from its checkpoint and does not read the
file again. The trainer calls `initial_model` once, where it builds the model.
"""

from __future__ import annotations

import copy
import logging
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, MutableMapping, Optional, Sequence, Tuple

import torch

__all__ = ["TRUNK_KEYS", "initial_model", "apply_initial_config", "load_initial_weights", "TrunkFreeze"]

log = logging.getLogger("polarmace.training.finetune")  # under the trainer's log handlers

#: model.* keys that define the trunk: a file given by init_from sets all of them.
TRUNK_KEYS = ("r_max", "num_bessel", "num_polynomial_cutoff", "max_ell", "hidden_irreps", "num_interactions",
              "correlation", "radial_mlp", "avg_num_neighbors", "residual_first_block", "readout",
              "readout_mlp_hidden")
_STAT_BUFFERS = ("atomic_energies", "scale", "shift")


def _read(path: str) -> Dict[str, Any]:
    from polarmace.export import read_model_file

    return read_model_file(path)  # ModelFileError naming the file


def apply_initial_config(model_cfg: MutableMapping[str, Any], stats: MutableMapping[str, Any],
                         source: Mapping[str, Any]) -> None:
    """Put the trunk hyper-parameters, elements and (per model.init_statistics) E0s, scale and
    shift of `source` (a model file's blob) into `model_cfg` and `stats`, in place."""
    from polarmace.config import ConfigError

    m = model_cfg["model"]
    src = source["config"]["model"]
    path = m["init_from"]
    data_elements = list(stats.get("elements") or m.get("elements") or [])
    missing = [e for e in data_elements if e not in src["elements"]]
    if missing:
        raise ConfigError(f"invalid value for 'model.init_from': {path} knows {', '.join(src['elements'])}, "
                          f"not {', '.join(missing)} (present in the training data)")
    for key in TRUNK_KEYS:
        if key in src:
            m[key] = copy.deepcopy(src[key])
    m.setdefault("residual_first_block", False)
    m.setdefault("readout", "mlp")
    m["elements"] = list(src["elements"])
    state = source["state_dict"]
    e0_file = {s: float(v) for s, v in zip(src["elements"], state["atomic_energies"].tolist())}
    scale, shift = float(state["scale"]), float(state["shift"])
    if m.get("init_statistics", "model") == "data":
        e0 = dict(e0_file)
        e0.update({s: float(v) for s, v in (stats.get("e0s") or {}).items()})
        m["e0s"] = e0
        stats["e0s"] = e0
        stats["scale"] = scale  # the trunk's weights were trained for its scale
    else:
        m["e0s"] = e0_file
        stats.update(e0s=e0_file, scale=scale, shift=shift)
    stats["elements"] = list(src["elements"])


def load_initial_weights(model: torch.nn.Module, source: Mapping[str, Any], path: str,
                         statistics: bool = True) -> List[str]:
    """Copy the file's weights into `model`: every trunk entry (a mismatch is an error naming it)
    and every other entry whose name and shape match; E0s/scale/shift only with `statistics`.
    Returns the names of the non-trunk parameters that were loaded."""
    from polarmace.config import ConfigError

    src: Mapping[str, torch.Tensor] = source["state_dict"]
    own = model.state_dict()
    params = {name for name, _ in model.named_parameters()}
    loaded: List[str] = []
    with torch.no_grad():
        for name, target in own.items():
            if name.startswith("trunk."):
                if name not in src or tuple(src[name].shape) != tuple(target.shape):
                    have = tuple(src[name].shape) if name in src else "nothing"
                    raise ConfigError(
                        f"invalid value for 'model.init_from': {path} has {have} for {name}, the model needs "
                        f"{tuple(target.shape)}; the long-range variant needs other trunk features (import the "
                        f"MACE model again with --variant {model.config['long_range'].get('variant', 'sr')})")
                target.copy_(src[name].to(target.dtype))
            elif name in _STAT_BUFFERS:
                if statistics and name in src:
                    target.copy_(src[name].to(target.dtype))
            elif name in src and tuple(src[name].shape) == tuple(target.shape):
                target.copy_(src[name].to(target.dtype))
                if name in params:  # (constant buffers such as element tables are not worth a mention)
                    loaded.append(name)
    return loaded


class TrunkFreeze:
    """Keeps the trunk's parameters out of training while epoch < `epochs`.

    A trainer callback (events "step_end", "epoch_end" tell it the epoch) and a forward
    pre-hook on the model (it sets requires_grad of the trunk's parameters before each training
    forward, after the optimizer was built with all of them: a parameter without a gradient is
    left alone by Adam, without weight decay or momentum)."""

    def __init__(self, model: torch.nn.Module, epochs: int, start_epoch: int = 0):
        self.model = model
        self.epochs = int(epochs)
        self.epoch = int(start_epoch)
        self.state: Optional[bool] = None
        model.register_forward_pre_hook(self._hook)

    @property
    def frozen(self) -> bool:
        return self.epoch < self.epochs

    def _hook(self, module: torch.nn.Module, args: Any) -> None:
        if not module.training or self.state == self.frozen:
            return
        self.state = self.frozen
        for p in module.trunk.parameters():
            p.requires_grad_(not self.state)
        log.info("epoch %d: trunk %s", self.epoch + 1,
                 f"frozen (model.freeze_trunk_epochs {self.epochs})" if self.state else "trained")

    def __call__(self, event: str, state: Mapping[str, Any]) -> None:
        if event == "step_end":
            self.epoch = int(state["epoch"])
        elif event == "epoch_end":
            self.epoch = int(state["epoch"]) + 1


def _resumed_epoch(run_dir: Optional[Path]) -> Optional[int]:
    """The epoch a resumed run starts at (from the newest checkpoint's name), None for a new run."""
    if run_dir is None:
        return None
    from polarmace.training.checkpoint import CheckpointHandler

    found = CheckpointHandler(Path(run_dir)).list()
    return max(found)[0] if found else None


def initial_model(factory: Callable, model_cfg: MutableMapping[str, Any], stats: MutableMapping[str, Any],
                  run_dir: Optional[Path] = None, callbacks: Sequence[Callable] = (),
                  device: Optional[torch.device] = None) -> Tuple[torch.nn.Module, Tuple[Callable, ...]]:
    """Build the model as `factory(config, statistics=...)` does; with model.init_from, first take
    the file's trunk (and statistics) into `model_cfg`/`stats` (in place, so that checkpoints
    record them), then its weights. Returns the model and `callbacks`, plus a TrunkFreeze with
    model.freeze_trunk_epochs > 0."""
    m = model_cfg["model"]
    path = m.get("init_from")
    resumed = _resumed_epoch(run_dir)
    source = None
    if path and resumed is None:  # a resumed run has it all in its checkpoint
        source = _read(str(path))
        apply_initial_config(model_cfg, stats, source)
    model = factory(copy.deepcopy(dict(model_cfg)), statistics=copy.deepcopy(dict(stats)))
    if source is not None:
        heads = load_initial_weights(model, source, str(path), statistics=True)
        if m.get("init_statistics", "model") == "data":
            model.atomic_energies.copy_(torch.tensor([float(m["e0s"][s]) for s in m["elements"]],
                                                     dtype=model.atomic_energies.dtype))
            model.set_statistics(stats["scale"], stats["shift"])
        log.info("model.init_from %s: trunk %s, %d layer(s), elements %s; statistics from the %s%s", path,
                 m["hidden_irreps"], m["num_interactions"], " ".join(m["elements"]),
                 m.get("init_statistics", "model"), f"; also loaded {len(heads)} head entries" if heads else "")
    own = getattr(model, "config", None)
    if path and isinstance(own, dict) and isinstance(own.get("model"), dict):
        # the model file stores no paths and no training settings: these keys only start a run
        own["model"].update(init_from=None, freeze_trunk_epochs=0, init_statistics="model")
    if device is not None:
        model = model.to(device)
    out = tuple(callbacks)
    epochs = int(m.get("freeze_trunk_epochs", 0) or 0)
    if path and epochs > 0:
        out = out + (TrunkFreeze(model, epochs, resumed or 0),)
    return model, out
