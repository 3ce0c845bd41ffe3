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
    from polarmace.config import ConfigError

    module, _, attr = spec.partition(":")
    if not attr:
        raise ConfigError(f"--model-factory expects module:function, got {spec!r}")
    try:
        return getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as exc:
        raise ConfigError(f"--model-factory {spec!r}: {exc}") from None


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
    from polarmace.cli import run_cli

    args = parser().parse_intermixed_args(argv)
    return run_cli("polarmace-train", lambda: _run(args))


def _run(args: argparse.Namespace) -> int:
    import os

    from polarmace.data import DataError
    from polarmace.training import distributed
    from polarmace.training.trainer import train

    if args.checkpoint_steps is not None and args.checkpoint_steps < 1:
        from polarmace.config import ConfigError

        raise ConfigError(f"--checkpoint-steps must be >= 1, got {args.checkpoint_steps}")
    factory = _import(args.model_factory) if args.model_factory else None
    try:
        result = train(args.config, model_factory=factory, resume=args.resume, overrides=args.overrides,
                       checkpoint_steps=args.checkpoint_steps)
    except DataError as exc:
        if "no such file" not in str(exc):
            raise
        raise DataError(f"{exc} (relative data paths are read from the current directory, {os.getcwd()})") from None
    finally:
        distributed.cleanup()
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"model: {result.model_path}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
