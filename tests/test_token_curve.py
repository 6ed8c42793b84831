"""benchmarks/token_curve.py: the power-law fit against a closed form, the table and plot, and its input errors."""

from __future__ import annotations

import json
import math
import sys

import pytest
from conftest import load_benchmark, refused


@pytest.fixture(scope="module")
def curve():
    return load_benchmark("token_curve")


def table(excess: dict[str, float], kl: float) -> dict:
    """A domain_quality.py entry with these perplexity excesses (ppl_ratio - 1) per source; overall = their mean."""
    rows = {name: {"ppl_ratio": 1 + value, "unseen": name == "plays"} for name, value in excess.items()}
    return {"sources": rows, "overall": {"ppl_ratio": 1 + sum(excess.values()) / len(excess), "kl": kl}}


def tables() -> dict:
    """'prose' halves per doubling from +16% at 1M tokens (reaches +3% at 16/3 M tokens); 'code' is already
    within +3% at the last point; 'plays' does not improve."""
    tokens = {"a": 1e6, "b": 2e6, "c": 4e6}
    return {
        name: table({"prose": 0.16 * (1e6 / t), "code": 0.04 if name == "a" else 0.02, "plays": 0.05}, 0.1 * 1e6 / t)
        for name, t in tokens.items()
    }


def test_fit_recovers_the_power_law_and_marks_met_and_unreachable(curve):
    result = curve.token_curve(tables(), {"a": 1e6, "b": 2e6, "c": 4e6}, target=0.03, kl_target=0.01)
    prose = result["sources"]["prose"]
    assert prose["per_doubling"] == pytest.approx(0.5)
    assert prose["tokens_to_target"] == pytest.approx(1e6 * 16 / 3)  # excess = 0.16 * 1e6 / tokens
    assert result["sources"]["code"]["met"] and result["sources"]["code"]["tokens_to_target"] is None
    plays = result["sources"]["plays"]
    assert not plays["met"] and plays["per_doubling"] == pytest.approx(1.0) and plays["tokens_to_target"] is None
    assert result["sources"]["plays"]["unseen"] and not result["sources"]["prose"]["unseen"]
    assert result["overall_kl"]["tokens_to_target"] == pytest.approx(1e7)  # kl = 0.1 * 1e6 / tokens
    assert math.isclose(result["overall"]["values"][0], (0.16 + 0.04 + 0.05) / 3)


def test_check_compares_a_left_out_variant_with_the_fits_prediction(curve):
    measured = tables() | {"d": table({"prose": 0.025, "code": 0.02, "plays": 0.05}, 0.01)}  # prose flattened
    result = curve.token_curve(measured, {"a": 1e6, "b": 2e6}, target=0.03, kl_target=None, check=("d", 8e6))
    assert result["check"]["variant"] == "d" and result["check"]["tokens"] == 8e6
    rows = result["check"]["rows"]
    assert rows["prose"]["predicted"] == pytest.approx(0.02) and rows["prose"]["measured"] == pytest.approx(0.025)
    assert rows["plays"]["predicted"] == pytest.approx(0.05)  # flat fit: the same value
    assert rows["code"]["predicted"] is None and rows["code"]["measured"] == pytest.approx(0.02)  # met at b: no fit
    assert rows["overall"]["measured"] == pytest.approx((0.025 + 0.02 + 0.05) / 3)
    printed = "\n".join(curve.summary(result))
    assert "d predicted" in printed and "+2.0%" in printed and "+2.5%" in printed
    assert "overall_kl" not in rows and "overall KL" not in printed  # no KL fit asked for


def test_check_compares_the_kl_when_it_is_fitted(curve):
    measured = tables() | {"d": table({"prose": 0.02, "code": 0.02, "plays": 0.05}, 0.02)}
    result = curve.token_curve(measured, {"a": 1e6, "b": 2e6}, target=0.03, kl_target=0.01, check=("d", 8e6))
    kl = result["check"]["rows"]["overall_kl"]
    assert kl["predicted"] == pytest.approx(0.0125) and kl["measured"] == pytest.approx(0.02)  # 0.1 * 1e6 / 8e6
    printed = [line for line in curve.summary(result) if line.startswith("overall KL")]
    assert len(printed) == 1 and "0.0125" in printed[0] and "0.0200" in printed[0]


def test_cli_writes_json_and_plot_and_prints_the_table(curve, tmp_path, monkeypatch, capsys):
    source = tmp_path / "domains.json"
    source.write_text(json.dumps(tables()))
    out, png = tmp_path / "curve.json", tmp_path / "curve.png"
    argv = ["token_curve.py", "--json", str(source), "--series", "c=4e6", "a=1e6", "b=2e6"]
    monkeypatch.setattr(sys, "argv", [*argv, "--out", str(out), "--plot", str(png)])
    curve.main()
    written = json.loads(out.read_text())
    assert list(written["series"]) == ["a", "b", "c"]  # sorted by tokens
    assert png.stat().st_size > 0
    printed = capsys.readouterr().out
    assert "5M" in printed.splitlines()[1] and "met" in printed and "out of reach" in printed


@pytest.mark.parametrize(
    ("series", "says"),
    [
        (["a=1e6", "z=2e6"], "'z' is not a variant"),
        (["a=1e6", "b=lots"], "is not NAME=TOKENS"),
        (["a=1e6", "b=0"], "must be > 0"),
        (["a=1e6"], "at least two"),
        (["a=1e6", "b=2e6", "--check", "b=2e6"], "must be left out of the fit"),
        (["a=1e6", "b=2e6", "--check", "q=4e6"], "--check: 'q' is not a variant"),
    ],
)
def test_bad_series_exits_2_naming_the_value_and_writes_nothing(curve, tmp_path, monkeypatch, capsys, series, says):
    source = tmp_path / "domains.json"
    source.write_text(json.dumps(tables()))
    out = tmp_path / "curve.json"
    argv = ["token_curve.py", "--json", str(source), "--series", *series, "--out", str(out), "--plot", "x.png"]
    refused(curve.main, monkeypatch, argv, out)
    assert says in capsys.readouterr().err
