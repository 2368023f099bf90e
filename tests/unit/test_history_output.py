"""History printed per round (as Flower's), as CSV, and drawn as a PNG; ``stamen plot``."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest

from stamen import cli
from stamen.errors import ConfigError
from stamen.server.history import History


def _history() -> History:
    history = History()
    history.add_loss_centralized(0, 2.0)
    for r in (1, 2, 3):
        history.add_loss_distributed(r, 1.0 / r)
        history.add_loss_centralized(r, 2.0 / r)
        history.add_metrics_distributed_fit(r, {"n": r})
        history.add_metrics_distributed(r, {"accuracy": 0.5 + r / 10, "tag": "x"})
        history.add_metrics_centralized(r, {"accuracy": 0.4 + r / 10})
    return history


def test_str_has_a_line_per_round_like_flower() -> None:
    """print(history): a section per series, a tab-indented line per round."""
    lines = str(_history()).splitlines()
    assert lines[:4] == [
        "History (loss, distributed):",
        "\tround 1: 1.0",
        "\tround 2: 0.5",
        "\tround 3: 0.3333333333333333",
    ]
    assert "History (metrics, distributed, evaluate):" in lines
    assert "\tround 1: accuracy=0.6, tag='x'" in lines
    assert str(History()) == "History (empty)"


def test_to_csv_has_a_row_per_round_and_a_column_per_series(tmp_path: Path) -> None:
    """Columns: round, then each series; empty cells where a round has no value."""
    path = tmp_path / "h.csv"
    text = _history().to_csv(path)
    assert path.read_text() == text
    rows = [line.split(",") for line in text.splitlines()]
    assert rows[0] == [
        "round",
        "loss_distributed",
        "loss_centralized",
        "fit_n",
        "distributed_accuracy",
        "distributed_tag",
        "centralized_accuracy",
    ]
    assert rows[1] == ["0", "", "2.0", "", "", "", ""]
    assert rows[2][:4] == ["1", "1.0", "2.0", "1"]
    assert len(rows) == 5


def _png_size(data: bytes) -> tuple[int, int]:
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    assert data[12:16] == b"IHDR"
    width, height = struct.unpack(">II", data[16:24])
    return width, height


def test_plot_writes_a_png_with_one_line_per_series(tmp_path: Path) -> None:
    """Panels: loss (distributed, centralized), n (fit), accuracy (evaluate, centralized);
    the string metric is left out. The file is a valid PNG."""
    pytest.importorskip("matplotlib", reason="matplotlib (stamen[plot]) is not installed")
    history = _history()
    figure = history.figure()
    lines = {ax.get_title(): [line.get_label() for line in ax.get_lines()] for ax in figure.axes}
    assert lines == {
        "loss": ["distributed", "centralized"],
        "n": ["distributed, fit"],
        "accuracy": ["distributed, evaluate", "centralized"],
    }
    path = history.plot(tmp_path / "curves.png")
    width, height = _png_size(path.read_bytes())
    assert width > 100 and height > 100


def test_plot_of_an_empty_history_is_a_config_error(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib", reason="matplotlib (stamen[plot]) is not installed")
    with pytest.raises(ConfigError, match="no numeric series"):
        History().plot(tmp_path / "x.png")


def test_stamen_plot_command(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """stamen plot HISTORY.json -o curves.png --csv: exit 0, both files written; a file
    that is not JSON: exit 2."""
    pytest.importorskip("matplotlib", reason="matplotlib (stamen[plot]) is not installed")
    source = tmp_path / "demo-history.json"
    source.write_text(_history().to_json())
    png, table = tmp_path / "curves.png", tmp_path / "curves.csv"
    assert cli.main(["plot", str(source), "-o", str(png), "--csv", str(table)]) == 0
    _png_size(png.read_bytes())
    assert table.read_text().startswith("round,")
    assert f"wrote {png}" in capsys.readouterr().out
    (tmp_path / "bad.json").write_text("{")
    assert cli.main(["plot", str(tmp_path / "bad.json")]) == 2
    assert json.loads(source.read_text())  # left alone
