"""``stamen server`` / ``stamen node`` options: the TOML file and the flags over it,
unknown keys, strategies by name, --client, exit codes of each failure kind (no sockets:
start_server/start_client are faked)."""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import stamen as fl
from stamen import cli
from stamen.errors import (
    AuthError,
    ConfigError,
    ConnectError,
    ProtocolError,
    RunError,
    TLSError,
)
from stamen.server.history import History
from stamen.server.strategy import FedAvg, FedProx

CLIENTS = """
import stamen as fl

class C(fl.client.NumPyClient):
    def fit(self, parameters, config):
        return parameters, 1, {}

app = fl.client.ClientApp(client_fn=lambda context: C().to_client())

def client_fn(context):
    return C().to_client()

numpy_client = C()
number = 3
"""


class FakeStart:
    def __init__(self, result: Any = None, error: BaseException | None = None) -> None:
        self.calls: list[dict[str, Any]] = []
        self.result, self.error = result, error

    def __call__(self, **kwargs: Any) -> Any:
        self.calls.append(kwargs)
        if self.error is not None:
            raise self.error
        return self.result


@pytest.fixture
def here(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    (tmp_path / "cfg_clients.py").write_text(CLIENTS)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", list(sys.path))
    logger = logging.getLogger("stamen")
    level, handlers = logger.level, list(logger.handlers)
    yield tmp_path
    sys.modules.pop("cfg_clients", None)
    assert logger.level == level and logger.handlers == handlers  # the CLI cleaned up


def _server(monkeypatch: pytest.MonkeyPatch, history: History | None = None) -> FakeStart:
    fake = FakeStart(result=history or History())
    monkeypatch.setattr(fl.server, "start_server", fake)
    return fake


def test_toml_file_then_flags_make_the_start_server_call(
    here: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every key reaches start_server; a flag overrides the file; paths in the file are
    relative to it; the strategy is made by name with its arguments."""
    (here / "conf").mkdir()
    (here / "conf" / "stamen.toml").write_text(
        """
address = "127.0.0.1:0"
rest-address = "127.0.0.1:0"
rounds = 3
round-timeout = 30
strategy = "FedProx"
wait-timeout = 5
auth-window = 30
checkpoint-dir = "ckpt"
max-message-length = 1048576
tensorboard-dir = "tb"
mlflow-uri = "file:./mlruns"
log-format = "plain"
[strategy-args]
proximal_mu = 0.1
min_fit_clients = 2
"""
    )
    fake = _server(monkeypatch)
    argv = ["server", "--config", "conf/stamen.toml", "--rounds", "5"]
    assert cli.main([*argv, "--strategy-arg", "min_available_clients=2"]) == 0
    (call,) = fake.calls
    assert call["server_address"] == "127.0.0.1:0"
    assert call["rest_address"] == "127.0.0.1:0"
    assert call["config"] == fl.server.ServerConfig(num_rounds=5, round_timeout=30.0)
    strategy = call["strategy"]
    assert isinstance(strategy, FedProx)
    assert (strategy.proximal_mu, strategy.min_fit_clients, strategy.min_available_clients) == (
        0.1,
        2,
        2,
    )
    assert call["client_manager"].wait_timeout == 5.0
    assert call["auth_window"] == 30.0
    assert call["checkpoint_dir"] == str(here / "conf" / "ckpt")
    assert call["tensorboard_dir"] == str(here / "conf" / "tb")
    assert call["grpc_max_message_length"] == 1048576
    assert call["mlflow_uri"] == "file:./mlruns"
    assert "subscribers" not in call  # plain lines: no live view


def test_without_app_or_strategy_the_run_is_fedavg(
    here: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake = _server(monkeypatch)
    assert cli.main(["server", "--address", "127.0.0.1:0", "--log-format", "plain"]) == 0
    assert type(fake.calls[0]["strategy"]) is FedAvg
    assert fake.calls[0]["config"] is None


@pytest.mark.parametrize(
    ("toml", "message"),
    [
        ('adress = "x"', "unknown key 'adress'; did you mean 'address'?"),
        ("round_timeout = 3", "unknown key 'round_timeout'; did you mean 'round-timeout'?"),
        ("zzz = 1", "unknown key 'zzz'; valid keys: address, app, auth-window"),
        ('rounds = "3"', "rounds: expected an int, received '3'"),
        ("rounds = -1", "rounds: expected a value > 0, received -1"),
        ("insecure = 1", "insecure: expected a bool"),
        ('log-format = "fancy"', "log-format: expected one of"),
        ("rounds = [", "not valid TOML"),
    ],
)
def test_bad_config_files_exit_2_naming_the_key(
    here: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    toml: str,
    message: str,
) -> None:
    _server(monkeypatch)
    (here / "stamen.toml").write_text(toml + "\n")
    assert cli.main(["server", "--config", "stamen.toml"]) == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--strategy", "FedAvgg"], "unknown strategy 'FedAvgg'; did you mean 'FedAvg'?"),
        (
            ["--strategy-arg", "min_fit_client=2"],
            "FedAvg takes no argument 'min_fit_client'; did you mean 'min_fit_clients'?",
        ),
        (["--strategy-arg", "fraction_fit=7"], "--strategy FedAvg:"),
        (["--strategy-arg", "oops"], "--strategy-arg: expected one KEY=VALUE"),
        (["--run-config", "a=1"], "--run-config is for a ServerApp"),
        (["--config", "missing.toml"], "--config: cannot read 'missing.toml'"),
    ],
)
def test_bad_server_options_exit_2(
    here: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    argv: list[str],
    message: str,
) -> None:
    fake = _server(monkeypatch)
    assert cli.main(["server", *argv]) == 2
    assert message in capsys.readouterr().err
    assert not fake.calls


def test_strategy_names_are_the_concrete_strategies() -> None:
    names = cli.strategy_names()
    assert {"FedAvg", "FedProx", "Krum", "FedAdam"} <= set(names)
    assert "Strategy" not in names and "FedOpt" in names


@pytest.mark.parametrize("reference", ["cfg_clients:app", None])
def test_node_takes_a_client_app_or_client(
    here: Path, monkeypatch: pytest.MonkeyPatch, reference: str | None
) -> None:
    fake = FakeStart()
    monkeypatch.setattr(fl.client, "start_client", fake)
    (here / "node.toml").write_text(
        'server = "127.0.0.1:9"\ntransport = "rest"\nmax-retries = 2\n'
        'client-certificate = ["c.crt", "c.key"]\nnode-config = "partition-id=1"\n'
        + ("" if reference else 'client = "cfg_clients:client_fn"\n')
    )
    argv = ["node", *([reference] if reference else []), "--config", "node.toml"]
    assert cli.main([*argv, "--max-retries", "4", "--max-message-length", "1024"]) == 0
    (call,) = fake.calls
    assert call["server_address"] == "127.0.0.1:9"
    assert call["transport"] == "rest"
    assert call["max_retries"] == 4
    assert call["grpc_max_message_length"] == 1024
    assert call["client_certificates"] == (str(here / "c.crt"), str(here / "c.key"))
    assert callable(call["client_fn"])


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        ([], "stamen node needs a client: give a ClientApp as APP"),
        (["--client", "cfg_clients:number"], "found a int"),
        (["cfg_clients:app", "--client", "cfg_clients:client_fn"], "received both"),
    ],
)
def test_node_without_a_usable_client_exits_2(
    here: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    argv: list[str],
    message: str,
) -> None:
    monkeypatch.setattr(fl.client, "start_client", FakeStart())
    assert cli.main(["node", *argv, "--server", "127.0.0.1:9"]) == 2
    assert message in capsys.readouterr().err


def test_numpy_client_instance_is_a_client(here: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fake = FakeStart()
    monkeypatch.setattr(fl.client, "start_client", fake)
    assert cli.main(["node", "--client", "cfg_clients:numpy_client", "--server", "h:1"]) == 0
    assert callable(fake.calls[0]["client_fn"])


@pytest.mark.parametrize(
    ("error", "code", "said"),
    [
        (None, 0, "run completed"),
        (RunError("the server ended the run as failed: x"), 1, "the run failed"),
        (RuntimeError("client bug"), 1, "failed: RuntimeError"),
        (ConnectError("gave up"), 3, "gave up connecting"),
        (TLSError("untrusted"), 4, "refused: TLSError"),
        (AuthError("key not authorized"), 4, "refused: AuthError"),
        (ProtocolError("an HTTP/1 server"), 5, "wrong peer"),
        (ConfigError("server_address: bad"), 2, "server_address: bad"),
    ],
)
def test_node_exit_codes(
    here: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    error: BaseException | None,
    code: int,
    said: str,
) -> None:
    monkeypatch.setattr(fl.client, "start_client", FakeStart(error=error))
    assert cli.main(["node", "cfg_clients:app", "--server", "127.0.0.1:9"]) == code
    captured = capsys.readouterr()
    assert said in captured.out + captured.err


def test_log_file_and_json_format(here: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """--log-file receives the records; --log-format json makes them JSON lines."""

    def start_server(**kwargs: Any) -> History:
        logging.getLogger("stamen.server").info("hello %s", "file")
        return History()

    monkeypatch.setattr(fl.server, "start_server", start_server)
    argv = ["server", "--log-file", "s.log", "--log-format", "json"]
    assert cli.main(argv) == 0
    assert '"message": "hello file"' in (here / "s.log").read_text()


def test_every_command_has_help_with_an_example(capsys: pytest.CaptureFixture[str]) -> None:
    for command in (["server"], ["node"], ["plot"]):
        assert cli.main([*command, "--help"]) == 0
        assert "example" in capsys.readouterr().out
    assert cli.main(["--version"]) == 0
    assert capsys.readouterr().out.startswith("stamen ")
