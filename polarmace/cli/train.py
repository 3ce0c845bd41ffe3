"""polarmace-train config.yaml [--resume] [key=value ...]

Trains a model from a YAML config; ``key=value`` overrides use dotted paths and YAML values
(``training.lr=1e-3 data.batch_size=8``). Data-parallel: ``torchrun --nproc_per_node=N -m
polarmace.cli.train config.yaml``.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import Callable, List, Optional


def _import(spec: str) -> Callable:
    module, _, attr = spec.partition(":")
    if not attr:
        raise SystemExit(f"--model-factory expects module:function, got {spec!r}")
    return getattr(importlib.import_module(module), attr)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="polarmace-train", description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config", help="YAML config (sections model, long_range, data, training, output)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="dotted-path overrides, e.g. training.lr=1e-3")
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint of the run directory")
    p.add_argument("--checkpoint-steps", type=int, default=None, metavar="K",
                   help="also checkpoint every K optimiser steps inside an epoch (default: end of every epoch only)")
    p.add_argument("--model-factory", default=None, metavar="MODULE:FUNCTION",
                   help="model factory (default polarmace.build_model)")
    return p


def main(argv: Optional[List[str]] = None) -> int:
    args = parser().parse_intermixed_args(argv)
    from polarmace.config import ConfigError
    from polarmace.data import DataError
    from polarmace.training.trainer import train

    factory = _import(args.model_factory) if args.model_factory else None
    try:
        result = train(args.config, model_factory=factory, resume=args.resume, overrides=args.overrides,
                       checkpoint_steps=args.checkpoint_steps)
    except ConfigError as exc:
        print(f"polarmace-train: config error: {exc}", file=sys.stderr)
        return 2
    except FileExistsError as exc:
        print(f"polarmace-train: {exc}", file=sys.stderr)
        return 2
    except DataError as exc:
        import os

        print(f"polarmace-train: data error: {exc} (relative data paths are read from the "
              f"current directory, {os.getcwd()})", file=sys.stderr)
        return 2
    finally:
        from polarmace.training import distributed

        distributed.cleanup()
    if int(__import__("os").environ.get("RANK", "0")) == 0:
        print(f"model: {result.model_path}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
