"""Fine-tuning an imported MACE model: the same MACE trunk continued without electrostatics (sr)
and with latent charges (les), on the shipped exact-truth NaCl melt.

    python benchmarks/finetune_mace.py --model mace_nacl.pt --out runs/finetune_mace [--epochs 20]

`--model` is a polarmace file written by polarmace-import-mace (sr variant). Both runs use the
quickstart split and loss (energies and forces only), `model.init_from` (trunk, E0s, scale and
shift from the file) and, for les, `model.freeze_trunk_epochs` (first the charge head alone). The
test errors of the imported model before any fine-tuning are printed too, and for les the learned
charges and BEC R² against the exact truth (q = ±1, Z* = q·I). Writes <out>/finetune.json.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "configs" / "data" / "quickstart_nacl_melt.xyz"


def config(variant: str, model: str, out: Path, epochs: int, freeze: int, lr: float) -> dict:
    return {
        "model": {"init_from": model, "freeze_trunk_epochs": freeze, "init_statistics": "model", "dtype": "float64"},
        "long_range": {"variant": variant, "sigma": 1.0},
        "data": {"train": str(DATA), "valid_fraction": 0.1, "test_fraction": 0.1, "batch_size": 8, "seed": 1},
        "training": {"epochs": epochs, "lr": lr, "scheduler": "plateau", "scheduler_patience": 10,
                     "loss_weights": {"energy": 1.0, "forces": 100.0, "stress": 0.0, "dipole": 0.0, "bec": 0.0},
                     "ema_decay": 0.99, "seed": 1},
        "output": {"name": variant, "directory": str(out / variant)},
    }


def run(cfg: dict, via_factory: bool) -> dict:
    """Train; with `via_factory` the init_from logic runs in a model factory (for trainers that do
    not call polarmace.finetune.initial_model themselves); same weights either way."""
    from polarmace import build_model
    from polarmace.finetune import initial_model
    from polarmace.training.trainer import train

    t0 = time.time()
    if not via_factory:
        result = train(cfg)
    else:
        wanted = copy.deepcopy(cfg["model"])
        cfg = copy.deepcopy(cfg)
        cfg["model"].update(init_from=None, freeze_trunk_epochs=0)
        extra: list = []

        def factory(c, statistics):
            c["model"].update(init_from=wanted["init_from"], freeze_trunk_epochs=wanted["freeze_trunk_epochs"],
                              init_statistics=wanted["init_statistics"])
            model, cbs = initial_model(build_model, c, statistics)
            extra[:] = list(cbs)
            return model

        result = train(cfg, model_factory=factory, callbacks=[lambda e, s: [cb(e, s) for cb in extra]])
    out = Path(cfg["output"]["directory"])
    metrics = json.loads((out / "final_metrics.json").read_text()) if (out / "final_metrics.json").exists() else {}
    electrical = json.loads((out / "electrical.json").read_text()) if (out / "electrical.json").exists() else None
    return {"seconds": time.time() - t0, "metrics": metrics, "electrical": electrical, "model": str(result.model_path)
            if hasattr(result, "model_path") else None}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", required=True, help="polarmace model file from polarmace-import-mace")
    p.add_argument("--out", type=Path, default=Path("runs/finetune_mace"))
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--freeze", type=int, default=3, help="model.freeze_trunk_epochs of the les run")
    p.add_argument("--lr", type=float, default=0.005)
    p.add_argument("--variants", nargs="+", default=["sr", "les"])
    p.add_argument("--via-factory", action="store_true", help="apply init_from in a model factory")
    p.add_argument("--skip-imported", action="store_true", help="do not evaluate the imported model first")
    args = p.parse_args(argv)
    import torch

    torch.set_num_threads(1)
    results = {"command": "python benchmarks/finetune_mace.py " + " ".join(argv if argv is not None else sys.argv[1:])}
    # the imported model as it is: a 0-epoch run evaluates it on the same split
    if not args.skip_imported:
        results["imported"] = run(config("sr", args.model, args.out / "imported", 0, 0, args.lr), args.via_factory)
    for variant in args.variants:
        freeze = args.freeze if variant != "sr" else 0
        results[variant] = run(config(variant, args.model, args.out, args.epochs, freeze, args.lr), args.via_factory)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"finetune_{'_'.join(args.variants)}.json").write_text(json.dumps(results, indent=1, default=str))
    print(json.dumps({k: (v.get("metrics", {}).get("test") if isinstance(v, dict) else v) for k, v in results.items()},
                     indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
