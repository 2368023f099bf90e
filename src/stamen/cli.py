"""The ``stamen`` command (also ``python -m stamen``).

The only module of Stamen that parses ``argv``, prints, configures logging and decides
exit codes. Subcommands:

* ``stamen demo``: federated softmax regression on scikit-learn's digits, with a server
  and 10 client nodes on 127.0.0.1 (see :mod:`stamen.demo`);
* ``stamen keys generate``: a node key pair for ``authentication_keys``;
* ``stamen certs generate``: a development CA, server and client certificates;
* ``stamen server [APP] [--config stamen.toml]``: run a server on every transport, with a
  ServerApp (Flower 1.12's app API, as ``flower-superlink`` + ``flower-server-app``) or a
  strategy by name (``--strategy FedAvg --strategy-arg min_fit_clients=2``);
* ``stamen node [APP] --server HOST:PORT``: run a ClientApp (or ``--client``) as a client
  node (as Flower's ``flower-supernode``);
* ``stamen plot HISTORY.json -o curves.png``: a History's curves as a PNG.

Every option of ``server`` and ``node`` is a flag and a key of the TOML file of
``--config`` (flags win). docs/operations.md lists them.

Exit codes: 0 success (``server``/``node``: the run completed), 1 the command or the run
failed, 2 usage or configuration error (a bad ``module:attr`` or config key included), 3
``node`` gave up connecting to its server, 4 ``node`` was refused (authentication or TLS),
5 ``node`` found another protocol at the address (wrong peer), 130 interrupted (Ctrl-C).
"""

from __future__ import annotations

import argparse
import difflib
import inspect
import json
import logging
import os
import sys
import textwrap
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

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
_EXIT_GAVE_UP = 3
_EXIT_REFUSED = 4
_EXIT_WRONG_PEER = 5
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


def _add_verbose(
    parser: argparse.ArgumentParser,
    dest: str,
    text: str = "log Stamen's INFO messages (-vv: DEBUG); default: warnings only",
) -> None:
    """``-v``/``--verbose``, counted separately before and after the subcommand."""
    parser.add_argument("-v", "--verbose", action="count", default=0, dest=dest, help=text)


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
        epilog="example:\n  stamen demo --clients 4 --rounds 5 --plot curves.png",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        help="train softmax regression on the digits with a server and client nodes",
        description=textwrap.fill(
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
    demo.add_argument(
        "--plot",
        default="demo-curves.png",
        metavar="PATH",
        help="where to draw the loss and accuracy curves as a PNG, if matplotlib is installed "
        "(default: demo-curves.png; '' draws none)",
    )
    demo.set_defaults(handler=_demo)

    keys = commands.add_parser("keys", help="node authentication keys")
    keys_commands = keys.add_subparsers(
        title="keys commands", dest="keys_command", metavar="ACTION"
    )
    keys_commands.required = True
    keys_generate = keys_commands.add_parser(
        "generate",
        epilog="example:\n  stamen keys generate --out-dir keys --name node-1 --curve p256",
        formatter_class=argparse.RawDescriptionHelpFormatter,
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
        epilog="example:\n  stamen certs generate --out-dir certs --host fl.example.org",
        formatter_class=argparse.RawDescriptionHelpFormatter,
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
    _add_app_commands(commands)
    return parser


@dataclass(frozen=True)
class _Option:
    """One option of ``stamen server`` / ``stamen node``: a flag, and a key of the TOML
    file given with ``--config`` (the same name without ``--``, unless ``toml_key``)."""

    name: str
    kind: str
    """str, path, int, float, bool, choice, config (KEY=VALUE words or a table), pairs
    (a repeated KEY=VALUE flag, or a table), files2 (two paths)."""
    help: str
    metavar: str | tuple[str, str] | None = None
    minimum: float | None = None
    choices: tuple[str, ...] = ()
    toml_key: str | None = None
    aliases: tuple[str, ...] = ()

    @property
    def key(self) -> str:
        """The option's key in the TOML file."""
        return self.toml_key or self.name

    @property
    def dest(self) -> str:
        """The option's name in the merged settings."""
        return self.name.replace("-", "_")


_LOG_OPTIONS = (
    _Option(
        "log-level",
        "choice",
        "Stamen's log level (default: info; -vv: debug)",
        choices=("debug", "info", "warning", "error"),
    ),
    _Option("log-file", "path", "also append every log record to this file", "PATH"),
    _Option(
        "log-format",
        "choice",
        "auto (default): a live view on a terminal (server, with rich), plain lines "
        "otherwise; plain: one line per event; json: one JSON object per line; live",
        choices=("auto", "plain", "json", "live"),
    ),
)

_SERVER_OPTIONS = (
    _Option(
        "address",
        "str",
        "gRPC address for grpc-bidi and grpc-rere (default: [::]:8080; port 0: a free one)",
        "HOST:PORT",
    ),
    _Option("rest-address", "str", "also serve the rest transport here", "HOST:PORT"),
    _Option("rounds", "int", "number of rounds (default: the app's, else 1)", "N", minimum=0),
    _Option(
        "round-timeout",
        "float",
        "seconds a node has to answer an instruction (default: no limit)",
        "SECONDS",
        minimum=0,
    ),
    _Option(
        "strategy",
        "str",
        "the strategy by name when no APP is given, e.g. FedAvg (the default), FedProx",
        "NAME",
    ),
    _Option(
        "strategy-arg",
        "pairs",
        "a keyword argument of --strategy, e.g. min_fit_clients=2 (repeat the flag)",
        "KEY=VALUE",
        toml_key="strategy-args",
    ),
    _Option(
        "wait-timeout",
        "float",
        "seconds to wait for enough nodes before the run fails (default: 600)",
        "SECONDS",
        minimum=0,
    ),
    _Option("insecure", "bool", "serve without TLS (the default without certificates)"),
    _Option("ssl-ca-certfile", "path", "PEM file of the CA certificate (TLS: give all three)"),
    _Option("ssl-certfile", "path", "PEM file of the server certificate (TLS)"),
    _Option("ssl-keyfile", "path", "PEM file of the server's private key (TLS)"),
    _Option(
        "require-client-certificate",
        "bool",
        "mutual TLS: refuse nodes without a certificate signed by the CA",
    ),
    _Option("authorized-keys", "path", "node authentication: file of allowed public keys"),
    _Option(
        "auth-window",
        "float",
        "seconds a signed request stays valid (default: 60)",
        "SECONDS",
        minimum=0,
    ),
    _Option("checkpoint-dir", "path", "checkpoint every round here; resume from it", "DIR"),
    _Option(
        "max-message-length",
        "int",
        "largest gRPC message, both ways, in bytes (default: 536870912; nodes: the same)",
        "BYTES",
        minimum=1,
    ),
    _Option(
        "run-config",
        "config",
        "the run config the ServerApp's server_fn receives in context.run_config",
        "'KEY=VALUE ...'",
    ),
    _Option("history", "path", "write the run's History as JSON here", "PATH"),
    _Option("plot", "path", "draw the History's curves into this PNG (stamen[plot])", "PATH"),
    _Option(
        "tensorboard-dir",
        "path",
        "write each round's losses and metrics as TensorBoard event files here "
        "(stamen[tensorboard])",
        "DIR",
    ),
    _Option(
        "mlflow-uri",
        "str",
        "log each round's losses and metrics to this MLflow tracking URI (stamen[mlflow])",
        "URI",
    ),
    *_LOG_OPTIONS,
)

_NODE_OPTIONS = (
    _Option(
        "server",
        "str",
        "the server's address (rest: http://HOST:PORT or https://HOST:PORT)",
        "HOST:PORT",
        aliases=("--superlink",),
    ),
    _Option(
        "client",
        "str",
        "the client when no APP is given: module:attr naming a ClientApp, a client_fn, "
        "a Client or a NumPyClient",
        "MODULE:ATTR",
    ),
    _Option(
        "transport",
        "choice",
        "default: grpc-bidi",
        choices=("grpc-bidi", "grpc-rere", "rest"),
    ),
    _Option("insecure", "bool", "connect without TLS"),
    _Option("root-certificates", "path", "PEM file of the CAs to trust (TLS)"),
    _Option(
        "client-certificate",
        "files2",
        "PEM files of this node's certificate and key, for mutual TLS",
        ("CERT", "KEY"),
    ),
    _Option("auth-supernode-private-key", "path", "node authentication: private key"),
    _Option("auth-supernode-public-key", "path", "node authentication: public key"),
    _Option("max-retries", "int", "give up after N failed attempts in a row", "N", minimum=0),
    _Option(
        "max-wait-time",
        "float",
        "give up after this long without a connection",
        "SECONDS",
        minimum=0,
    ),
    _Option(
        "max-message-length",
        "int",
        "largest message, both ways, in bytes (default: 536870912; as the server's)",
        "BYTES",
        minimum=1,
    ),
    _Option(
        "node-config",
        "config",
        "added to context.node_config, e.g. 'partition-id=0 num-partitions=2'",
        "'KEY=VALUE ...'",
    ),
    *_LOG_OPTIONS,
)

_APP_EXIT_CODES = """exit codes:
  0  the run completed
  1  the run failed (server: not enough nodes, a strategy error, no round aggregated;
     node: the server ended the run as failed, or the node failed)
  2  configuration or usage error (bad flag, config key, module:attr, missing file)
  3  node: gave up connecting (--max-retries / --max-wait-time)
  4  node: refused: authentication or TLS (untrusted certificate, TLS/plaintext mismatch)
  5  node: wrong peer: the address answers another protocol (HTTP/1, not gRPC, ...)
  130 interrupted (Ctrl-C)"""

_SERVER_EPILOG = f"""examples:
  stamen server --address 0.0.0.0:8080 --rounds 5 --strategy FedAvg \\
      --strategy-arg min_fit_clients=2 --strategy-arg min_available_clients=2
  stamen server app:server_app --config stamen.toml --rounds 10

stamen.toml (keys are the flags without --; flags override the file):
  address = "0.0.0.0:8080"
  rounds = 5
  strategy = "FedAvg"
  history = "history.json"
  [strategy-args]
  min_fit_clients = 2

{_APP_EXIT_CODES}"""

_NODE_EPILOG = f"""examples:
  stamen node app:client_app --server 127.0.0.1:8080 --insecure
  stamen node --client app:client_fn --server http://127.0.0.1:9093 --transport rest
  stamen node app:client_app --config node.toml --node-config 'partition-id=0'

{_APP_EXIT_CODES}"""


def _add_options(parser: argparse.ArgumentParser, options: Sequence[_Option]) -> None:
    """Each option as a flag whose default is absent (so a flag given wins over the file)."""
    for option in options:
        flags = [f"--{option.name}", *option.aliases]
        common: dict[str, Any] = {
            "dest": option.dest,
            "default": argparse.SUPPRESS,
            "help": option.help,
        }
        if option.kind == "bool":
            parser.add_argument(*flags, action="store_true", **common)
        elif option.kind == "choice":
            parser.add_argument(*flags, choices=option.choices, **common)
        elif option.kind == "pairs":
            parser.add_argument(*flags, action="append", metavar=option.metavar, **common)
        elif option.kind == "files2":
            parser.add_argument(*flags, nargs=2, metavar=option.metavar, **common)
        else:
            kinds: dict[str, Callable[[str], Any]] = {
                "int": _int_in(int(option.minimum or 0)),
                "float": _positive_float,
            }
            parser.add_argument(
                *flags,
                type=kinds.get(option.kind, str),
                metavar=option.metavar or "PATH",
                **common,
            )


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, received {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected a number > 0, received {value:g}")
    return value


_positive_float.__name__ = "number"


def _add_app_commands(commands: argparse._SubParsersAction[_ArgumentParser]) -> None:
    """The ``server`` and ``node`` subcommands, and ``plot``."""
    server = commands.add_parser(
        "server",
        help="run a server: a ServerApp (module:attr), or a strategy by name",
        description=textwrap.fill(
            "Serve client nodes on --address (grpc-bidi and grpc-rere) and --rest-address "
            "(rest) and run the rounds of a ServerApp ('module:attribute', importable from "
            "the current directory), or, without one, of --strategy with --strategy-arg. "
            "Every option is a flag and a key of the --config TOML file."
        ),
        epilog=_SERVER_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_verbose(server, "command_verbose", "-vv: DEBUG (as --log-level debug)")
    server.add_argument(
        "app", nargs="?", metavar="APP", help="the ServerApp as module:attr, e.g. app:server_app"
    )
    server.add_argument("--config", metavar="FILE", help="a TOML file of options (see below)")
    _add_options(server, _SERVER_OPTIONS)
    server.set_defaults(handler=_server)

    node = commands.add_parser(
        "node",
        help="run a client node: a ClientApp (module:attr), or --client",
        description=textwrap.fill(
            "Load a ClientApp ('module:attribute', importable from the current directory), "
            "or the client of --client, and serve a server with it until the run ends. "
            "Every option is a flag and a key of the --config TOML file."
        ),
        epilog=_NODE_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_verbose(node, "command_verbose", "-vv: DEBUG (as --log-level debug)")
    node.add_argument(
        "app", nargs="?", metavar="APP", help="the ClientApp as module:attr, e.g. app:client_app"
    )
    node.add_argument("--config", metavar="FILE", help="a TOML file of options")
    _add_options(node, _NODE_OPTIONS)
    node.set_defaults(handler=_node)

    plot = commands.add_parser(
        "plot",
        help="draw a History JSON file's losses and metrics into a PNG",
        description=textwrap.fill(
            "Read a History written as JSON (stamen demo, stamen server --history, "
            "History.to_json) and draw its losses and metrics over the rounds into a PNG "
            "(needs matplotlib: pip install 'stamen[plot]'). --csv also writes the table."
        ),
        epilog="example:\n  stamen plot demo-history.json -o curves.png --csv curves.csv",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_verbose(plot, "command_verbose")
    plot.add_argument("history", metavar="HISTORY.json")
    plot.add_argument(
        "-o", "--output", default="curves.png", metavar="PATH", help="default: curves.png"
    )
    plot.add_argument("--csv", metavar="PATH", help="also write the History as CSV here")
    plot.set_defaults(handler=_plot)


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
    if args.plot and result.history.plot_panels():
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            _print("(pip install 'stamen[plot]' to draw the curves as a PNG)")
        else:
            _print(f"Curves drawn in {result.history.plot(args.plot, title='stamen demo')}")
    return _EXIT_OK


def _read(path: str | None, what: str) -> bytes | None:
    if path is None:
        return None
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise ConfigError(f"{what}: cannot read {path!r}: {exc.strerror}") from exc


# --- the TOML file, merged with the flags --------------------------------------------------


def _load_toml(path: str) -> dict[str, Any]:
    """The TOML file at ``path`` (stdlib ``tomllib``; ``tomli`` on Python 3.10)."""
    if sys.version_info >= (3, 11):
        import tomllib
    else:  # pragma: no cover - Python 3.10
        import tomli as tomllib
    try:
        with open(path, "rb") as handle:
            data: dict[str, Any] = tomllib.load(handle)
    except OSError as exc:
        raise ConfigError(f"--config: cannot read {path!r}: {exc.strerror}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from exc
    return data


def _scalar_table(where: str, value: object) -> dict[str, bool | int | float | str]:
    if not isinstance(value, dict):
        raise ConfigError(f"{where}: expected a table of values, received {value!r}")
    for key, item in value.items():
        if not isinstance(item, bool | int | float | str):
            raise ConfigError(
                f"{where}.{key}: expected a bool, number or string, received {item!r}"
            )
    return dict(value)


def _from_file(option: _Option, value: object, where: str, base: Path) -> object:
    """A value of the TOML file, checked against its option."""
    kind = option.kind
    expected = {
        "str": str,
        "path": str,
        "choice": str,
        "bool": bool,
    }.get(kind)
    if expected is not None and not isinstance(value, expected):
        raise ConfigError(
            f"{where}: expected a {expected.__name__}, received {type(value).__name__} {value!r}"
        )
    if kind == "path":
        assert isinstance(value, str)
        return str(base / value) if not Path(value).is_absolute() else value
    if kind == "choice" and value not in option.choices:
        raise ConfigError(f"{where}: expected one of {list(option.choices)}, received {value!r}")
    if kind in ("int", "float"):
        numeric = int if kind == "int" else (int, float)
        if isinstance(value, bool) or not isinstance(value, numeric):
            raise ConfigError(
                f"{where}: expected a{'n int' if kind == 'int' else ' number'}, received {value!r}"
            )
        assert isinstance(value, int | float)
        low = option.minimum or 0
        if value < low or (kind == "float" and not value > 0):
            raise ConfigError(f"{where}: expected a value > {low:g}, received {value!r}")
        return value if kind == "int" else float(value)
    if kind == "config":
        from .app_loader import parse_config

        return parse_config(value) if isinstance(value, str) else _scalar_table(where, value)
    if kind == "pairs":
        return _scalar_table(where, value)
    if kind == "files2":
        if not (
            isinstance(value, list) and len(value) == 2 and all(isinstance(v, str) for v in value)
        ):
            raise ConfigError(f"{where}: expected [CERT, KEY], two paths, received {value!r}")
        return tuple(str(base / v) if not Path(v).is_absolute() else v for v in value)
    return value


def _from_flag(option: _Option, value: object) -> object:
    from .app_loader import parse_config

    if option.kind == "config":
        assert isinstance(value, str)
        try:
            return parse_config(value)
        except ConfigError as exc:
            raise ConfigError(f"--{option.name}: {exc}") from exc
    if option.kind == "pairs":
        assert isinstance(value, list)
        merged: dict[str, object] = {}
        for pair in value:
            try:
                parsed = parse_config(pair)
            except ConfigError:
                parsed = {}
            if len(parsed) != 1:
                raise ConfigError(
                    f"--{option.name}: expected one KEY=VALUE per flag, received {pair!r}"
                )
            merged.update(parsed)
        return merged
    if option.kind == "files2":
        assert isinstance(value, list)
        return tuple(value)
    return value


def _settings(args: argparse.Namespace, options: Sequence[_Option]) -> dict[str, Any]:
    """The command's settings: the TOML file of ``--config``, then the flags over it.

    Raises:
        ConfigError: the file cannot be read or parsed, has a key that is no option (the
            message names the nearest valid key) or a value of the wrong type.
    """
    values: dict[str, Any] = {}
    if args.config is not None:
        path = Path(args.config)
        by_key = {option.key: option for option in options}
        for key, value in _load_toml(args.config).items():
            if key == "app":
                if not isinstance(value, str):
                    raise ConfigError(f"{path}: app: expected 'module:attr', received {value!r}")
                values["app"] = value
                continue
            option = by_key.get(key)
            if option is None:
                valid = ["app", *by_key]
                near = difflib.get_close_matches(key, valid, n=1, cutoff=0.6)
                hint = (
                    f"; did you mean {near[0]!r}?"
                    if near
                    else f"; valid keys: {', '.join(sorted(valid))}"
                )
                raise ConfigError(f"{path}: unknown key {key!r}{hint}")
            values[option.dest] = _from_file(option, value, f"{path}: {key}", path.resolve().parent)
    for option in options:
        if hasattr(args, option.dest):
            value = _from_flag(option, getattr(args, option.dest))
            if option.kind in ("pairs", "config") and isinstance(value, dict):
                value = {**values.get(option.dest, {}), **value}  # key by key over the file
            values[option.dest] = value
    if args.app is not None:
        values["app"] = args.app
    return values


# --- logging for server and node -------------------------------------------------------------

_PLAIN_FORMAT = "%(levelname)s %(name)s: %(message)s"
_FILE_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def _not_in_the_panel(record: logging.LogRecord) -> bool:
    """The live view draws the run's events: their INFO lines are not printed too."""
    return record.levelno >= logging.WARNING or not hasattr(record, "event")


def _setup_logging(
    values: dict[str, Any], verbose: int, command: str
) -> tuple[Any, Callable[[], None]]:
    """Handlers on the ``stamen`` logger as ``--log-*`` ask; returns the live view (or
    None) and the function that removes what was installed."""
    from .logger import JsonFormatter
    from .server.live import LiveView, rich_available

    level_name = values.get("log_level") or ("debug" if verbose >= 2 else "info")
    level = getattr(logging, level_name.upper())
    fmt = values.get("log_format", "auto")
    view = None
    handlers: list[logging.Handler] = []
    if fmt == "live" or (
        fmt == "auto" and command == "server" and sys.stderr.isatty() and rich_available()
    ):
        view = LiveView(title=f"stamen {command}")  # ConfigError without rich
        handler = view.log_handler(level)
        handler.addFilter(_not_in_the_panel)
    else:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(JsonFormatter() if fmt == "json" else logging.Formatter(_PLAIN_FORMAT))
    handlers.append(handler)
    if values.get("log_file"):
        try:
            file_handler = logging.FileHandler(values["log_file"], encoding="utf-8")
        except OSError as exc:
            raise ConfigError(
                f"--log-file: cannot open {values['log_file']!r}: {exc.strerror}"
            ) from exc
        file_handler.setFormatter(
            JsonFormatter() if fmt == "json" else logging.Formatter(_FILE_FORMAT)
        )
        handlers.append(file_handler)
    stamen = logging.getLogger("stamen")
    previous = stamen.level
    for added in handlers:
        stamen.addHandler(added)
    stamen.setLevel(level)

    def restore() -> None:
        for added in handlers:
            stamen.removeHandler(added)
            added.close()
        stamen.setLevel(previous)
        if view is not None:
            view.stop()

    return view, restore


# --- stamen server ---------------------------------------------------------------------------


def _server_certificates(values: dict[str, Any]) -> tuple[bytes, bytes, bytes] | None:
    files = (values.get("ssl_ca_certfile"), values.get("ssl_certfile"), values.get("ssl_keyfile"))
    insecure = values.get("insecure", False)
    if all(f is None for f in files):
        return None
    if any(f is None for f in files) or insecure:
        raise ConfigError(
            "TLS: expected all of --ssl-ca-certfile, --ssl-certfile and --ssl-keyfile (and no "
            f"--insecure), received {[f for f in files if f is not None]}"
            + (" with --insecure" if insecure else "")
        )
    ca = _read(files[0], "--ssl-ca-certfile")
    cert = _read(files[1], "--ssl-certfile")
    key = _read(files[2], "--ssl-keyfile")
    assert ca is not None and cert is not None and key is not None
    return ca, cert, key


def strategy_names() -> list[str]:
    """The strategies ``stamen server --strategy`` can make by name."""
    from .server import strategy as strategies

    names = []
    for name in strategies.__all__:
        value = getattr(strategies, name)
        if (
            isinstance(value, type)
            and issubclass(value, strategies.Strategy)
            and value is not strategies.Strategy
            and not inspect.isabstract(value)
        ):
            names.append(name)
    return names


def make_strategy(name: str, kwargs: dict[str, Any]) -> Any:
    """``stamen.server.strategy.<name>(**kwargs)``.

    Raises:
        ConfigError: no such strategy, or an argument it does not take or refuses (the
            message names the nearest valid one).
    """
    from .server import strategy as strategies

    names = strategy_names()
    if name not in names:
        near = difflib.get_close_matches(name, names, n=1)
        hint = f"; did you mean {near[0]!r}?" if near else ""
        raise ConfigError(f"--strategy: unknown strategy {name!r}{hint} (one of {names})")
    cls = getattr(strategies, name)
    parameters = inspect.signature(cls).parameters
    for key in kwargs:
        if key not in parameters:
            near = difflib.get_close_matches(key, list(parameters), n=1)
            hint = f"; did you mean {near[0]!r}?" if near else f"; it takes {list(parameters)}"
            raise ConfigError(f"--strategy-arg: {name} takes no argument {key!r}{hint}")
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"--strategy {name}: {exc}") from exc


def _server_parts(values: dict[str, Any]) -> dict[str, Any]:
    """The Server, ServerConfig, strategy and client manager of the run."""
    from .app_loader import load_app
    from .server import ServerApp, ServerConfig
    from .server.client_manager import SimpleClientManager
    from .server.server_app import server_context

    app_reference = values.get("app")
    strategy_name, strategy_args = values.get("strategy"), values.get("strategy_arg")
    if app_reference is not None:
        if strategy_name is not None or strategy_args:
            raise ConfigError(
                "--strategy/--strategy-arg choose the strategy of a run without an APP; the "
                f"ServerApp {app_reference!r} brings its own"
            )
        app = load_app(app_reference, ServerApp)
        parts = app.components(server_context(values.get("run_config")))
        server, config = parts.server, parts.config
        strategy, client_manager = parts.strategy, parts.client_manager
    else:
        if values.get("run_config"):
            raise ConfigError("--run-config is for a ServerApp's server_fn; no APP was given")
        server = client_manager = config = None
        strategy = make_strategy(strategy_name or "FedAvg", strategy_args or {})
    rounds, round_timeout = values.get("rounds"), values.get("round_timeout")
    if rounds is not None or round_timeout is not None:
        base = config or ServerConfig()
        config = ServerConfig(
            num_rounds=base.num_rounds if rounds is None else rounds,
            round_timeout=base.round_timeout if round_timeout is None else round_timeout,
        )
    wait_timeout = values.get("wait_timeout")
    if wait_timeout is not None:
        if server is not None or client_manager is not None:
            raise ConfigError(
                "--wait-timeout: the ServerApp brings its own server or client manager; set "
                "SimpleClientManager(wait_timeout=...) there"
            )
        client_manager = SimpleClientManager(wait_timeout=wait_timeout)
    return {
        "server": server,
        "config": config,
        "strategy": strategy,
        "client_manager": client_manager,
    }


def _server(args: argparse.Namespace) -> int:
    """Run ``stamen server``: a ServerApp's run, or a strategy's, on every transport."""
    values = _settings(args, _SERVER_OPTIONS)
    view, restore = _setup_logging(values, args.verbose + args.command_verbose, "server")
    try:
        return _run_server(values, view)
    finally:
        restore()


def _run_server(values: dict[str, Any], view: Any) -> int:
    from .server import start_server

    if values.get("plot"):
        try:
            import matplotlib  # noqa: F401
        except ImportError as exc:
            raise ConfigError(
                f"--plot needs matplotlib: pip install 'stamen[plot]': {exc}"
            ) from exc
    parts = _server_parts(values)
    kwargs: dict[str, Any] = {
        "server_address": values.get("address", "[::]:8080"),
        **parts,
        "certificates": _server_certificates(values),
        "rest_address": values.get("rest_address"),
        "require_client_certificate": values.get("require_client_certificate", False),
        "authorized_keys": values.get("authorized_keys"),
        "checkpoint_dir": values.get("checkpoint_dir"),
    }
    optional = {
        "grpc_max_message_length": values.get("max_message_length"),
        "auth_window": values.get("auth_window"),
        "tensorboard_dir": values.get("tensorboard_dir"),
        "mlflow_uri": values.get("mlflow_uri"),
        "subscribers": [view] if view is not None else None,
    }
    kwargs.update({k: v for k, v in optional.items() if v is not None})
    try:
        history = start_server(**kwargs)
    except (ConfigError, KeyboardInterrupt):
        raise
    except Exception as exc:  # the run failed, in Stamen or in the app's code
        if view is not None:
            view.stop()
        print(f"stamen server: run failed: {type(exc).__name__}: {exc}", file=sys.stderr)
        return _EXIT_FAILURE
    if view is not None:
        view.stop()
    if values.get("history"):
        Path(values["history"]).write_text(history.to_json() + "\n", encoding="utf-8")
    if values.get("plot"):
        history.plot(values["plot"])
    _print("stamen server: run completed")
    _print(str(history))
    return _EXIT_OK


# --- stamen node -----------------------------------------------------------------------------


def _node_keys(values: dict[str, Any]) -> tuple[object, object] | None:
    private_path = values.get("auth_supernode_private_key")
    public_path = values.get("auth_supernode_public_key")
    if private_path is None and public_path is None:
        return None
    if private_path is None or public_path is None:
        raise ConfigError(
            "node authentication: expected both --auth-supernode-private-key and "
            "--auth-supernode-public-key, received only one"
        )
    private_pem = _read(private_path, "--auth-supernode-private-key")
    public_pem = _read(public_path, "--auth-supernode-public-key")
    assert private_pem is not None and public_pem is not None
    try:
        private = serialization.load_pem_private_key(private_pem, password=None)
        if public_pem.startswith(b"ecdsa-"):
            public: object = serialization.load_ssh_public_key(public_pem)
        else:
            public = serialization.load_pem_public_key(public_pem)
    except ValueError as exc:
        raise ConfigError(f"node authentication: cannot load the keys: {exc}") from exc
    return private, public


def _client_fn(values: dict[str, Any]) -> Callable[..., Any]:
    """The node's client_fn: the APP's (a ClientApp), or ``--client``'s."""
    from .app_loader import load_app
    from .client import Client, ClientApp, NumPyClient

    app_reference, client_reference = values.get("app"), values.get("client")
    node_config = values.get("node_config") or {}
    if app_reference is not None and client_reference is not None:
        raise ConfigError(
            f"expected a ClientApp APP or --client, received both ({app_reference!r} and "
            f"{client_reference!r})"
        )
    if app_reference is not None:
        return load_app(app_reference, ClientApp).to_client_fn(node_config)
    if client_reference is None:
        raise ConfigError(
            "stamen node needs a client: give a ClientApp as APP (module:attr), or "
            "--client module:attr naming a client_fn, a Client or a NumPyClient"
        )
    found: object = load_app(client_reference, object)
    if isinstance(found, NumPyClient):
        found = found.to_client()
    if isinstance(found, Client):
        fixed = found
        found = ClientApp(client_fn=lambda _context: fixed)
    elif not isinstance(found, ClientApp) and callable(found):
        found = ClientApp(client_fn=found)
    if isinstance(found, ClientApp):
        return found.to_client_fn(node_config)
    raise ConfigError(
        f"--client: expected {client_reference!r} to be a ClientApp, a client_fn, a Client or "
        f"a NumPyClient, found a {type(found).__name__}"
    )


def _node(args: argparse.Namespace) -> int:
    """Run ``stamen node``: serve the server with the client until the run ends."""
    values = _settings(args, _NODE_OPTIONS)
    if "server" not in values:
        raise ConfigError(
            "stamen node needs the server's address: --server HOST:PORT "
            '(or server = "HOST:PORT" in the --config file)'
        )
    _, restore = _setup_logging(values, args.verbose + args.command_verbose, "node")
    try:
        return _run_node(values)
    finally:
        restore()


def _run_node(values: dict[str, Any]) -> int:
    from .client import start_client
    from .errors import AuthError, ConnectError, ProtocolError, RunError, TLSError

    client_fn = _client_fn(values)
    kwargs: dict[str, Any] = {
        "server_address": values["server"],
        "client_fn": client_fn,
        "root_certificates": values.get("root_certificates"),
        "insecure": True if values.get("insecure") else None,
        "transport": values.get("transport", "grpc-bidi"),
        "authentication_keys": _node_keys(values),
        "max_retries": values.get("max_retries"),
        "max_wait_time": values.get("max_wait_time"),
        "client_certificates": values.get("client_certificate"),
    }
    if values.get("max_message_length") is not None:
        kwargs["grpc_max_message_length"] = values["max_message_length"]
    try:
        start_client(**kwargs)
    except RunError as exc:
        print(f"stamen node: the run failed: {exc}", file=sys.stderr)
        return _EXIT_FAILURE
    except (TLSError, AuthError) as exc:
        print(f"stamen node: refused: {type(exc).__name__}: {exc}", file=sys.stderr)
        return _EXIT_REFUSED
    except ConnectError as exc:
        print(f"stamen node: gave up connecting: {exc}", file=sys.stderr)
        return _EXIT_GAVE_UP
    except (ConfigError, KeyboardInterrupt):
        raise
    except ProtocolError as exc:
        print(f"stamen node: wrong peer or protocol: {exc}", file=sys.stderr)
        return _EXIT_WRONG_PEER
    except Exception as exc:  # the node failed (its client's code, ...)
        print(f"stamen node: failed: {type(exc).__name__}: {exc}", file=sys.stderr)
        return _EXIT_FAILURE
    _print("stamen node: run completed")
    return _EXIT_OK


# --- stamen plot -----------------------------------------------------------------------------


def _plot(args: argparse.Namespace) -> int:
    """Run ``stamen plot``: a History JSON file drawn into a PNG."""
    from .server.history import History

    try:
        data = json.loads(Path(args.history).read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError(f"cannot read {args.history!r}: {exc.strerror}") from exc
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{args.history}: not JSON: {exc}") from exc
    history = History.from_dict(data)
    written = history.plot(args.output, title=Path(args.history).name)
    _print(f"wrote {written}")
    if args.csv:
        history.to_csv(args.csv)
        _print(f"wrote {args.csv}")
    return _EXIT_OK


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``stamen`` command line; return the exit code.

    Args:
        argv: The arguments after the program name (default: ``sys.argv[1:]``).

    Returns:
        0 on success, 1 if the command failed, 2 on a usage or configuration error, 3 if
        ``stamen node`` gave up connecting, 130 on Ctrl-C.
    """
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except _ParserExit as done:
        return done.status
    if args.command not in ("server", "node"):  # those two set up logging from their flags
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
