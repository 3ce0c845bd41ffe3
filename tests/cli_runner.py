"""Run command-line cases, each in its own process, forked from one that imported polarmace once.

    python cli_runner.py cases.json results.json

cases.json: a list of {"prog": "train" | "eval" | ..., "argv": [...], "cwd": dir, "setup": code}.
Each case runs in a forked child: stdout/stderr go to files, `setup` (Python source) runs first
(e.g. to simulate a full disk), then the tool's `main(argv)`; the child exits with its status, an
uncaught exception prints its traceback and exits 1, as the installed entry point would. Forking
skips the ~5 s import of torch/e3nn per case (the parent computes nothing before forking, so
no thread pool is copied). results.json: [{"code", "out", "err", "seconds"}] in case order; a
case still running after CASE_TIMEOUT s (a hang) is killed and reported with code "timeout".
"""

from __future__ import annotations

import importlib
import json
import os
import signal
import sys
import time
import traceback

PROGRAMS = ("train", "eval", "prepare", "export", "md", "spectra", "driver")
#: Seconds a case may run; every case here takes a few at most.
CASE_TIMEOUT = 120.0


def _child(case: dict, out_path: str, err_path: str) -> None:
    for fd, path in ((1, out_path), (2, err_path)):
        handle = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(handle, fd)
        os.close(handle)
    code = 1
    try:
        import torch

        torch.set_num_threads(1)  # a shared 2-core machine; the cases are tiny
        os.chdir(case.get("cwd") or os.getcwd())
        if case.get("setup"):
            exec(compile(case["setup"], "<setup>", "exec"), {"__name__": "setup"})  # noqa: S102 - test code
        main = importlib.import_module(f"polarmace.cli.{case['prog']}").main
        code = main(list(case["argv"]))
    except SystemExit as exc:  # argparse and p.error
        if exc.code is None or isinstance(exc.code, int):
            code = exc.code or 0
        else:
            print(exc.code, file=sys.stderr)
            code = 1
    except BaseException:  # what the interpreter does with an uncaught exception
        traceback.print_exc()
        code = 1
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(int(code))


def _wait(pid: int, start: float):
    """The child's exit status, or "timeout" after killing it when it runs past CASE_TIMEOUT."""
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        if time.perf_counter() - start > CASE_TIMEOUT:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            return "timeout"
        time.sleep(0.02)


def main() -> None:
    cases = json.loads(open(sys.argv[1]).read())
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # toy_model for --model-factory
    for prog in PROGRAMS:
        importlib.import_module(f"polarmace.cli.{prog}")
    importlib.import_module("polarmace.training.trainer")
    importlib.import_module("polarmace.calculator")
    importlib.import_module("polarmace.model")
    importlib.import_module("toy_model")
    results = []
    for k, case in enumerate(cases):
        out_path, err_path = f"{sys.argv[2]}.{k}.out", f"{sys.argv[2]}.{k}.err"
        sys.stdout.flush()
        sys.stderr.flush()
        start = time.perf_counter()
        pid = os.fork()
        if pid == 0:
            _child(case, out_path, err_path)
        code = _wait(pid, start)
        results.append({"code": code, "out": open(out_path).read(),
                        "err": open(err_path).read(), "seconds": time.perf_counter() - start})
    with open(sys.argv[2], "w") as fh:
        json.dump(results, fh)


if __name__ == "__main__":
    main()
