"""The ``stamen`` command line: parsing, output and exit codes (no sockets: run_demo is faked)."""

from __future__ import annotations

import logging
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from stamen import cli
from stamen.demo import DemoResult, DemoStarted, RoundProgress
from stamen.errors import ConfigError, NotEnoughClients
from stamen.server.history import History


@pytest.fixture(autouse=True)
def _restore_stamen_log_level() -> Iterator[None]:
    """``main`` may set the level of the ``stamen`` logger; put it back after each test."""
    logger = logging.getLogger("stamen")
    level = logger.level
    yield
    logger.setLevel(level)


class FakeRunDemo:
    """Stands in for ``run_demo``: records its arguments, reports two rounds, or raises."""

    def __init__(self, error: BaseException | None = None) -> None:
        self.calls: list[dict[str, Any]] = []
        self.error = error

    def __call__(self, **kwargs: Any) -> DemoResult:
        self.calls.append(kwargs)
        if self.error is not None:
            raise self.error
        kwargs["on_start"](
            DemoStarted(
                address="127.0.0.1:1234",
                num_clients=kwargs["num_clients"],
                num_rounds=kwargs["num_rounds"],
                alpha=0.5,
                train_sizes=[10, 20],
                test_size=5,
            )
        )
        kwargs["on_round"](RoundProgress(0, 1, None, None, None, 2.302585, 0.1))
        kwargs["on_round"](RoundProgress(1, 1, 0.5, 0.4, 0.9, 0.3, 0.93456))
        return DemoResult(history=History(), final_accuracy=0.93456, elapsed=1.5, history_path=None)


@pytest.fixture
def fake_run_demo(monkeypatch: pytest.MonkeyPatch) -> FakeRunDemo:
    """Replace ``run_demo`` in the CLI with a :class:`FakeRunDemo`."""
    fake = FakeRunDemo()
    monkeypatch.setattr(cli, "run_demo", fake)
    return fake


def test_help_lists_the_demo_subcommand_and_exits_0(capsys: pytest.CaptureFixture[str]) -> None:
    """``stamen --help`` prints usage naming the ``demo`` subcommand and returns 0."""
    assert cli.main(["--help"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: stamen")
    assert "demo" in out


def test_demo_help_lists_every_option(capsys: pytest.CaptureFixture[str]) -> None:
    """``stamen demo --help`` documents --clients, --rounds, --seed, --history and -v."""
    assert cli.main(["demo", "--help"]) == 0
    out = capsys.readouterr().out
    for option in ("--clients", "--rounds", "--seed", "--history", "--verbose"):
        assert option in out


def test_version_prints_the_package_version(capsys: pytest.CaptureFixture[str]) -> None:
    """``stamen --version`` prints ``stamen <version>`` and returns 0."""
    assert cli.main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"stamen {cli.__version__}"


def test_unknown_subcommand_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    """An unknown subcommand returns 2 and names it and the valid choices on stderr."""
    assert cli.main(["train"]) == 2
    err = capsys.readouterr().err
    assert "invalid choice: 'train'" in err
    assert "demo" in err


def test_missing_subcommand_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    """``stamen`` without a subcommand returns 2 and says one is required."""
    assert cli.main([]) == 2
    assert "required: COMMAND" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--clients", "0"], "argument --clients: expected an integer in 1..100, received 0"),
        (["--clients", "101"], "argument --clients: expected an integer in 1..100, received 101"),
        (["--rounds", "-1"], "argument --rounds: expected an integer >= 0, received -1"),
        (["--seed", "x"], "argument --seed: expected an integer, received 'x'"),
        (["--bogus"], "unrecognized arguments: --bogus"),
    ],
)
def test_bad_demo_options_are_usage_errors(
    argv: list[str],
    message: str,
    fake_run_demo: FakeRunDemo,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """An invalid option value returns 2 with a message naming it; the demo does not run."""
    assert cli.main(["demo", *argv]) == 2
    assert message in capsys.readouterr().err
    assert fake_run_demo.calls == []


def test_demo_defaults(fake_run_demo: FakeRunDemo) -> None:
    """``stamen demo`` runs 10 clients, 10 rounds, seed 0, history to demo-history.json."""
    assert cli.main(["demo"]) == 0
    (call,) = fake_run_demo.calls
    assert (call["num_clients"], call["num_rounds"], call["seed"], call["history_path"]) == (
        10,
        10,
        0,
        "demo-history.json",
    )


def test_demo_passes_options_and_prints_progress(
    fake_run_demo: FakeRunDemo, capsys: pytest.CaptureFixture[str]
) -> None:
    """Options reach run_demo; each reported round and the final accuracy are printed."""
    argv = ["demo", "--clients", "2", "--rounds", "1", "--seed", "7", "--history", "h.json"]
    assert cli.main(argv) == 0
    (call,) = fake_run_demo.calls
    assert (call["num_clients"], call["num_rounds"], call["seed"], call["history_path"]) == (
        2,
        1,
        7,
        "h.json",
    )
    lines = capsys.readouterr().out.splitlines()
    assert "127.0.0.1:1234" in lines[1]
    assert [line.split() for line in lines if line[:5].strip().isdigit()] == [
        ["0", "-", "-", "2.3026", "0.1000"],
        ["1", "0.5000", "0.4000", "0.3000", "0.9346"],
    ]
    assert "Final centralized test accuracy: 0.9346 after 1 round(s) (1.5 s)" in lines


@pytest.mark.parametrize(
    ("argv", "level"),
    [
        (["-v", "demo"], logging.INFO),
        (["demo", "-v"], logging.INFO),
        (["demo", "-vv"], logging.DEBUG),
        (["-v", "demo", "--verbose"], logging.DEBUG),
    ],
)
def test_verbose_logs_stamen_info_or_debug(
    argv: list[str], level: int, fake_run_demo: FakeRunDemo
) -> None:
    """``-v`` (before or after the subcommand) shows Stamen's INFO messages; twice, DEBUG."""
    assert cli.main(argv) == 0
    assert logging.getLogger("stamen").getEffectiveLevel() == level


def test_without_verbose_stamen_logs_warnings_only(fake_run_demo: FakeRunDemo) -> None:
    """Without ``-v`` the ``stamen`` logger's level is left alone (warnings from the root)."""
    logging.getLogger("stamen").setLevel(logging.NOTSET)
    assert cli.main(["demo"]) == 0
    assert logging.getLogger("stamen").level == logging.NOTSET


@pytest.mark.parametrize(
    ("error", "code", "message"),
    [
        (ConfigError("history_path: directory 'x' does not exist"), 2, "does not exist"),
        (NotEnoughClients("3 of 10 client nodes connected"), 1, "3 of 10 client nodes"),
        (OSError("disk full"), 1, "disk full"),
        (KeyboardInterrupt(), 130, "interrupted"),
    ],
)
def test_demo_failures_map_to_exit_codes(
    error: BaseException,
    code: int,
    message: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Bad arguments return 2, a failed run 1, Ctrl-C 130; stderr says what happened."""
    monkeypatch.setattr(cli, "run_demo", FakeRunDemo(error))
    assert cli.main(["demo"]) == code
    err = capsys.readouterr().err
    assert err.startswith("stamen demo: ")
    assert message in err


def test_python_dash_m_stamen_runs_the_cli() -> None:
    """``python -m stamen --help`` runs :func:`stamen.cli.main` and exits with its code."""
    done = subprocess.run(
        [sys.executable, "-m", "stamen", "--help"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert "usage: stamen" in done.stdout
    bad = subprocess.run(
        [sys.executable, "-m", "stamen", "nope"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert bad.returncode == 2
    assert "invalid choice: 'nope'" in bad.stderr


def test_keys_generate_writes_a_usable_private_and_public_key(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`stamen keys generate` writes a 0600 private key and its public key (PEM), prints the
    OpenSSH form, and the pair signs requests a server verifies; a second run refuses to
    overwrite the key (exit 2)."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    from stamen.protocol.auth import RequestSigner, RequestVerifier, public_key_der
    from stamen.server.fleet.auth import parse_public_keys

    assert cli.main(["keys", "generate", "--out-dir", str(tmp_path), "--curve", "p384"]) == 0
    private = serialization.load_pem_private_key((tmp_path / "node.key").read_bytes(), None)
    public = serialization.load_pem_public_key((tmp_path / "node.pub").read_bytes())
    assert isinstance(private, ec.EllipticCurvePrivateKey)
    assert isinstance(public, ec.EllipticCurvePublicKey)
    assert private.curve.name == "secp384r1"
    assert (tmp_path / "node.key").stat().st_mode & 0o777 == 0o600
    ssh_line = capsys.readouterr().out.strip().splitlines()[-1]
    [from_ssh] = parse_public_keys(ssh_line.encode())
    assert public_key_der(from_ssh) == public_key_der(public)
    headers = RequestSigner(private, public).headers("/m", b"x", 100.0)
    assert RequestVerifier({public_key_der(public): public}.get).verify("/m", b"x", headers, 100.0)
    assert cli.main(["keys", "generate", "--out-dir", str(tmp_path)]) == 2
    assert "refusing to overwrite" in capsys.readouterr().err


def test_certs_generate_writes_a_ca_server_and_client_certificate(tmp_path: Path) -> None:
    """`stamen certs generate` writes a CA, a server certificate for the given hosts and a
    client certificate, both signed by the CA; private keys are 0600."""
    from cryptography import x509

    args = [
        "certs",
        "generate",
        "--out-dir",
        str(tmp_path),
        "--host",
        "fl.example",
        "--host",
        "10.1.2.3",
    ]
    assert cli.main(args) == 0
    ca = x509.load_pem_x509_certificate((tmp_path / "ca.crt").read_bytes())
    server = x509.load_pem_x509_certificate((tmp_path / "server.crt").read_bytes())
    client = x509.load_pem_x509_certificate((tmp_path / "client.crt").read_bytes())
    for cert in (server, client):
        cert.verify_directly_issued_by(ca)
    san = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["fl.example"]
    assert [str(ip) for ip in san.get_values_for_type(x509.IPAddress)] == ["10.1.2.3"]
    for key in ("server.key", "client.key"):
        assert (tmp_path / key).stat().st_mode & 0o777 == 0o600
