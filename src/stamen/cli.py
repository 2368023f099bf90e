"""The ``stamen`` command (also ``python -m stamen``).

The only module of Stamen that parses ``argv``, prints, configures logging and decides
exit codes. Subcommands:

* ``stamen demo``: federated softmax regression on scikit-learn's digits, with a server
  and 10 client nodes on 127.0.0.1 (see :mod:`stamen.demo`);
* ``stamen keys generate``: a node key pair for ``authentication_keys``;
* ``stamen certs generate``: a development CA, server and client certificates.

Exit codes: 0 success, 1 the command failed, 2 usage error, 130 interrupted (Ctrl-C).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import NoReturn

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from . import __version__
from .demo import CLIENT_LIMIT, DemoStarted, RoundProgress, run_demo
from .errors import ConfigError, StamenError
from .memory import tune_allocator
from .testing.certs import generate_certificates, generate_node_keys

__all__ = ["build_parser", "main"]

_EXIT_OK = 0
_EXIT_FAILURE = 1
_EXIT_USAGE = 2
_EXIT_INTERRUPTED = 130


class _ParserExit(Exception):
    """Raised instead of ``SystemExit`` when argparse is done (help, version or error)."""

    def __init__(self, status: int) -> None:
        super().__init__(status)
        self.status = status


class _ArgumentParser(argparse.ArgumentParser):
    """An ArgumentParser whose help, version and usage errors return from :func:`main`."""

    def exit(self, status: int = 0, message: str | None = None) -> NoReturn:
        """Print ``message`` to stderr and end parsing with ``status``."""
        if message:
            self._print_message(message, sys.stderr)
        raise _ParserExit(status)


def _int_in(low: int, high: int | None = None) -> Callable[[str], int]:
    """An argparse ``type`` for ints in ``[low, high]``."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, received {text!r}") from None
        if value < low or (high is not None and value > high):
            bound = f">= {low}" if high is None else f"in {low}..{high}"
            raise argparse.ArgumentTypeError(f"expected an integer {bound}, received {value}")
        return value

    parse.__name__ = "int"  # argparse names the type in some messages
    return parse


def _add_verbose(parser: argparse.ArgumentParser, dest: str) -> None:
    """``-v``/``--verbose``, counted separately before and after the subcommand."""
    parser.add_argument(
        "-v",
        "--verbose",
        action="count",
        default=0,
        dest=dest,
        help="log Stamen's INFO messages (-vv: DEBUG); default: warnings only",
    )


def build_parser() -> argparse.ArgumentParser:
    """The parser of ``stamen``: global options and one subparser per subcommand."""
    parser = _ArgumentParser(
        prog="stamen",
        description="Stamen: federated learning with Flower's API and wire format.",
    )
    _add_verbose(parser, "verbose")
    parser.add_argument("--version", action="version", version=f"stamen {__version__}")
    commands = parser.add_subparsers(title="commands", dest="command", metavar="COMMAND")
    commands.required = True

    demo = commands.add_parser(
        "demo",
        help="train softmax regression on the digits with a server and client nodes",
        description=(
            "Start a server and client nodes on 127.0.0.1 (a free port) and train softmax "
            "regression on scikit-learn's digits, split non-IID over the clients, with "
            "FedAvg. Prints each round and the final accuracy on a held-out test set."
        ),
    )
    _add_verbose(demo, "command_verbose")
    demo.add_argument(
        "--clients",
        type=_int_in(1, CLIENT_LIMIT),
        default=10,
        metavar="N",
        help=f"number of client nodes, 1..{CLIENT_LIMIT} (default: 10)",
    )
    demo.add_argument(
        "--rounds",
        type=_int_in(0),
        default=10,
        metavar="N",
        help="rounds of FedAvg; 0 evaluates the initial model only (default: 10)",
    )
    demo.add_argument(
        "--seed", type=_int_in(0), default=0, metavar="N", help="random seed (default: 0)"
    )
    demo.add_argument(
        "--history",
        default="demo-history.json",
        metavar="PATH",
        help="where to write the run's history as JSON (default: demo-history.json)",
    )
    demo.set_defaults(handler=_demo)

    keys = commands.add_parser("keys", help="node authentication keys")
    keys_commands = keys.add_subparsers(
        title="keys commands", dest="keys_command", metavar="ACTION"
    )
    keys_commands.required = True
    keys_generate = keys_commands.add_parser(
        "generate",
        help="make a node key pair (PEM) for start_client(authentication_keys=...)",
        description=(
            "Write NAME.key (private, PKCS#8 PEM, mode 0600) and NAME.pub (public, PEM) and "
            "print the public key in OpenSSH form, ready for the server's authorized keys file."
        ),
    )
    keys_generate.add_argument("--out-dir", default=".", metavar="DIR")
    keys_generate.add_argument("--name", default="node", metavar="NAME")
    keys_generate.add_argument("--curve", choices=sorted(_CURVES), default="p256")
    keys_generate.set_defaults(handler=_keys_generate)

    certs = commands.add_parser("certs", help="TLS certificates for development")
    certs_commands = certs.add_subparsers(
        title="certs commands", dest="certs_command", metavar="ACTION"
    )
    certs_commands.required = True
    certs_generate = certs_commands.add_parser(
        "generate",
        help="make a development CA, a server certificate and a client certificate",
        description=(
            "Write ca.crt, server.crt, server.key, client.crt and client.key (keys mode 0600). "
            "The server certificate is valid for the given hosts (default: localhost, "
            "127.0.0.1, ::1). For development and tests only: use your own PKI in production."
        ),
    )
    certs_generate.add_argument("--out-dir", default=".", metavar="DIR")
    certs_generate.add_argument(
        "--host", action="append", dest="hosts", metavar="HOST", help="repeat for more hosts"
    )
    certs_generate.add_argument("--days", type=_int_in(1, 3650), default=365, metavar="N")
    certs_generate.set_defaults(handler=_certs_generate)
    return parser


_CURVES: dict[str, Callable[[], ec.EllipticCurve]] = {
    "p256": ec.SECP256R1,
    "p384": ec.SECP384R1,
    "p521": ec.SECP521R1,
}


def _write(path: Path, data: bytes, *, private: bool) -> None:
    """Write a file; private files are created with mode 0600 and never overwritten."""
    if path.exists():
        raise ConfigError(f"{path} exists; refusing to overwrite it")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600 if private else 0o644)
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)
    _print(f"wrote {path}")


def _keys_generate(args: argparse.Namespace) -> int:
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    private, public = generate_node_keys(_CURVES[args.curve]())
    _write(
        out / f"{args.name}.key",
        private.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ),
        private=True,
    )
    _write(
        out / f"{args.name}.pub",
        public.public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        ),
        private=False,
    )
    ssh = public.public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    _print(ssh.decode("ascii"))
    return _EXIT_OK


def _certs_generate(args: argparse.Namespace) -> int:
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    hosts = tuple(args.hosts) if args.hosts else ("localhost", "127.0.0.1", "::1")
    made = generate_certificates(hosts, days=args.days)
    _write(out / "ca.crt", made.ca_cert, private=False)
    _write(out / "server.crt", made.server_cert, private=False)
    _write(out / "server.key", made.server_key, private=True)
    _write(out / "client.crt", made.client_cert, private=False)
    _write(out / "client.key", made.client_key, private=True)
    return _EXIT_OK


def _configure_logging(verbose: int) -> None:
    """Warnings on stderr; ``-v`` adds Stamen's INFO messages, ``-vv`` its DEBUG ones."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if verbose:
        logging.getLogger("stamen").setLevel(logging.INFO if verbose == 1 else logging.DEBUG)


def _print(line: str = "") -> None:
    print(line, flush=True)


def _cell(value: float | None, width: int) -> str:
    return f"{'-':>{width}}" if value is None else f"{value:>{width}.4f}"


def _print_start(event: DemoStarted) -> None:
    sizes = event.train_sizes
    _print(
        f"Stamen demo: softmax regression on scikit-learn's digits, FedAvg over "
        f"{event.num_clients} client node(s), {event.num_rounds} round(s)"
    )
    _print(
        f"  server on {event.address}; non-IID split (Dirichlet alpha={event.alpha:g}): "
        f"{sum(sizes)} training examples ({min(sizes)}-{max(sizes)} per client), "
        f"{event.test_size} held out for the centralized test"
    )
    _print()
    _print("round  train loss  distributed loss  centralized loss  centralized accuracy")


def _print_round(event: RoundProgress) -> None:
    _print(
        f"{event.server_round:>5}  {_cell(event.train_loss, 10)}  "
        f"{_cell(event.distributed_loss, 16)}  {_cell(event.centralized_loss, 16)}  "
        f"{_cell(event.centralized_accuracy, 20)}"
    )


def _demo(args: argparse.Namespace) -> int:
    """Run ``stamen demo``."""
    result = run_demo(
        num_clients=args.clients,
        num_rounds=args.rounds,
        seed=args.seed,
        history_path=args.history,
        on_start=_print_start,
        on_round=_print_round,
    )
    _print()
    _print(
        f"Final centralized test accuracy: {result.final_accuracy:.4f} after {args.rounds} "
        f"round(s) ({result.elapsed:.1f} s)"
    )
    _print(f"History written to {result.history_path}")
    return _EXIT_OK


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``stamen`` command line; return the exit code.

    Args:
        argv: The arguments after the program name (default: ``sys.argv[1:]``).

    Returns:
        0 on success, 1 if the command failed, 2 on a usage error, 130 on Ctrl-C.
    """
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except _ParserExit as done:
        return done.status
    _configure_logging(args.verbose + getattr(args, "command_verbose", 0))
    tune_allocator()  # an entry point: before any thread that may run a node starts
    handler: Callable[[argparse.Namespace], int] = args.handler
    prog = f"stamen {args.command}"
    try:
        return handler(args)
    except ConfigError as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return _EXIT_USAGE
    except (StamenError, OSError, ImportError) as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return _EXIT_FAILURE
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return _EXIT_INTERRUPTED


if __name__ == "__main__":
    raise SystemExit(main())
