"""``stamen server`` / ``stamen node``: loading apps, configuration errors, exit codes; the
``log``/``configure`` helpers (no sockets: start_server/start_client are faked)."""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import stamen as fl
from stamen import cli
from stamen.app_loader import load_app, parse_config
from stamen.errors import ConfigError, ConnectError, NotEnoughClients
from stamen.server.history import History

APP_MODULE = """
import stamen as fl
from stamen.server import ServerAppComponents, ServerConfig

class C(fl.client.NumPyClient):
    def fit(self, parameters, config):
        return parameters, 1, {}

client_app = fl.client.ClientApp(client_fn=lambda context: C().to_client())
server_app = fl.server.ServerApp(
    server_fn=lambda context: ServerAppComponents(config=ServerConfig(num_rounds=2))
)
not_an_app = 42
"""


@pytest.fixture
def app_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A directory with ``cli_test_app.py``, made the current directory."""
    (tmp_path / "cli_test_app.py").write_text(APP_MODULE)
    (tmp_path / "broken_app.py").write_text("raise RuntimeError('broken on import')\n")
    (tmp_path / "needs_dep.py").write_text("import no_such_dependency_xyz\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", list(sys.path))
    yield tmp_path
    for name in ("cli_test_app", "broken_app", "needs_dep"):
        sys.modules.pop(name, None)


@pytest.fixture(autouse=True)
def _restore_stamen_log_level() -> Iterator[None]:
    logger = logging.getLogger("stamen")
    level, handlers = logger.level, list(logger.handlers)
    yield
    logger.setLevel(level)
    for handler in logger.handlers[:]:
        if handler not in handlers:
            logger.removeHandler(handler)
            handler.close()


def test_load_app_finds_apps_in_the_current_directory(app_dir: Path) -> None:
    """'module:attribute' importable from the current directory."""
    assert isinstance(load_app("cli_test_app:client_app", fl.client.ClientApp), fl.client.ClientApp)
    assert isinstance(load_app("cli_test_app:server_app", fl.server.ServerApp), fl.server.ServerApp)


@pytest.mark.parametrize(
    ("reference", "message"),
    [
        (
            "cli_test_app",
            r"expected 'module:attribute' naming a ServerApp .*received 'cli_test_app'",
        ),
        (
            "no_such_module_xyz:app",
            r"expected a module 'no_such_module_xyz' importable from .*found none",
        ),
        (
            "cli_test_app:missing",
            r"expected attribute 'missing' .*it has ServerApp\(s\): \['server_app'\]",
        ),
        (
            "cli_test_app:client_app",
            r"to be a ServerApp, found a ClientApp \(its ServerApp\(s\): \['server_app'\]\)",
        ),
        ("cli_test_app:not_an_app", r"found a int"),
        ("broken_app:app", r"importing 'broken_app' raised RuntimeError: broken on import"),
        (
            "needs_dep:app",
            r"importing 'needs_dep' failed: No module named 'no_such_dependency_xyz'",
        ),
    ],
)
def test_bad_references_are_config_errors_saying_what_was_found(
    app_dir: Path, reference: str, message: str
) -> None:
    """Each bad reference: ConfigError naming what was expected and what was found."""
    with pytest.raises(ConfigError, match=message):
        load_app(reference, fl.server.ServerApp)


def test_bad_reference_exits_2_with_the_message(
    app_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``stamen server cli_test_app:client_app``: exit 2, the error on stderr."""
    assert cli.main(["server", "cli_test_app:client_app"]) == 2
    err = capsys.readouterr().err
    assert "stamen server: error: app: expected 'cli_test_app:client_app' to be a ServerApp" in err
    assert cli.main(["node", "cli_test_app:server_app", "--server", "127.0.0.1:1"]) == 2
    assert "found a ServerApp" in capsys.readouterr().err


def test_node_requires_a_server_address(capsys: pytest.CaptureFixture[str]) -> None:
    """``stamen node app:x`` without --server: usage error 2."""
    assert cli.main(["node", "cli_test_app:client_app"]) == 2
    assert "--server" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (None, {}),
        ("partition-id=0 num-partitions=2", {"partition-id": 0, "num-partitions": 2}),
        (
            "a=\"x y\" b='z' c=0.5 d=true e=word",
            {"a": "x y", "b": "z", "c": 0.5, "d": True, "e": "word"},
        ),
    ],
)
def test_parse_config(text: str | None, expected: dict[str, Any]) -> None:
    """Flower's --node-config form: quoted strings, bools, ints, floats."""
    assert parse_config(text) == expected


def test_parse_config_rejects_words_without_a_value() -> None:
    """A word that is not key=value: ConfigError naming it."""
    with pytest.raises(ConfigError, match="not understood: 'oops'"):
        parse_config("a=1 oops")


class FakeStart:
    """Stands in for start_server/start_client: records keywords, returns or raises."""

    def __init__(self, result: Any = None, error: BaseException | None = None) -> None:
        self.calls: list[dict[str, Any]] = []
        self.result, self.error = result, error

    def __call__(self, **kwargs: Any) -> Any:
        self.calls.append(kwargs)
        if self.error is not None:
            raise self.error
        return self.result


def test_server_runs_the_apps_components_and_writes_history(
    app_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The server_fn's config goes to start_server with --address/--rest-address; exit 0;
    --history gets the History as JSON; --run-config reaches context.run_config."""
    history = History()
    history.add_loss_distributed(1, 0.5)
    fake = FakeStart(result=history)
    monkeypatch.setattr(fl.server, "start_server", fake)
    code = cli.main(
        [
            "server",
            "cli_test_app:server_app",
            "--address",
            "127.0.0.1:0",
            "--rest-address",
            "127.0.0.1:0",
            "--history",
            "h.json",
        ]
    )
    assert code == 0
    (call,) = fake.calls
    assert call["server_address"] == "127.0.0.1:0"
    assert call["rest_address"] == "127.0.0.1:0"
    assert call["config"] == fl.server.ServerConfig(num_rounds=2)
    assert call["certificates"] is None
    assert History.from_dict(json.loads((app_dir / "h.json").read_text())) == history


def test_server_exit_codes(app_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A failed run is 1 (Stamen's error or the app's), a configuration error 2."""
    for error, code in (
        (NotEnoughClients("too few"), 1),
        (ZeroDivisionError("in the strategy"), 1),
        (ConfigError("server_address: bad"), 2),
    ):
        monkeypatch.setattr(fl.server, "start_server", FakeStart(error=error))
        assert cli.main(["server", "cli_test_app:server_app"]) == code, error


def test_server_tls_needs_all_three_files(app_dir: Path) -> None:
    """One of the --ssl-* files alone: configuration error 2."""
    assert cli.main(["server", "cli_test_app:server_app", "--ssl-certfile", "x.crt"]) == 2


def test_node_runs_the_app_and_maps_exit_codes(
    app_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """start_client gets the app's client_fn (with --node-config) and the options; a
    completed run is 0, giving up connecting 3, another failure 1."""
    fake = FakeStart()
    monkeypatch.setattr(fl.client, "start_client", fake)
    argv = ["node", "cli_test_app:client_app", "--server", "127.0.0.1:9", "--insecure"]
    assert cli.main([*argv, "--transport", "rest", "--max-retries", "2"]) == 0
    (call,) = fake.calls
    assert (call["server_address"], call["transport"], call["insecure"]) == (
        "127.0.0.1:9",
        "rest",
        True,
    )
    assert call["max_retries"] == 2
    assert callable(call["client_fn"])
    for error, code in ((ConnectError("gave up"), 3), (RuntimeError("x"), 1)):
        monkeypatch.setattr(fl.client, "start_client", FakeStart(error=error))
        assert cli.main(argv) == code


def test_log_writes_to_the_stamen_logger(caplog: pytest.LogCaptureFixture) -> None:
    """fl.common.log(level, msg, *args) logs on 'stamen', at the caller's line."""
    with caplog.at_level(logging.INFO, logger="stamen"):
        fl.common.log(logging.INFO, "round %d of %s", 3, "10")
    (record,) = [r for r in caplog.records if r.getMessage() == "round 3 of 10"]
    assert record.name == "stamen"
    assert record.filename == "test_cli_apps.py"
    from stamen.common.logger import log

    assert log is fl.common.log


def test_configure_adds_a_file_handler(tmp_path: Path) -> None:
    """configure(identifier, filename=...) appends formatted records to the file."""
    path = tmp_path / "stamen.log"
    fl.common.configure("node-7", filename=str(path))
    logging.getLogger("stamen").setLevel(logging.INFO)
    fl.common.log(logging.INFO, "hello %s", "file")
    for handler in logging.getLogger("stamen").handlers:
        handler.flush()
    text = path.read_text()
    assert text.startswith("node-7 | INFO ")
    assert text.rstrip().endswith("| hello file")
