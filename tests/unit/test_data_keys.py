"""tasks/data_keys.py: every key declared once, its defaults valid, one problem format, unknown
keys refused, and the README's table generated from the declarations."""

from __future__ import annotations

import ast
import json
import subprocess
import sys

import pytest

from tasks import data_keys
from tasks.bench import WORKLOADS
from tasks.data_keys import BY_NAME, DEFAULTS, KEYS, DataError, check, read
from tests.helpers import REPO
from tools import data_keys_table


def test_each_key_is_declared_once_with_a_need_and_a_doc():
    names = [key.name for key in KEYS]
    assert len(names) == len(set(names))
    assert all(key.need and key.doc and key.concern for key in KEYS)


def test_every_default_passes_its_own_check():
    assert check("h", DEFAULTS) == []


def test_group_files_set_only_declared_keys():
    # Group files hold differences only: an undeclared name there is a typo.
    for path in (REPO / "group_data").glob("*.py"):
        tree = ast.parse(path.read_text())
        names = {target.id for node in tree.body if isinstance(node, ast.Assign)
                 for target in node.targets if isinstance(target, ast.Name)}
        assert names - set(BY_NAME) - {"__all__"} == set(), path


def test_pyinfra_loads_group_data_all_as_the_defaults():
    # debug-inventory prints each host's data as pyinfra merged it: group_data/all.py must
    # give exactly the declared defaults (and nothing it imports).
    result = subprocess.run([sys.executable, "-m", "pyinfra", "inventories/gb200.py",
                             "debug-inventory"], cwd=REPO, capture_output=True, text=True,
                            check=True)
    # pyinfra prints it on stderr.
    first = result.stderr.split("--> Data:\n", 1)[1]
    data = json.JSONDecoder().raw_decode(first)[0]
    gb200 = {"model_profile", "preflight_accept_low_gpu_memory", "weights_dir", "vllm_port",
             "nvidia_gpu_model", "vllm_runtime", "hf_cli_wheelhouse_dir",
             "model_accept_moving_revision", "vllm_accept_open_endpoint",
             "weights_peer_copy"}
    connection = {"ssh_hostname", "ssh_user"}
    assert set(data) == set(DEFAULTS) | connection
    for name in set(DEFAULTS) - gb200:
        assert data[name] == json.loads(json.dumps(DEFAULTS[name])), name


@pytest.mark.parametrize(("key", "value", "line"), [
    ("vllm_port", 0, "h: vllm_port: found 0; need a TCP port 1..65535"),
    ("vllm_port", True, "h: vllm_port: found True; need a TCP port 1..65535"),
    ("weights_min_free_bytes", -1, "h: weights_min_free_bytes: found -1; need bytes, "
     "0..1e15 (1 PB)"),
    ("drift_report_mode", 0o755, "h: drift_report_mode: found 0o755; need a file mode "
     "0o000..0o666 without execute bits, e.g. 0o600 (root only) or 0o644"),
    ("model_profile", "kimi", "h: model_profile: found 'kimi'; need one of "),
    ("drift_schedule", "*/15 * * * *", "h: drift_schedule: found '*/15 * * * *'; need one "
     "line of systemd OnCalendar, not cron"),
    ("k8s_namespace", "Prod", "h: k8s_namespace: found 'Prod'; need a namespace name"),
    ("vllm_image", {"x86_64": "vllm/vllm-openai:latest"}, "h: vllm_image: found "),
])
def test_a_bad_value_is_one_line_naming_host_key_found_and_need(key, value, line):
    problems = check("h", {**DEFAULTS, key: value})
    assert [problem.key for problem in problems] == [key]
    assert str(problems[0]).startswith(line)


@pytest.mark.parametrize(("key", "hint"), [
    ("vllm_prot", "did you mean vllm_port?"),
    ("model_profiel", "did you mean model_profile?"),
    ("weights_hf_tokenfile", "did you mean weights_hf_token_file?"),
    ("xyzzy", "no data key of this name is declared"),
])
def test_an_unknown_key_is_refused_with_the_closest_name(key, hint):
    problems = check("tray-01", {**DEFAULTS, key: 1})
    assert [str(problem) for problem in problems] == [f"tray-01: {key}: unknown key; {hint}"
                                                      + ("" if "mean" in hint else
                                                         " (tasks/data_keys.py lists them)")]


def test_pyinfra_and_connector_keys_are_known():
    data = {**DEFAULTS, "ssh_hostname": "10.0.0.1", "ssh_user": "root", "_sudo": True,
            "fake_responses": {}}
    assert check("h", data) == []


def test_every_problem_comes_at_once_and_travels_as_a_list():
    with pytest.raises(DataError) as raised:
        read("h", {**DEFAULTS, "vllm_port": 0, "weights_xet": "yes", "vllm_prot": 1})
    assert [problem.key for problem in raised.value.problems] == ["weights_xet", "vllm_port",
                                                                  "vllm_prot"]
    assert str(raised.value).splitlines()[1:] == [
        f"  {problem}" for problem in raised.value.problems]


def test_every_key_is_read_somewhere():
    # A declared key nothing reads is dead data: an SRE would set it and see nothing happen.
    sources = "\n".join(path.read_text() for folder in ("tasks", "tools", "tests/infra")
                        for path in (REPO / folder).rglob("*.py")
                        if path.name != "data_keys.py")
    unread = [key.name for key in KEYS if f'"{key.name}"' not in sources
              and f".{key.name}" not in sources and f"'{key.name}'" not in sources]
    assert unread == []


def test_bench_profiles_match_the_workloads():
    assert set(data_keys.BENCH_PROFILES) == set(WORKLOADS)


def test_readme_table_is_generated_from_the_declarations():
    assert data_keys_table.main(["--check"]) == 0, \
        "README is out of step: run data-keys-table"
    readme = (REPO / "README.md").read_text()
    for key in KEYS:
        assert f"| `{key.name}` |" in readme


@pytest.mark.parametrize(("value", "shown"), [(2**30, "2**30"), (100 * 10**9, "100 * 10**9"),
                                              (8000, "8000"), (1.0e9, "1.0e9"),
                                              (2.5e8, "2.5e8"), (0.1, "0.1")])
def test_table_defaults_read_as_written(value, shown):
    assert data_keys_table.literal(value) == shown
