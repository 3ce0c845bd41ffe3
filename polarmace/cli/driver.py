"""polarmace-driver: serve PolarMACE energies and forces to i-PI over its socket protocol.

i-PI (https://ipi-code.org) runs the dynamics (thermostats, barostats, path integrals, ...) and
asks a driver for the energy, forces and virial of each configuration. This driver wraps
`polarmace.calculator.PolarMACECalculator` in ASE's socket client
(`ase.calculators.socketio.SocketClient`), which speaks the i-PI protocol and converts units
(i-PI: bohr, hartree; here: Å, eV).

    polarmace-driver --model model.pt --structure init.xyz --address unix:water
    polarmace-driver --model model.ts --structure init.xyz --address localhost:31415 \\
        --dtype float64 --total-charge 1 --eps-infty 1.78 -v

--address forms:
  unix:NAME         UNIX socket /tmp/ipi_NAME (i-PI: <ffsocket mode="unix"><address>NAME)
  unix:/path/sock   a UNIX socket at an explicit path (i-PI: sockets_prefix + address)
  /path/sock        the same (any value containing "/")
  HOST:PORT         TCP socket (i-PI: <ffsocket mode="inet"><address>HOST</address>
                    <port>PORT</port>); also inet:HOST:PORT

--structure: i-PI sends only positions and the cell, so the atomic species (in i-PI's atom
order), the periodicity and the total charge come from this file (any ASE-readable file; the
first frame). Its pbc flags decide whether the system is periodic (--pbc overrides them); an
i-PI-style .xyz whose cell is only in a "# CELL(abcABC)" comment reads as non-periodic, so pass
--pbc TTT for a periodic i-PI run with such a file. The cell always comes from i-PI.

Total charge (e): --total-charge, else atoms.info["total_charge"] / ["charge"] of --structure
(both with different values is an error), else 0 (polarmace.data.atoms.total_charge_of). The
virial (needed by i-PI barostats) is sent for fully periodic systems; otherwise zero. The driver returns when i-PI sends EXIT or closes the connection (exit status 0).
"""

from __future__ import annotations

import argparse
import logging
import socket
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence, Tuple

import numpy as np

from polarmace.errors import InputError

log = logging.getLogger("polarmace.driver")

#: Prefix i-PI (and ASE) put in front of a UNIX socket name by default.
IPI_SOCKET_PREFIX = "/tmp/ipi_"


class DriverError(InputError):
    """A problem with the driver's inputs or connection; the message names the argument."""


def ipi_xyz(symbols: Sequence[str], positions: np.ndarray, box: Sequence[float]) -> str:
    """i-PI's xyz input (the text of init.xyz): an orthorhombic box of lengths `box` (Å) in the
    CELL(abcABC) comment line, then one "symbol x y z" line per atom (Å)."""
    a, b, c = (float(x) for x in box)
    lines = [str(len(symbols)), f"# CELL(abcABC): {a:.10f} {b:.10f} {c:.10f} 90 90 90 cell{{angstrom}} "
             "positions{angstrom}"]
    lines += [f"{s} {x:.10f} {y:.10f} {z:.10f}" for s, (x, y, z) in zip(symbols, np.asarray(positions))]
    return "\n".join(lines) + "\n"


# ================================================================================ address
@dataclass(frozen=True)
class Address:
    """Where i-PI listens: mode "unix" with a socket `path`, or "inet" with `host` and `port`."""

    mode: str
    path: str = ""
    host: str = ""
    port: int = 0

    def describe(self) -> str:
        return f"unix socket {self.path}" if self.mode == "unix" else f"{self.host}:{self.port} (tcp)"


def parse_address(text: str) -> Address:
    """Parse --address: "unix:NAME", "unix:/path", "/path", "HOST:PORT" or "inet:HOST:PORT".

    Raises DriverError (naming --address) for any other form.
    """
    text = text.strip()
    hint = "use unix:NAME, unix:/path/to/socket, /path/to/socket or HOST:PORT"
    if not text:
        raise DriverError(f"--address is empty; {hint}")
    if text.startswith("unix:"):
        name = text[len("unix:"):]
        if not name:
            raise DriverError(f"--address {text!r}: missing socket name after 'unix:'; {hint}")
        path = name if "/" in name else IPI_SOCKET_PREFIX + name
        return Address("unix", path=path)
    if "/" in text and not text.startswith("inet:"):
        return Address("unix", path=text)
    rest = text[len("inet:"):] if text.startswith("inet:") else text
    host, sep, port_text = rest.rpartition(":")
    if not sep or not host:
        raise DriverError(f"--address {text!r} is neither a UNIX socket nor HOST:PORT; {hint}")
    try:
        port = int(port_text)
    except ValueError:
        raise DriverError(f"--address {text!r}: port {port_text!r} is not an integer; {hint}") from None
    if not 0 < port < 65536:
        raise DriverError(f"--address {text!r}: port {port} outside 1-65535")
    return Address("inet", host=host, port=port)


def connect(address: Address, wait: float, timeout: Optional[float]) -> socket.socket:
    """A socket connected to i-PI, retrying for up to `wait` s while the server is not up yet.

    `timeout` (s) becomes the socket timeout for every later receive (None = wait forever).
    """
    deadline = time.monotonic() + max(wait, 0.0)
    delay = 0.05
    while True:
        if address.mode == "unix":
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            target: Any = address.path
        else:
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            target = (address.host, address.port)
        try:
            sock.connect(target)
        except OSError as exc:  # not there yet, refused, unknown host, ...
            sock.close()
            if isinstance(exc, socket.gaierror) or time.monotonic() >= deadline:
                raise DriverError(f"--address: cannot connect to {address.describe()}: {exc} "
                                  f"(is i-PI running? waited {wait:g} s, see --connect-wait)") from None
            time.sleep(delay)
            delay = min(2.0 * delay, 1.0)
            continue
        if address.mode == "inet":
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.settimeout(timeout)
        return sock


# ================================================================================= client
def socket_client(sock: socket.socket, n_atoms: int, protocol_log: Any = None) -> Any:
    """ASE's SocketClient on an already connected socket (any UNIX path or TCP address).

    ASE's constructor can only connect to /tmp/ipi_NAME or host:port itself; this subclass takes
    the connected socket and sets the state the protocol loop (`irun`) uses. Positions whose atom
    count differs from `n_atoms` raise DriverError naming --structure.
    """
    from ase.calculators.socketio import IPIProtocol, SocketClient
    from ase.parallel import DummyMPI

    class _ConnectedClient(SocketClient):
        def __init__(self) -> None:  # noqa: D401 - mirrors SocketClient.__init__ on one rank
            self.comm = DummyMPI()
            self.host, self.port, self.unixsocket = None, None, None
            self.protocol = IPIProtocol(sock, txt=protocol_log)
            self.log = self.protocol.log
            self.closed = False
            self.bead_index = 0
            self.bead_initbytes = b""
            self.state = "READY"
            receive = self.protocol.recvposdata

            def checked() -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
                cell, icell, positions = receive()
                if len(positions) != n_atoms:
                    raise DriverError(f"i-PI sent {len(positions)} atoms but --structure has "
                                      f"{n_atoms}: give the structure i-PI simulates (same order)")
                return cell, icell, positions

            self.protocol.recvposdata = checked

    return _ConnectedClient()


def parse_pbc(text: str) -> Optional[np.ndarray]:
    """--pbc: "auto" (None: from --structure) or three letters T/F (or 1/0), e.g. "TTT"."""
    if text.lower() == "auto":
        return None
    flags = text.replace(",", "").replace(" ", "").upper()
    if len(flags) != 3 or any(c not in "TF10" for c in flags):
        raise DriverError(f"--pbc {text!r}: expected 'auto' or three of T/F, e.g. TTT or FFF")
    return np.array([c in "T1" for c in flags], dtype=bool)


def load_structure(path: str, pbc: Optional[np.ndarray], total_charge: Optional[float]) -> Any:
    """The template Atoms: species and order from `path`, pbc and total charge (e) set."""
    import ase.io

    if not Path(path).is_file():
        raise DriverError(f"--structure: no such file {path!r} (needed for the atomic species)")
    try:
        atoms = ase.io.read(path, index=0)
    except Exception as exc:  # ASE raises many kinds; report them all as one input error
        raise DriverError(f"--structure: cannot read {path!r}: {exc}") from exc
    from polarmace.data.atoms import set_total_charge, total_charge_of

    atoms.calc = None
    if len(atoms) == 0:
        raise DriverError(f"--structure: {path!r} has no atoms")
    if pbc is not None:
        atoms.pbc = pbc
    elif not atoms.pbc.any():
        log.warning("--structure %s is not periodic: the system is treated as open (i-PI's cell is "
                    "ignored by the model); pass --pbc TTT for a periodic simulation", path)
    value = total_charge if total_charge is not None else total_charge_of(atoms, 0.0, f"--structure {path}")
    set_total_charge(atoms.info, value)  # one key, so that the calculator reads this value
    return atoms


def build_calculator(args: argparse.Namespace) -> Any:
    """PolarMACECalculator from --model (path checked first), --device, --dtype, --eps-infty."""
    from polarmace.calculator import PolarMACECalculator

    if not Path(args.model).is_file():
        raise DriverError(f"--model: no such file {args.model!r}")
    return PolarMACECalculator(args.model, device=args.device, dtype=args.dtype,
                               eps_infty=args.eps_infty, skin=args.skin)


# ================================================================================== main
def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="polarmace-driver", description=__doc__.split("\n")[0],
                                epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="model file (.pt/.model from save, or exported .ts)")
    p.add_argument("--address", required=True,
                   help="i-PI socket: unix:NAME (/tmp/ipi_NAME), unix:/path, /path or HOST:PORT")
    p.add_argument("--structure", required=True,
                   help="structure with the atomic species in i-PI's atom order (ASE-readable)")
    p.add_argument("--pbc", default="auto",
                   help="periodicity: auto (from --structure) or three of T/F, e.g. TTT")
    p.add_argument("--device", default="cpu", help="torch device (cpu, cuda)")
    p.add_argument("--dtype", choices=["float64", "float32"], default=None,
                   help="model precision (default: the model's own)")
    p.add_argument("--eps-infty", type=float, default=None, help="ε∞ for physical BEC/α (optional)")
    p.add_argument("--total-charge", type=float, default=None,
                   help="total charge, e (default: from --structure info, else 0)")
    p.add_argument("--skin", type=float, default=0.5, help="neighbour-list skin, Å")
    p.add_argument("--timeout", type=float, default=None,
                   help="give up when i-PI sends nothing for this many s (default: wait forever)")
    p.add_argument("--connect-wait", type=float, default=10.0,
                   help="retry connecting for this many s while i-PI starts (default 10)")
    p.add_argument("--log-interval", type=int, default=100,
                   help="log progress every n force evaluations (about one per MD step)")
    p.add_argument("-v", "--verbose", action="count", default=0,
                   help="-v: log every evaluation's energy; -vv: also the socket messages")
    return p


def serve(client: Any, atoms: Any, log_interval: int) -> int:
    """Answer i-PI until EXIT or disconnect; returns the number of force evaluations (i-PI's
    initial configuration plus one per MD step)."""
    use_stress = bool(np.all(atoms.pbc))
    steps = 0
    start = time.perf_counter()
    for _ in client.irun(atoms, use_stress=use_stress):
        steps += 1
        energy = atoms.calc.results["energy"]
        log.debug("evaluation %d: energy %.10f eV", steps, energy)
        if log_interval > 0 and steps % log_interval == 0:
            elapsed = time.perf_counter() - start
            log.info("%d force evaluations (%.2f /s), energy %.6f eV", steps, steps / elapsed, energy)
    return steps


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = parser()
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s polarmace-driver %(levelname)s "
                        "%(message)s", datefmt="%H:%M:%S", stream=sys.stderr)
    log.setLevel(logging.DEBUG if args.verbose else logging.INFO)
    try:
        address = parse_address(args.address)
        pbc = parse_pbc(args.pbc)
        if args.timeout is not None and args.timeout <= 0:
            raise DriverError(f"--timeout must be positive (s), got {args.timeout}")
        atoms = load_structure(args.structure, pbc, args.total_charge)
        calc = build_calculator(args)
        atoms.calc = calc
        sock = connect(address, args.connect_wait, args.timeout)
    except InputError as exc:  # DriverError, a bad model file, conflicting total charges, ...
        p.error(" ".join(str(exc).split()))  # exits with status 2 and the usage line
    log.info("connected to i-PI at %s: %d atoms (%s), pbc %s, total charge %g e, model %s (%s, %s)",
             address.describe(), len(atoms), atoms.get_chemical_formula(),
             "".join("T" if f else "F" for f in atoms.pbc), calc.charge_of(atoms), args.model,
             calc.dtype, calc.device)
    client = socket_client(sock, len(atoms), sys.stderr if args.verbose >= 2 else None)
    start = time.perf_counter()
    steps = 0
    try:
        steps = serve(client, atoms, args.log_interval)
    except socket.timeout:
        log.error("no message from i-PI for %g s (--timeout); giving up", args.timeout)
        return 1
    except DriverError as exc:
        log.error("%s", exc)
        return 1
    finally:
        client.close()
    wall = time.perf_counter() - start
    log.info("i-PI finished (EXIT or closed connection): disconnected after %d force evaluations "
             "in %.1f s (%.2f /s, %d neighbour-list builds)", steps, wall, steps / wall if wall > 0 else 0.0,
             calc.neighbours.builds)
    return 0


if __name__ == "__main__":
    sys.exit(main())
