"""bench-report (tools/bench_report.py): the seed's baseline holds the seed's numbers; doctored baselines give the
regression exit code; the chart is a real PNG with the expected series; the speculative
decoding A/B says OFF on the seed's own numbers and counts acceptance from /metrics scrapes."""

from __future__ import annotations

import json
import re

import matplotlib.image
import pytest
from PIL import Image

from tests.helpers import REPO, seed_benchmarks_text
from tools import bench_report as tool

BASELINE = REPO / "baselines" / "seed-kimi-k2.6-4xgb200.json"
TOLERANCES = ["--tolerance", "0.10", "--p99-tolerance", "0.25"]
# The seed's result lines (section 6.2 and 6.3) and the keys of vLLM's result JSON.
SEED_LABELS = {
    "Successful requests": "completed", "Failed requests": "failed",
    "Benchmark duration (s)": "duration", "Total input tokens": "total_input_tokens",
    "Total generated tokens": "total_output_tokens",
    "Request throughput (req/s)": "request_throughput",
    "Output token throughput (tok/s)": "output_throughput",
    "Peak output token throughput (tok/s)": "max_output_tokens_per_s",
    "Peak concurrent requests": "max_concurrent_requests",
    "Total token throughput (tok/s)": "total_token_throughput",
    "Mean TTFT (ms)": "mean_ttft_ms", "Median TTFT (ms)": "median_ttft_ms",
    "P99 TTFT (ms)": "p99_ttft_ms", "Mean TPOT (ms)": "mean_tpot_ms",
    "Median TPOT (ms)": "median_tpot_ms", "P99 TPOT (ms)": "p99_tpot_ms",
    "Mean ITL (ms)": "mean_itl_ms", "Median ITL (ms)": "median_itl_ms",
    "P99 ITL (ms)": "p99_itl_ms",
    "Acceptance rate (%)": "spec_decode_acceptance_rate",
    "Acceptance length": "spec_decode_acceptance_length",
    "Drafts": "spec_decode_num_drafts", "Draft tokens": "spec_decode_draft_tokens",
    "Accepted tokens": "spec_decode_accepted_tokens",
}


def report(capsys, *args: str) -> tuple[int, str]:
    code = tool.main(list(args))
    captured = capsys.readouterr()
    return code, captured.out + captured.err


def seed_result(variant: str = "speculative-off", **changes) -> dict:
    """A result JSON as bench.py brings home, holding the seed's numbers for one variant."""
    document = json.loads(BASELINE.read_text())
    data = {**document["metadata"], **document["runs"][variant], "host": "tray1",
            "run_id": "r1", "vllm_version": "0.19.1"}
    data.update(changes)
    return data


def write_run(folder, results: dict[str, dict], scrapes: dict[str, tuple[str, str]] = {}):
    folder.mkdir(parents=True, exist_ok=True)
    for host, data in results.items():
        (folder / f"{host}.json").write_text(json.dumps(data))
    for host, (before, after) in scrapes.items():
        (folder / f"{host}.metrics-before.prom").write_text(before)
        (folder / f"{host}.metrics-after.prom").write_text(after)
    return folder


def seed_blocks() -> list[dict[str, float]]:
    """Each `Serving Benchmark Result` block the seed printed, by vLLM result key."""
    blocks, current = [], None
    for line in seed_benchmarks_text().splitlines():
        if "Serving Benchmark Result" in line:
            current = {}
            blocks.append(current)
        elif current is not None and line.startswith("====="):
            current = None
        elif current is not None and (match := re.match(r"(.+?):\s+([\d.]+)\s*$", line)):
            if match.group(1) in SEED_LABELS:
                current[SEED_LABELS[match.group(1)]] = float(match.group(2))
    return blocks


def test_baseline_holds_every_number_the_seed_printed():
    document = json.loads(BASELINE.read_text())
    off, on = seed_blocks()
    assert len(off) == 19 and len(on) == 16
    for block, variant in ((off, "speculative-off"), (on, "speculative-on")):
        stored = document["runs"][variant]
        assert {key: float(stored[key]) for key in block} == block
    assert document["metadata"]["vllm_version"] == "v0.19.1-cu130"
    assert document["metadata"]["hardware"].startswith("4 x NVIDIA GB200")
    assert document["source"].startswith("the seed")


@pytest.mark.parametrize("change, code, named", [
    ({}, 0, None),
    # Throughput 17% under the baseline: beyond the 10% tolerance.
    ({"output_throughput": 1181.84 * 1.2}, 1, "Output token throughput"),
    ({"output_throughput": 1181.84 * 1.05}, 0, None),
    # p99 latency has its own, wider tolerance (25%).
    ({"p99_ttft_ms": 296.55 / 1.2}, 0, None),
    ({"p99_ttft_ms": 296.55 / 1.3}, 1, "P99 TTFT"),
    ({"mean_tpot_ms": 24.35 / 1.2}, 1, "Mean TPOT"),
])
def test_doctored_baselines_give_the_regression_exit_code(tmp_path, capsys, change, code, named):
    run = write_run(tmp_path / "run", {"tray1": seed_result()})
    doctored = json.loads(BASELINE.read_text())
    doctored["runs"]["speculative-off"].update(change)
    (tmp_path / "doctored.json").write_text(json.dumps(doctored))
    status, output = report(capsys, "compare", str(run), "--baseline",
                            str(tmp_path / "doctored.json"), *TOLERANCES)
    assert status == code, output
    if named:
        assert f"**REGRESSION** on tray1: {named}" in output
    else:
        assert "No regression on tray1." in output and "**PASS" in output


def test_a_failed_request_is_a_regression_whatever_the_numbers(tmp_path, capsys):
    run = write_run(tmp_path / "run", {"tray1": seed_result(failed=1)})
    status, output = report(capsys, "compare", str(run), "--baseline", str(BASELINE),
                            *TOLERANCES)
    assert status == 1
    assert "1 failed request(s)" in output


def test_different_workloads_are_not_comparable(tmp_path, capsys):
    run = write_run(tmp_path / "run", {"tray1": seed_result(bench_profile="sandbox",
                                                            num_prompts=16)})
    status, output = report(capsys, "compare", str(run), "--baseline", str(BASELINE),
                            *TOLERANCES)
    assert status == 2
    assert "the workloads differ (bench_profile sandbox vs seed-8k-1k; num_prompts 16 vs 32)" \
        in output
    assert "REGRESSION" not in output


def test_a_previous_run_is_a_baseline_host_by_host(tmp_path, capsys):
    previous = write_run(tmp_path / "previous", {
        "tray1": seed_result(), "tray2": seed_result(host="tray2", output_throughput=2000.0)})
    run = write_run(tmp_path / "run", {"tray1": seed_result(), "tray2": seed_result(host="tray2")})
    status, output = report(capsys, "compare", str(run), "--baseline", str(previous),
                            *TOLERANCES)
    assert status == 1
    assert "No regression on tray1." in output
    assert "**REGRESSION** on tray2: Output token throughput 1181.84 tok/s vs 2000.00" in output
    table = (run / "report.md").read_text()
    assert "| metric | baseline | run | ratio | check |" in table
    assert "| Output token throughput (tok/s) | 2000.00 | 1181.84 | 0.59 | REGRESSION" in table


def test_chart_is_a_png_with_one_colour_per_series(tmp_path, capsys):
    run = write_run(tmp_path / "run", {
        "tray1": seed_result(), "tray2": seed_result(host="tray2", output_throughput=900.0)})
    report(capsys, "compare", str(run), "--baseline", str(BASELINE), *TOLERANCES)
    png = run / "report.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(png) as image:
        image.verify()
    with Image.open(png) as image:
        series = json.loads(image.text["Series"])
        metrics = json.loads(image.text["Metrics"])
        colours = {colour for _, colour in image.convert("RGB").getcolors(1 << 20)}
    assert series == ["baseline seed-kimi-k2.6-4xgb200#speculative-off", "tray1", "tray2"]
    assert metrics[0] == "output_throughput" and "p99_itl_ms" in metrics
    for hex_colour in (tool.BASELINE_COLORS[0], tool.RUN_COLORS[0], tool.RUN_COLORS[1]):
        assert tuple(int(hex_colour[i:i + 2], 16) for i in (1, 3, 5)) in colours, hex_colour
    pixels = matplotlib.image.imread(png)
    assert pixels.shape[0] > 300 and pixels.shape[1] > 600


def test_ab_on_the_seeds_numbers_says_off_citing_its_acceptance_and_throughput(tmp_path, capsys):
    status, output = report(capsys, "ab", str(BASELINE), "--min-gain", "0.05",
                            "--out", str(tmp_path))
    assert status == 0, output
    recommendation = next(line for line in output.splitlines()
                          if line.startswith("**Recommendation"))
    assert "speculative decoding OFF" in recommendation
    assert "acceptance 1.28% (1.04 tokens per step)" in recommendation
    assert "output throughput -46.6% (1181.84 -> 631.18 tok/s)" in recommendation
    assert "random prompts overstate draft acceptance compared with chat prompts" in output
    assert (tmp_path / "ab-report.md").read_text() in output
    with Image.open(tmp_path / "ab-report.png") as image:
        assert json.loads(image.text["Series"]) == ["speculative off", "speculative on"]


def prometheus(drafts: int, draft_tokens: int, accepted: int) -> str:
    # Two engines: the report sums every sample of a counter.
    lines = ["# HELP vllm:spec_decode_num_drafts_total Number of spec decoding drafts.",
             "# TYPE vllm:spec_decode_num_drafts_total counter"]
    for engine, share in (("0", 0.5), ("1", 0.5)):
        labels = f'{{engine="{engine}",model_name="Kimi K2.6"}}'
        lines += [f"vllm:spec_decode_num_drafts_total{labels} {drafts * share}",
                  f"vllm:spec_decode_num_draft_tokens_total{labels} {draft_tokens * share}",
                  f"vllm:spec_decode_num_accepted_tokens_total{labels} {accepted * share}",
                  f'vllm:spec_decode_num_accepted_tokens_per_pos_total{{engine="{engine}",'
                  f'position="0"}} 99999']
    return "\n".join(lines) + "\n"


def test_ab_counts_acceptance_from_the_scrapes_and_recommends_on_when_it_pays(tmp_path, capsys):
    off = write_run(tmp_path / "off", {"tray1": seed_result(speculative="false")})
    # The client's own numbers say otherwise: the scrapes of this very run win.
    on_result = seed_result("speculative-on", output_throughput=1181.84 * 1.3,
                            mean_tpot_ms=18.0, spec_decode_acceptance_rate=5.0)
    on = write_run(tmp_path / "on", {"tray1": on_result},
                   {"tray1": (prometheus(100, 300, 100), prometheus(1100, 3300, 2200))})
    status, output = report(capsys, "ab", str(off), str(on), "--min-gain", "0.05")
    assert status == 0, output
    assert "| Acceptance rate (%) | — | 70.00 |" in output
    assert "| Acceptance length (tokens/step) | — | 3.10 |" in output
    assert "Acceptance counted from the server's /metrics" in output
    assert "**Recommendation: speculative decoding ON** — output throughput +30.0%" in output
    assert "acceptance 70.00% (3.10 tokens per step)" in output
    assert "random prompts overstate" in output
    assert (on / "ab-report.png").is_file()


def test_ab_with_a_small_gain_says_off_naming_the_minimum(tmp_path, capsys):
    off = write_run(tmp_path / "off", {"tray1": seed_result(speculative="false")})
    on = write_run(tmp_path / "on", {"tray1": seed_result(
        "speculative-on", output_throughput=1181.84 * 1.02)})
    status, output = report(capsys, "ab", str(off), str(on), "--min-gain", "0.05")
    assert status == 0
    assert "speculative decoding OFF** — output throughput +2.0%" in output
    assert "under the 5% minimum gain" in output


@pytest.mark.parametrize("off_change, on_change, message", [
    ({"speculative": "true"}, {}, "swapped or mislabelled"),
    ({}, {"num_prompts": 64}, "not the same workload with and without the draft"),
])
def test_ab_refuses_pairs_that_are_not_an_ab(tmp_path, capsys, off_change, on_change, message):
    off = write_run(tmp_path / "off", {"tray1": seed_result(**off_change)})
    on = write_run(tmp_path / "on", {"tray1": seed_result("speculative-on", **on_change)})
    status, output = report(capsys, "ab", str(off), str(on), "--min-gain", "0.05")
    assert status == 2
    assert message in output


def test_speculative_counters_absent_means_no_acceptance():
    plain = "vllm:generation_tokens_total{engine=\"0\"} 512.0\n"
    assert tool.speculative_from_scrapes(plain, plain) is None


def test_thresholds_default_to_group_data_and_a_group_overrides_them(tmp_path):
    (tmp_path / "all.py").write_text("bench_regression_tolerance = 0.1\n"
                                     "bench_regression_p99_tolerance = 0.25\n")
    (tmp_path / "gb200.py").write_text("bench_regression_tolerance = 0.05\n")
    assert tool.data_defaults([], tmp_path)["bench_regression_tolerance"] == 0.1
    data = tool.data_defaults(["gb200"], tmp_path)
    assert (data["bench_regression_tolerance"], data["bench_regression_p99_tolerance"]) == \
        (0.05, 0.25)
    assert tool.setting(0.2, data, "bench_regression_tolerance", "--tolerance") == 0.2
    with pytest.raises(tool.InputError, match="pass --min-gain"):
        tool.setting(None, data, "bench_speculative_min_gain", "--min-gain")


THRESHOLD_KEYS = [("bench_regression_tolerance", "--tolerance"),
                  ("bench_regression_p99_tolerance", "--p99-tolerance"),
                  ("bench_speculative_min_gain", "--min-gain")]


@pytest.mark.parametrize("key, flag", THRESHOLD_KEYS)
@pytest.mark.parametrize("value", [10, 1, 1.0, -0.1, "0.1", True, float("nan")])
def test_a_threshold_out_of_range_is_refused_naming_its_key(key, flag, value):
    with pytest.raises(tool.InputError) as error:
        tool.fraction(None, {key: value}, key, flag)
    assert str(error.value) == (f"data key {key}: found {value!r}; need a fraction in [0, 1) "
                                "(0.10 is 10%)")


@pytest.mark.parametrize("key, flag", THRESHOLD_KEYS)
def test_thresholds_in_range_pass_and_group_data_holds_such(key, flag):
    for value in (0, 0.0, 0.5, 0.99):
        assert tool.fraction(None, {key: value}, key, flag) == value
    assert 0 <= tool.fraction(None, tool.data_defaults([]), key, flag) < 1
    assert 0 <= tool.fraction(None, tool.data_defaults(["gb200"]), key, flag) < 1


def test_a_flag_out_of_range_exits_2_naming_the_flag(tmp_path, capsys):
    run = write_run(tmp_path / "run", {"tray1": seed_result()})
    status, output = report(capsys, "compare", str(run), "--baseline", str(BASELINE),
                            "--tolerance", "10", "--p99-tolerance", "0.25")
    assert status == 2
    assert "bench-report: --tolerance: found 10.0; need a fraction in [0, 1)" in output
    status, output = report(capsys, "ab", str(BASELINE), "--min-gain", "5", "--out",
                            str(tmp_path))
    assert status == 2
    assert "bench-report: --min-gain: found 5.0; need a fraction in [0, 1)" in output


def test_a_baseline_with_failed_requests_is_not_comparable(tmp_path, capsys):
    """What bench.py kept before it failed such runs: all 32 requests refused, 0 tok/s."""
    broken = write_run(tmp_path / "broken", {"tray1": seed_result(
        completed=0, failed=32, output_throughput=0.0, total_token_throughput=0.0,
        request_throughput=0.0)})
    run = write_run(tmp_path / "run", {"tray1": seed_result()})
    status, output = report(capsys, "compare", str(run), "--baseline", str(broken),
                            *TOLERANCES)
    assert status == 2
    assert "**Not comparable**: the baseline failed 32 request(s)" in output
    assert "No regression on tray1." not in output and "**PASS" not in output


def test_ab_refuses_an_off_run_with_failed_requests(tmp_path, capsys):
    off = write_run(tmp_path / "off", {"tray1": seed_result(speculative="false", failed=3)})
    on = write_run(tmp_path / "on", {"tray1": seed_result("speculative-on")})
    status, output = report(capsys, "ab", str(off), str(on), "--min-gain", "0.05")
    assert status == 2
    assert "tray1: the OFF run failed 3 request(s)" in output
