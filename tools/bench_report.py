"""Compare `vllm bench serve` results (bench.py) with a baseline or a previous run; decide on
speculative decoding from an A/B pair.

    bench-report compare RUN [--baseline REF] [--out DIR] [--tolerance F]
                             [--p99-tolerance F] [--group NAME ...]
    bench-report ab OFF ON [--out DIR] [--min-gain F]     # same workload, draft off/on
    bench-report ab BASELINE_FILE                         # a baseline's own two variants

RUN, OFF, ON and REF name results: a run folder (results/bench/<run id>, one <host>.json per
host), one result JSON, or a baseline file (baselines/*.json) with an optional #variant
(default #speculative-off). The baseline defaults to data key `bench_baseline`; tolerances and
the minimum gain to data keys, read from group_data/all.py and the --group files, each a
fraction in [0, 1) (0.10 is 10%).

Writes report.md and report.png (ab: ab-report.md, ab-report.png) into --out (default: the
run's folder) and prints the markdown. Exit status: 0 no regression (ab: a recommendation was
made), 1 a regression beyond tolerance, 2 the inputs cannot be compared (different workloads,
a baseline or OFF run with failed requests, A/B runs swapped, missing files, a threshold out
of range).
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path

from tools.repository import REPO, group_data, missing_packages

DEFAULT_VARIANT = "speculative-off"

# (result key, label, unit, +1 when higher is better / -1 when lower is better)
THROUGHPUT_METRICS = [
    ("output_throughput", "Output token throughput", "tok/s", +1),
    ("total_token_throughput", "Total token throughput", "tok/s", +1),
    ("request_throughput", "Request throughput", "req/s", +1),
]
LATENCY_METRICS = [
    (f"{stat}_{name}_ms", f"{stat.capitalize() if stat != 'p99' else 'P99'} {name.upper()}",
     "ms", -1)
    for name in ("ttft", "tpot", "itl") for stat in ("mean", "median", "p99")
]
SPECULATIVE_METRICS = [
    ("spec_decode_acceptance_rate", "Acceptance rate", "%", +1),
    ("spec_decode_acceptance_length", "Acceptance length", "tokens/step", +1),
]
METRICS = THROUGHPUT_METRICS + LATENCY_METRICS + SPECULATIVE_METRICS
# What makes two results the same work; anything else may differ between compared runs.
WORKLOAD_KEYS = ("bench_profile", "num_prompts", "request_rate")
# Prometheus counters of vLLM's speculative decoding (summed over engines and labels).
SPEC_COUNTERS = {
    "drafts": "vllm:spec_decode_num_drafts_total",
    "draft_tokens": "vllm:spec_decode_num_draft_tokens_total",
    "accepted_tokens": "vllm:spec_decode_num_accepted_tokens_total",
}
BASELINE_COLORS = ["#7f7f7f", "#b0b0b0", "#4d4d4d", "#d0d0d0"]
RUN_COLORS = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2",
              "#bcbd22", "#17becf"]
# The seed's rule of thumb (6.3): below ~60% acceptance, verifying drafts costs more than it
# saves. Far below it, the draft was most likely trained for another model (the seed's 1.28%).
PAYING_ACCEPTANCE_PERCENT = 60
MISMATCHED_DRAFT_PERCENT = 20
RANDOM_PROMPTS_WARNING = (
    "these are random prompts: random prompts overstate draft acceptance compared with chat "
    "prompts, so real traffic accepts fewer drafts than measured here. Confirm an ON with a "
    "chat-like dataset before enabling the draft in production.")


def run_color(index: int) -> str:
    return RUN_COLORS[index % len(RUN_COLORS)]


class InputError(Exception):
    """Results that cannot be read or compared; exit status 2."""


@dataclass
class Result:
    """One host's result (or one baseline variant): vLLM's result JSON and where it came from."""

    label: str
    data: dict
    source: Path
    note: str = ""  # where the numbers come from, when worth saying
    scraped: bool = False  # acceptance counted from this run's /metrics scrapes

    def get(self, key: str):
        value = self.data.get(key)
        return value if isinstance(value, (int, float)) and not isinstance(value, bool) else None

    def workload(self) -> dict:
        return {key: self.data.get(key) for key in WORKLOAD_KEYS if self.data.get(key) is not None}


# --- reading ----------------------------------------------------------------------------------

def parse_prometheus(text: str) -> dict[str, float]:
    """Sum of every sample of each metric name (labels dropped): engines and positions add up."""
    totals: dict[str, float] = {}
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if "{" in line:  # name{label="value with spaces",...} value [timestamp]
            name, rest = line[:line.index("{")], line[line.rindex("}") + 1:].split()
        else:
            name, *rest = line.split()
        try:
            totals[name] = totals.get(name, 0.0) + float(rest[0])
        except (IndexError, ValueError):
            continue
    return totals


def speculative_from_scrapes(before: str, after: str) -> dict | None:
    """Acceptance over the run from the /metrics counters before and after it, in the keys of
    vLLM's result JSON; None when the server exposes no speculative-decoding counters."""
    first, last = parse_prometheus(before), parse_prometheus(after)
    if not all(name in last for name in SPEC_COUNTERS.values()):
        return None
    delta = {key: last[name] - first.get(name, 0.0) for key, name in SPEC_COUNTERS.items()}
    if delta["drafts"] <= 0 or delta["draft_tokens"] <= 0:
        return None
    return {
        "spec_decode_num_drafts": int(delta["drafts"]),
        "spec_decode_draft_tokens": int(delta["draft_tokens"]),
        "spec_decode_accepted_tokens": int(delta["accepted_tokens"]),
        "spec_decode_acceptance_rate": 100 * delta["accepted_tokens"] / delta["draft_tokens"],
        # Each step emits the accepted drafts plus the one token the target model adds.
        "spec_decode_acceptance_length": 1 + delta["accepted_tokens"] / delta["drafts"],
    }


def load_result_file(path: Path) -> Result:
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise InputError(f"{path}: not a readable result JSON ({error})") from error
    if "completed" not in data:
        raise InputError(f"{path}: no 'completed' key: not a `vllm bench serve` result")
    host = path.name[:-len(".json")]
    result = Result(label=str(data.get("host", host)), data=data, source=path)
    before = path.with_name(f"{host}.metrics-before.prom")
    after = path.with_name(f"{host}.metrics-after.prom")
    if before.is_file() and after.is_file():
        scraped = speculative_from_scrapes(before.read_text(), after.read_text())
        if scraped:
            # The scrapes are the server's own count over exactly this run.
            result.data = {**data, **scraped}
            result.scraped = True
    return result


def load_baseline(path: Path, variant: str | None) -> Result:
    document = json.loads(path.read_text())
    variant = variant or DEFAULT_VARIANT
    runs = document.get("runs", {})
    if variant not in runs:
        raise InputError(f"{path}: no variant {variant!r}; it has {sorted(runs)}")
    data = {**document.get("metadata", {}), **runs[variant]}
    return Result(label=f"{document.get('name', path.stem)}#{variant}", data=data, source=path,
                  note=document.get("source", ""))


def load(ref: str) -> tuple[list[Result], bool]:
    """Results named by a reference, and whether it is a baseline file."""
    path_text, _, variant = ref.partition("#")
    path = Path(path_text)
    if path.is_dir():
        results = []
        for candidate in sorted(path.glob("*.json")):
            try:
                results.append(load_result_file(candidate))
            except InputError:
                continue  # reports and other files kept beside the results
        if not results:
            raise InputError(f"{path}: no result JSON (<host>.json) in this folder")
        return results, False
    if not path.is_file():
        raise InputError(f"{ref}: no such file or folder")
    try:
        document = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise InputError(f"{path}: not JSON ({error})") from error
    if "runs" in document:
        return [load_baseline(path, variant or None)], True
    return [load_result_file(path)], False


def data_defaults(groups: list[str], directory: Path = REPO / "group_data") -> dict:
    """group_data/all.py, then each named group file on top, as pyinfra merges them."""
    try:
        return group_data(*groups, directory=directory)
    except FileNotFoundError as error:
        raise InputError(str(error)) from error


def setting(args_value, data: dict, key: str, flag: str):
    if args_value is not None:
        return args_value
    if data.get(key) is None:
        raise InputError(f"data key {key} is not set in group_data: pass {flag}")
    return data[key]


def fraction(args_value, data: dict, key: str, flag: str) -> float:
    """A threshold (a tolerance, the minimum gain) from its flag or its data key, checked: a
    fraction of the baseline in [0, 1). At 1 a throughput of zero would pass, and 10 is most
    likely 10% written as a percentage."""
    value = setting(args_value, data, key, flag)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 1:
        source = flag if args_value is not None else f"data key {key}"
        raise InputError(f"{source}: found {value!r}; need a fraction in [0, 1) "
                         "(0.10 is 10%)")
    return float(value)


# --- comparing --------------------------------------------------------------------------------

def fmt(value) -> str:
    if value is None:
        return "—"
    return str(value) if isinstance(value, int) else f"{value:.2f}"


def limit_for(key: str, direction: int, tolerance: float, p99_tolerance: float) -> float:
    allowed = p99_tolerance if key.startswith("p99_") else tolerance
    return 1 - allowed if direction > 0 else 1 + allowed


def compare(run: Result, base: Result, tolerance: float, p99_tolerance: float,
            comparable: bool = True):
    """Table rows and the metrics beyond tolerance of one run against one baseline; results of
    different workloads are only marked outside or within tolerance."""
    bad = "REGRESSION" if comparable else "outside"
    rows, regressions = [], []
    failed = run.get("failed")
    for key, label, unit, direction in METRICS:
        ours, theirs = run.get(key), base.get(key)
        if ours is None and theirs is None:
            continue
        ratio = ours / theirs if ours is not None and theirs else None
        check = ""
        if ratio is not None:
            limit = limit_for(key, direction, tolerance, p99_tolerance)
            worse = ratio < limit if direction > 0 else ratio > limit
            check = f"{bad} (limit {limit:.2f})" if worse else ("ok" if comparable else "within")
            if worse:
                regressions.append(f"{label} {fmt(ours)} {unit} vs {fmt(theirs)} "
                                   f"({ratio:.2f}x, limit {limit:.2f}x)")
        rows.append((f"{label} ({unit})", fmt(theirs), fmt(ours),
                     f"{ratio:.2f}" if ratio is not None else "—", check))
    rows.append(("Failed requests", fmt(base.get("failed")), fmt(failed), "—",
                 "REGRESSION" if failed else "ok"))
    return rows, regressions


def same_value(ours, theirs) -> bool:
    if isinstance(ours, (int, float)) and isinstance(theirs, (int, float)):
        return float(ours) == float(theirs)  # 10 req/s in a baseline, 10.0 in vLLM's JSON
    return str(ours) == str(theirs)


def workload_difference(run: Result, base: Result) -> str | None:
    ours, theirs = run.workload(), base.workload()
    differing = [f"{key} {ours[key]} vs {theirs[key]}" for key in ours
                 if key in theirs and not same_value(ours[key], theirs[key])]
    return "; ".join(differing) or None


def markdown_table(rows, headers, numeric: int) -> list[str]:
    """The first column names, the next `numeric` hold numbers (right-aligned), then text."""
    lines = ["| " + " | ".join(headers) + " |",
             "|---|" + "---:|" * numeric + "---|" * (len(headers) - 1 - numeric)]
    return lines + ["| " + " | ".join(row) + " |" for row in rows]


def describe(result: Result) -> str:
    data = result.data
    parts = [f"vLLM {data.get('vllm_version', '?')}", f"runtime {data.get('runtime', '?')}",
             f"model {data.get('model_repo', '?')}@{data.get('model_revision', '?')}",
             f"speculative {data.get('speculative', '?')}"]
    if data.get("serve_args_sha256"):
        parts.append(f"serve args {data['serve_args_sha256']}")
    if data.get("date"):
        parts.append(str(data["date"]))
    return ", ".join(parts)


# --- the chart --------------------------------------------------------------------------------

def chart(path: Path, title: str, series: list[tuple[str, Result, str]]) -> None:
    """Throughput and latency percentiles, one bar colour per series; the series and metrics
    are also written into the PNG's text chunks, so the image can be checked by reading it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (left, right) = plt.subplots(1, 2, figsize=(13, 5),
                                         gridspec_kw={"width_ratios": [1, 3]})
    width = 0.8 / len(series)
    for index, (label, result, color) in enumerate(series):
        value = result.get("output_throughput") or 0
        left.bar(index, value, color=color, label=label)
        offsets = [position + (index - (len(series) - 1) / 2) * width
                   for position in range(len(LATENCY_METRICS))]
        right.bar(offsets, [result.get(key) or 0 for key, *_ in LATENCY_METRICS], width,
                  color=color, label=label)
    left.set_title("Output token throughput (tok/s)")
    left.set_xticks(range(len(series)), [label for label, *_ in series], rotation=20,
                    ha="right", fontsize=8)
    right.set_title("Latency percentiles (ms)")
    right.set_xticks(range(len(LATENCY_METRICS)), [label for _, label, *_ in LATENCY_METRICS],
                     rotation=30, ha="right", fontsize=8)
    latencies = [result.get(key) for _, result, _ in series for key, *_ in LATENCY_METRICS]
    present = [value for value in latencies if value]
    # A sandbox run and the seed differ by orders of magnitude: keep both readable.
    if present and max(present) / min(present) > 100:
        right.set_yscale("log")
    right.legend(fontsize=8)
    figure.suptitle(title, fontsize=10)
    figure.tight_layout()
    metadata = {"Title": title, "Software": "tools/bench-report",
                "Series": json.dumps([label for label, *_ in series]),
                "Metrics": json.dumps(["output_throughput"]
                                      + [key for key, *_ in LATENCY_METRICS])}
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, format="png", dpi=100, metadata=metadata)
    plt.close(figure)


# --- commands ---------------------------------------------------------------------------------

def default_out(results: list[Result], is_baseline: bool) -> Path:
    if is_baseline:
        return REPO / "results" / "bench"
    return results[0].source.parent


def baseline_for(run: Result, bases: list[Result]) -> Result | None:
    if len(bases) == 1:
        return bases[0]
    return next((base for base in bases if base.label == run.label), None)


def baseline_series_label(base: Result) -> str:
    run_id = base.data.get("run_id")
    return f"baseline {base.label}" + (f" ({run_id})" if run_id else "")


def command_compare(args) -> int:
    data = data_defaults(args.group)
    tolerance = fraction(args.tolerance, data, "bench_regression_tolerance", "--tolerance")
    p99_tolerance = fraction(args.p99_tolerance, data, "bench_regression_p99_tolerance",
                            "--p99-tolerance")
    baseline_ref = args.baseline or str(REPO / setting(None, data, "bench_baseline",
                                                       "--baseline"))
    runs, run_is_baseline = load(args.run)
    bases, base_is_baseline = load(baseline_ref)
    out = Path(args.out) if args.out else default_out(runs, run_is_baseline)
    base_label = bases[0].label if base_is_baseline else baseline_ref
    lines = [f"# Benchmark report: {args.run} vs {base_label}", "",
             f"Regression when throughput falls, or latency rises, by more than "
             f"{tolerance:.0%} (p99: {p99_tolerance:.0%}); any failed request is one.", ""]
    status, series, used_bases = 0, [], []
    for index, run in enumerate(runs):
        base = baseline_for(run, bases)
        lines += [f"## {run.label}", "", f"Run: {describe(run)}", ""]
        if base is None:
            lines += [f"No baseline result for host {run.label}: not compared.", ""]
            status = max(status, 2)
            continue
        lines += [f"Baseline: {describe(base)}", ""]
        difference = workload_difference(run, base)
        if difference:
            lines += [f"**Not comparable**: the workloads differ ({difference}); the ratios "
                      "below compare different work.", ""]
            status = max(status, 2)
        if base.get("failed"):
            lines += [f"**Not comparable**: the baseline failed {int(base.get('failed'))} "
                      "request(s); its numbers do not measure the server.", ""]
            status = max(status, 2)
        comparable = not difference and not base.get("failed")
        rows, regressions = compare(run, base, tolerance, p99_tolerance, comparable=comparable)
        lines += markdown_table(rows, ["metric", "baseline", "run", "ratio", "check"], 3) + [""]
        problems = regressions if comparable else []
        if run.get("failed"):  # a failed request is one, whatever the workload
            problems.append(f"{int(run.get('failed'))} failed request(s)")
        if problems:
            lines += [f"**REGRESSION** on {run.label}: " + "; ".join(problems) + ".", ""]
            status = max(status, 1)
        elif comparable:
            lines += [f"No regression on {run.label}.", ""]
        series.append((run.label, run, run_color(index)))
        if not any(base is used for used in used_bases):
            used_bases.append(base)
    series = [(baseline_series_label(base), base, BASELINE_COLORS[index % len(BASELINE_COLORS)])
              for index, base in enumerate(used_bases)] + series
    lines += [f"Baseline source: {base.note}" for base in used_bases if base.note]
    lines += [""] if any(base.note for base in used_bases) else []
    verdict = {0: "PASS: no regression", 1: "FAIL: regression beyond tolerance",
               2: "NOT COMPARABLE: see above"}[status]  # not comparable outranks a failure
    lines += [f"**{verdict}**"]
    write_report(out, "report", "\n".join(lines) + "\n",
                 f"{args.run} vs {base_label}", series)
    return status


def write_report(out: Path, stem: str, markdown: str, title: str, series) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{stem}.md").write_text(markdown)
    if series:
        chart(out / f"{stem}.png", title, series)
    print(markdown, end="")
    print(f"\nWrote {out / (stem + '.md')}" + (f" and {out / (stem + '.png')}" if series else ""))


def percent(ratio: float) -> str:
    return f"{(ratio - 1) * 100:+.1f}%"


def recommend(off: Result, on: Result, min_gain: float) -> tuple[str, str]:
    """('ON' or 'OFF', the reason) for one host's pair."""
    off_tput, on_tput = off.get("output_throughput"), on.get("output_throughput")
    if not off_tput or not on_tput:
        raise InputError(f"{on.label}: output_throughput missing from a result")
    gain = on_tput / off_tput
    rate = on.get("spec_decode_acceptance_rate")
    length = on.get("spec_decode_acceptance_length")
    acceptance = (f"acceptance {rate:.2f}% ({length:.2f} tokens per step)"
                  if rate is not None and length is not None
                  else "acceptance unknown (no speculative-decoding counters in the ON run)")
    throughput = f"output throughput {percent(gain)} ({fmt(off_tput)} -> {fmt(on_tput)} tok/s)"
    off_tpot, on_tpot = off.get("mean_tpot_ms"), on.get("mean_tpot_ms")
    tpot = (f", mean TPOT {percent(on_tpot / off_tpot)} ({fmt(off_tpot)} -> {fmt(on_tpot)} ms)"
            if off_tpot and on_tpot else "")
    if on.get("failed"):
        return "OFF", f"the ON run failed {int(on.get('failed'))} request(s); {throughput}"
    if gain >= 1 + min_gain:
        return "ON", f"{throughput}{tpot} with {acceptance}"
    if gain >= 1:
        return "OFF", (f"{throughput} is under the {min_gain:.0%} minimum gain worth a draft's "
                       f"memory and moving parts; {acceptance}")
    reason = f"{acceptance}: {throughput}{tpot}; rejected drafts cost verification work"
    if rate is not None and rate < PAYING_ACCEPTANCE_PERCENT:
        reason += (f". A draft needs roughly {PAYING_ACCEPTANCE_PERCENT}% acceptance to pay off "
                   "(the seed, 6.3)")
    if rate is not None and rate < MISMATCHED_DRAFT_PERCENT:
        draft = on.data.get("draft_repo")
        reason += ("; acceptance this low suggests a draft that does not match the model"
                   + (f" ({draft})" if draft and draft != "none" else ""))
    return "OFF", reason


def command_ab(args) -> int:
    data = data_defaults(args.group)
    min_gain = fraction(args.min_gain, data, "bench_speculative_min_gain", "--min-gain")
    if len(args.refs) == 1:
        path = args.refs[0].partition("#")[0]
        offs, is_baseline = load(f"{path}#speculative-off")
        ons, _ = load(f"{path}#speculative-on")
        if not is_baseline:
            raise InputError("ab with one argument needs a baseline file with both variants")
    elif len(args.refs) == 2:
        offs, is_baseline = load(args.refs[0])
        ons, _ = load(args.refs[1])
    else:
        raise InputError("ab takes OFF ON, or one baseline file")
    out = Path(args.out) if args.out else default_out(ons, is_baseline)
    pairs = []
    for on in ons:
        off = offs[0] if len(offs) == 1 else next((o for o in offs if o.label == on.label), None)
        if off is None:
            raise InputError(f"no OFF result for host {on.label}")
        difference = workload_difference(on, off)
        if difference:
            raise InputError(f"{on.label}: not the same workload with and without the draft "
                             f"({difference})")
        if off.get("failed"):
            raise InputError(f"{on.label}: the OFF run failed {int(off.get('failed'))} "
                             "request(s): not a measure to compare the draft with")
        if off.data.get("speculative") == "true" or on.data.get("speculative") == "false":
            raise InputError(f"{on.label}: the OFF run has speculative="
                             f"{off.data.get('speculative')} and the ON run speculative="
                             f"{on.data.get('speculative')}: swapped or mislabelled")
        pairs.append((off, on))
    off_ref, on_ref = ((f"{path}#speculative-off", f"{path}#speculative-on")
                       if len(args.refs) == 1 else args.refs)
    lines = ["# Speculative decoding A/B", "", f"OFF: {off_ref} · ON: {on_ref}", ""]
    decisions, series = [], []
    for index, (off, on) in enumerate(pairs):
        rows = []
        for key, label, unit, _ in METRICS:
            a, b = off.get(key), on.get(key)
            if a is None and b is None:
                continue
            rows.append((f"{label} ({unit})", fmt(a), fmt(b),
                         f"{b / a:.2f}" if a and b is not None else "—"))
        for key, label in (("spec_decode_num_drafts", "Drafts"),
                           ("spec_decode_draft_tokens", "Draft tokens"),
                           ("spec_decode_accepted_tokens", "Accepted tokens")):
            if on.get(key) is not None:
                rows.append((label, "—", fmt(on.get(key)), "—"))
        decision, reason = recommend(off, on, min_gain)
        decisions.append(decision)
        lines += [f"## {on.label}", ""]
        lines += markdown_table(rows, ["metric", "off", "on", "ratio"], 3) + [""]
        if on.scraped:
            lines += ["Acceptance counted from the server's /metrics before and after the run.",
                      ""]
        lines += [f"**Recommendation: speculative decoding {decision}** — {reason}.", ""]
        prefix = f"{on.label}: " if len(pairs) > 1 else ""
        series += [(f"{prefix}speculative off", off,
                    BASELINE_COLORS[0] if len(pairs) == 1 else run_color(2 * index)),
                   (f"{prefix}speculative on", on, run_color(2 * index + 1))]
    overall = "ON" if decisions and all(d == "ON" for d in decisions) else "OFF"
    lines += [f"**Overall: speculative decoding {overall}** (model_speculative = "
              f"{overall == 'ON'}).", "", f"Warning: {RANDOM_PROMPTS_WARNING}"]
    write_report(out, "ab-report", "\n".join(lines) + "\n", "Speculative decoding A/B", series)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    compare_parser = commands.add_parser("compare", help="a run against a baseline or a run")
    compare_parser.add_argument("run")
    compare_parser.add_argument("--baseline", help="default: data key bench_baseline")
    compare_parser.add_argument("--tolerance", type=float,
                                help="default: data key bench_regression_tolerance")
    compare_parser.add_argument("--p99-tolerance", type=float,
                                help="default: data key bench_regression_p99_tolerance")
    ab_parser = commands.add_parser("ab", help="speculative decoding off vs on")
    ab_parser.add_argument("refs", nargs="+", metavar="REF")
    ab_parser.add_argument("--min-gain", type=float,
                           help="default: data key bench_speculative_min_gain")
    for sub in (compare_parser, ab_parser):
        sub.add_argument("--out", help="folder for the report (default: the run's folder)")
        sub.add_argument("--group", action="append", default=[],
                         help="group_data file whose values override all.py (e.g. gb200)")
    args = parser.parse_args(argv)
    missing = missing_packages("bench-report", "matplotlib")
    if missing:
        print(missing, file=sys.stderr)
        return 2
    try:
        return command_compare(args) if args.command == "compare" else command_ab(args)
    except InputError as error:
        print(f"bench-report: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
