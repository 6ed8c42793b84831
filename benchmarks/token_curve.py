"""How a layout's quality improves with distillation tokens, and how many tokens its target needs at that rate.

Input: the per-domain tables of `domain_quality.py` (one JSON, one entry per variant) for a series of adapters of
one layout where each continues the one before, each given with the mixture tokens it has seen in all. Per source
the perplexity excess (ratio to base - 1) is fitted as a power law of the tokens, excess = a * tokens^b, by least
squares on log-log over the points where the excess is positive; the same for the overall KL. Reported: the
factor per doubling of the tokens (2^b) and the tokens where the fit crosses the target. A power law without a
floor is the optimistic reading: if the curve flattens (a capacity limit), more tokens stop helping sooner.
`--check NAME=TOKENS` tests the forecast: a later variant, left out of the fit, measured against the fit's
prediction at its tokens.

    python benchmarks/token_curve.py --json results/domains_smollm2.json --target 0.03 --kl-target 0.02 \\
        --series L22-mix=296e3 L22-mix2=506e3 L22-mix3=1.847e6 L22-mix4=2.104e6 L22-mix5=3.688e6 L22-mix6=5.225e6 \\
        L22-mix7=6.785e6 L22-mix8=9.529e6 --out results/tokens_L22.json --plot results/tokens_L22.png
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import numpy as np

from swiftkv.files import read_json_file, save_figure, write_json

MAX_TOKENS = 1e12  # a fit that crosses the target beyond this is reported as out of reach (null)


def parse_point(item: str, tables: dict, option: str) -> tuple[str, float]:
    """'NAME=TOKENS' -> (NAME, tokens); NAME must be a variant of the JSON."""
    name, _, tokens = item.partition("=")
    if name not in tables:
        raise ValueError(f"{option}: {name!r} is not a variant of the JSON (it has: {', '.join(tables)})")
    try:
        value = float(tokens)
    except ValueError:
        raise ValueError(f"{option}: {item!r} is not NAME=TOKENS (TOKENS a number, e.g. 2.1e6)") from None
    if value <= 0:
        raise ValueError(f"{option}: {item!r}: TOKENS must be > 0")
    return name, value


def parse_series(items: list[str], tables: dict) -> dict[str, float]:
    """['NAME=TOKENS', ...] -> {NAME: tokens}, in increasing tokens; every NAME must be a variant of the JSON."""
    series = dict(parse_point(item, tables, "--series") for item in items)
    if len(series) < 2:
        raise ValueError("--series: give at least two variants to fit a curve through")
    return dict(sorted(series.items(), key=lambda item: item[1]))


def fit(tokens: list[float], values: list[float], target: float) -> dict:
    """Power-law fit of `values` (> 0 only) over `tokens`: factor per doubling and tokens where it reaches target."""
    points = [(t, v) for t, v in zip(tokens, values, strict=True) if v > 0]
    row = {"values": values, "met": values[-1] <= target, "fit": None, "per_doubling": None, "tokens_to_target": None}
    if row["met"] or len(points) < 2:
        return row
    slope, intercept = np.polyfit(np.log([t for t, _ in points]), np.log([v for _, v in points]), 1)
    row["fit"] = {"slope": float(slope), "intercept": float(intercept)}  # log(value) = intercept + slope * log(tokens)
    row["per_doubling"] = float(2**slope)
    # in log space: a flat fit has a slope of ~-1e-17, and exp() of its crossing would overflow
    log_needed = (math.log(target) - intercept) / slope if slope < 0 else math.inf
    if log_needed <= math.log(MAX_TOKENS):
        row["tokens_to_target"] = math.exp(log_needed)
    return row


def predict(row: dict, tokens: float) -> float | None:
    """The fitted excess at `tokens` (None where there is no fit: met, or fewer than two positive points)."""
    return math.exp(row["fit"]["intercept"] + row["fit"]["slope"] * math.log(tokens)) if row["fit"] else None


def token_curve(
    tables: dict,
    series: dict[str, float],
    target: float,
    kl_target: float | None,
    check: tuple[str, float] | None = None,
) -> dict:
    """Fits per source (perplexity excess) and overall (perplexity excess, KL) over the series' tokens; with
    `check` (NAME, tokens), each fit's prediction there beside that variant's measurement (the KL's too, as the
    row "overall_kl", when it is fitted)."""
    tokens = list(series.values())
    entries = [tables[name] for name in series]
    sources = list(entries[-1]["sources"])
    result = {"target": target, "series": series, "sources": {}}
    for source in sources:
        excess = [entry["sources"][source]["ppl_ratio"] - 1 for entry in entries]
        result["sources"][source] = fit(tokens, excess, target) | {"unseen": entries[-1]["sources"][source]["unseen"]}
    result["overall"] = fit(tokens, [entry["overall"]["ppl_ratio"] - 1 for entry in entries], target)
    if kl_target is not None:
        result["overall_kl"] = fit(tokens, [entry["overall"]["kl"] for entry in entries], kl_target)
    if check is not None:
        name, at = check
        measured = {source: row["ppl_ratio"] - 1 for source, row in tables[name]["sources"].items()}
        measured["overall"] = tables[name]["overall"]["ppl_ratio"] - 1
        measured["overall_kl"] = tables[name]["overall"]["kl"]
        fits = result["sources"] | {key: result[key] for key in ("overall", "overall_kl") if key in result}
        result["check"] = {
            "variant": name,
            "tokens": at,
            "rows": {row: {"predicted": predict(fits[row], at), "measured": measured[row]} for row in fits},
        }
    return result


def plot(result: dict, path: Path) -> None:
    """Excess vs tokens (log-log) for the overall row and every source still above the target, each fit drawn on
    (dotted) to where it reaches the target, at most to 1000x the last tokens."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tokens = np.array(list(result["series"].values()))
    fig, ax = plt.subplots(figsize=(8, 5))
    missing = {name: row for name, row in result["sources"].items() if not row["met"]}
    for i, (name, row) in enumerate((missing | {"overall": result["overall"]}).items()):
        color = "black" if name == "overall" else plt.cm.tab10(i % 10)
        label = f"{name} (unseen)" if row.get("unseen") else name
        ax.plot(tokens, 100 * np.array(row["values"]), "o-", color=color, label=label, lw=2 if name == "overall" else 1)
        if row["fit"]:
            ends = np.array([tokens[0], min(row["tokens_to_target"] or math.inf, 1000 * tokens[-1])])
            ax.plot(ends, [100 * predict(row, end) for end in ends], ":", color=color)
        if "check" in result:  # the held-out point: hollow, not part of the fit
            measured = result["check"]["rows"][name]["measured"]
            ax.plot(result["check"]["tokens"], 100 * measured, "o", mfc="none", ms=9, color=color)
    ax.axhline(100 * result["target"], color="grey", ls="--", lw=0.8, label=f"target +{result['target']:.0%}")
    ax.set(xscale="log", yscale="log", xlabel="distillation tokens seen", ylabel="perplexity vs base (%)")
    ax.yaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%g"))  # 4, 6 rather than 4x10^0
    ax.yaxis.set_minor_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
    checked = f"; hollow: {result['check']['variant']}, left out of the fit" if "check" in result else ""
    ax.set_title(f"sources above the target, power-law fits (dotted){checked}", fontsize=9)
    ax.legend(fontsize=7, ncol=2)
    ax.grid(alpha=0.3, which="both")
    save_figure(fig, path)


def summary(result: dict) -> list[str]:
    rows = result["sources"] | {"overall": result["overall"]}
    check = result.get("check")
    header = f"{'source':<22} {'now':>8} {'per doubling':>13} {'tokens to +' + format(result['target'], '.0%'):>16}"
    if check:
        header += f" {check['variant'] + ' predicted':>24} {'measured':>9}"
    lines = [header]
    for name, row in rows.items():
        if row["met"]:
            reach = "met"
        elif row["tokens_to_target"] is None:
            reach = "out of reach"
        else:
            reach = f"{row['tokens_to_target'] / 1e6:.0f}M"
        doubling = f"x{row['per_doubling']:.2f}" if row["per_doubling"] else "-"
        line = f"{name:<22} {row['values'][-1]:>+8.1%} {doubling:>13} {reach:>16}"
        if check:
            predicted, measured = check["rows"][name]["predicted"], check["rows"][name]["measured"]
            line += f" {format(predicted, '+.1%') if predicted is not None else '-':>24} {measured:>+9.1%}"
        lines.append(line)
    if check and "overall_kl" in check["rows"]:
        kl = check["rows"]["overall_kl"]
        predicted = format(kl["predicted"], ".4f") if kl["predicted"] is not None else "-"
        lines.append(f"{'overall KL':<22} {'':>8} {'':>13} {'':>16} {predicted:>24} {kl['measured']:>9.4f}")
    return lines


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", type=Path, required=True, help="domain_quality.py's JSON")
    p.add_argument("--series", nargs="+", required=True, help="NAME=TOKENS: a variant and the tokens it has seen")
    p.add_argument("--target", type=float, default=0.03, help="perplexity excess to reach (0.03 = +3%%)")
    p.add_argument("--kl-target", type=float, default=None, help="also fit the overall KL to this value")
    p.add_argument("--check", help="NAME=TOKENS: a variant left out of the fit, compared with its prediction")
    p.add_argument("--out", type=Path, required=True, help="JSON to write")
    p.add_argument("--plot", type=Path, required=True, help="PNG to write")
    args = p.parse_args()
    if not 0 < args.target < 10:
        p.error(f"--target {args.target}: give the perplexity excess as a fraction, e.g. 0.03 for +3%")
    try:  # validate everything before writing anything
        tables = read_json_file(args.json, "the domain_quality JSON")
        series = parse_series(args.series, tables)
        check = parse_point(args.check, tables, "--check") if args.check else None
        if check and check[0] in series:
            raise ValueError(
                f"--check: {check[0]!r} is also in --series; the checked variant must be left out of the fit"
            )
    except (OSError, ValueError) as error:
        p.error(str(error))
    result = token_curve(tables, series, args.target, args.kl_target, check)
    write_json(result, args.out)
    plot(result, args.plot)
    print("\n".join(summary(result)))
    print(f"wrote {args.out} and {args.plot}")


if __name__ == "__main__":
    main()
