"""benchmarks/domain_quality.py: bad input is refused before any model loads (exit 2, the value named, no output)."""

from __future__ import annotations

import pytest
from conftest import load_benchmark, refused


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (["--variants", "L22"], "'L22' is not NAME=ADAPTER_DIR or NAME=L:g"),
        (["--variants", "ok=22:1", "bad=no/such/adapter"], "--variants bad:"),
        (["--variants", "ok=22:1", "--limit", "0"], "--limit 0"),
    ],
)
def test_bad_input_exits_2_naming_the_value_and_writes_nothing(tmp_path, monkeypatch, capsys, args, says):
    quality = load_benchmark("domain_quality")
    monkeypatch.setattr(quality, "load_model", lambda *a, **k: pytest.fail("loaded a model before validating"))
    out, png = tmp_path / "d.json", tmp_path / "d.png"
    refused(quality.main, monkeypatch, ["domain_quality.py", *args, "--json", str(out), "--plot", str(png)], out, png)
    assert says in capsys.readouterr().err
