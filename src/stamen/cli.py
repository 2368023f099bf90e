"""The ``stamen`` command (also ``python -m stamen``).

The only module of Stamen that parses ``argv``, prints, configures logging and decides
exit codes. Subcommands:

* ``stamen demo``: federated softmax regression on scikit-learn's digits, with a server
  and 10 client nodes on 127.0.0.1 (see :mod:`stamen.demo`);
* ``stamen keys generate``: a node key pair for ``authentication_keys``;
* ``stamen certs generate``: a development CA, server and client certificates;
* ``stamen server module:app``: run a ServerApp (Flower 1.12's app API) as a server, on
  every transport (as Flower's ``flower-superlink`` + ``flower-server-app``);
* ``stamen node module:app --server HOST:PORT``: run a ClientApp as a client node (as
  Flower's ``flower-supernode``).

Exit codes: 0 success (``server``/``node``: the run completed), 1 the command or the run
failed, 2 usage or configuration error (a bad ``module:attr`` included), 3 ``node`` gave
up connecting to its server, 130 interrupted (Ctrl-C).
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
_EXIT_GAVE_UP = 3
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
    _add_app_commands(commands)
    return parser


def _add_app_commands(commands: argparse._SubParsersAction[_ArgumentParser]) -> None:
    """The ``server`` and ``node`` subcommands: run a ServerApp or a ClientApp."""
    server = commands.add_parser(
        "server",
        help="run a ServerApp (module:attribute) as a server on every transport",
        description=(
            "Load a ServerApp ('module:attribute', importable from the current directory) and "
            "serve client nodes on --address (grpc-bidi and grpc-rere) and --rest-address "
            "(rest), running the app's rounds. Exits 0 when the run completed, 1 if it "
            "failed, 2 on a configuration error."
        ),
    )
    _add_verbose(server, "command_verbose")
    server.add_argument("app", metavar="MODULE:ATTR", help="the ServerApp, e.g. app:server_app")
    server.add_argument(
        "--address",
        default="[::]:8080",
        metavar="HOST:PORT",
        help="gRPC address for grpc-bidi and grpc-rere (default: [::]:8080; port 0: a free one)",
    )
    server.add_argument(
        "--rest-address", metavar="HOST:PORT", help="also serve the rest transport here"
    )
    server.add_argument(
        "--insecure",
        action="store_true",
        help="serve without TLS (the default without certificates)",
    )
    for flag, what in (
        ("--ssl-ca-certfile", "the CA certificate"),
        ("--ssl-certfile", "the server certificate"),
        ("--ssl-keyfile", "the server's private key"),
    ):
        server.add_argument(flag, metavar="PATH", help=f"PEM file of {what} (TLS: give all three)")
    server.add_argument(
        "--require-client-certificate",
        action="store_true",
        help="mutual TLS: refuse nodes without a certificate signed by the CA",
    )
    server.add_argument(
        "--authorized-keys", metavar="PATH", help="node authentication: file of allowed public keys"
    )
    server.add_argument(
        "--checkpoint-dir", metavar="DIR", help="checkpoint every round here; resume from it"
    )
    server.add_argument(
        "--run-config",
        metavar="'KEY=VALUE ...'",
        help="the run config the ServerApp's server_fn receives in context.run_config",
    )
    server.add_argument("--history", metavar="PATH", help="write the run's History as JSON here")
    server.set_defaults(handler=_server)

    node = commands.add_parser(
        "node",
        help="run a ClientApp (module:attribute) as a client node",
        description=(
            "Load a ClientApp ('module:attribute', importable from the current directory) and "
            "serve a server with it until the run ends. Exits 0 when the run completed, 1 if "
            "the node failed, 2 on a configuration error, 3 if it gave up connecting."
        ),
    )
    _add_verbose(node, "command_verbose")
    node.add_argument("app", metavar="MODULE:ATTR", help="the ClientApp, e.g. app:client_app")
    node.add_argument(
        "--server",
        "--superlink",
        dest="server",
        required=True,
        metavar="HOST:PORT",
        help="the server's address (rest: http://HOST:PORT or https://HOST:PORT)",
    )
    node.add_argument(
        "--transport",
        choices=("grpc-bidi", "grpc-rere", "rest"),
        default="grpc-bidi",
        help="default: grpc-bidi",
    )
    node.add_argument("--insecure", action="store_true", help="connect without TLS")
    node.add_argument(
        "--root-certificates", metavar="PATH", help="PEM file of the CAs to trust (TLS)"
    )
    node.add_argument(
        "--client-certificate",
        nargs=2,
        metavar=("CERT", "KEY"),
        help="PEM files of this node's certificate and key, for mutual TLS",
    )
    node.add_argument(
        "--auth-supernode-private-key", metavar="PATH", help="node authentication: private key"
    )
    node.add_argument(
        "--auth-supernode-public-key", metavar="PATH", help="node authentication: public key"
    )
    node.add_argument(
        "--max-retries", type=_int_in(0), metavar="N", help="give up after N failed attempts"
    )
    node.add_argument(
        "--max-wait-time",
        type=float,
        metavar="SECONDS",
        help="give up after this long without a connection",
    )
    node.add_argument(
        "--node-config",
        metavar="'KEY=VALUE ...'",
        help="added to context.node_config, e.g. 'partition-id=0 num-partitions=2'",
    )
    node.set_defaults(handler=_node)


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


def _read(path: str | None, what: str) -> bytes | None:
    if path is None:
        return None
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise ConfigError(f"{what}: cannot read {path!r}: {exc.strerror}") from exc


def _server_certificates(args: argparse.Namespace) -> tuple[bytes, bytes, bytes] | None:
    files = (args.ssl_ca_certfile, args.ssl_certfile, args.ssl_keyfile)
    if all(f is None for f in files):
        return None
    if any(f is None for f in files) or args.insecure:
        raise ConfigError(
            "TLS: expected all of --ssl-ca-certfile, --ssl-certfile and --ssl-keyfile (and no "
            f"--insecure), received {[f for f in files if f is not None]}"
            + (" with --insecure" if args.insecure else "")
        )
    ca = _read(args.ssl_ca_certfile, "--ssl-ca-certfile")
    cert = _read(args.ssl_certfile, "--ssl-certfile")
    key = _read(args.ssl_keyfile, "--ssl-keyfile")
    assert ca is not None and cert is not None and key is not None
    return ca, cert, key


def _server(args: argparse.Namespace) -> int:
    """Run ``stamen server``: the ServerApp's run on every transport."""
    from .app_loader import load_app, parse_config
    from .server import ServerApp, start_server
    from .server.server_app import server_context

    app = load_app(args.app, ServerApp)
    certificates = _server_certificates(args)
    components = app.components(server_context(parse_config(args.run_config)))
    try:
        history = start_server(
            server_address=args.address,
            server=components.server,
            config=components.config,
            strategy=components.strategy,
            client_manager=components.client_manager,
            certificates=certificates,
            rest_address=args.rest_address,
            require_client_certificate=args.require_client_certificate,
            authorized_keys=args.authorized_keys,
            checkpoint_dir=args.checkpoint_dir,
        )
    except (ConfigError, KeyboardInterrupt):
        raise
    except Exception as exc:  # the run failed, in Stamen or in the app's code
        print(f"stamen server: run failed: {type(exc).__name__}: {exc}", file=sys.stderr)
        return _EXIT_FAILURE
    if args.history:
        Path(args.history).write_text(history.to_json() + "\n", encoding="utf-8")
    print(f"stamen server: run completed: {history!r}", flush=True)
    return _EXIT_OK


def _node_keys(args: argparse.Namespace) -> tuple[object, object] | None:
    private_path, public_path = args.auth_supernode_private_key, args.auth_supernode_public_key
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


def _node(args: argparse.Namespace) -> int:
    """Run ``stamen node``: serve the server with the ClientApp until the run ends."""
    from .app_loader import load_app, parse_config
    from .client import ClientApp, start_client
    from .errors import ConnectError

    app = load_app(args.app, ClientApp)
    client_fn = app.to_client_fn(parse_config(args.node_config))
    try:
        start_client(
            server_address=args.server,
            client_fn=client_fn,
            root_certificates=args.root_certificates,
            insecure=True if args.insecure else None,
            transport=args.transport,
            authentication_keys=_node_keys(args),
            max_retries=args.max_retries,
            max_wait_time=args.max_wait_time,
            client_certificates=tuple(args.client_certificate) if args.client_certificate else None,
        )
    except ConnectError as exc:
        print(f"stamen node: gave up connecting: {exc}", file=sys.stderr)
        return _EXIT_GAVE_UP
    except (ConfigError, KeyboardInterrupt):
        raise
    except Exception as exc:  # the node failed (protocol, authentication, ...)
        print(f"stamen node: failed: {type(exc).__name__}: {exc}", file=sys.stderr)
        return _EXIT_FAILURE
    print("stamen node: run completed", flush=True)
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
