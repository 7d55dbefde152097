"""tasks/secrets.py: the API key and the Hub token read from a command the operator names (a
secret manager's CLI), run here for real: once for every host, never shown when it fails."""

from __future__ import annotations

import shlex
import sys

import pytest

from tasks import secrets, weights_hub
from tasks.data_keys import DataError
from tasks.settings import read_settings
from tests.helpers import FakeHost, group_data
from tools import drift_check

KEY = "sk-from-the-vault-0123456789"


@pytest.fixture(autouse=True)
def fresh_cache():
    """Each test runs its commands anew (the cache lives for one controller process)."""
    secrets._run.cache_clear()
    yield
    secrets._run.cache_clear()


def python(code: str) -> str:
    """A command line running ``code`` with this interpreter: a stand-in secret manager CLI."""
    return shlex.join([sys.executable, "-c", code])


def counting(tmp_path, output: str = KEY, status: int = 0) -> str:
    """A command that prints ``output`` (kept in its "vault", a file, so that the command line
    does not hold it) on both streams, exits ``status`` and counts its runs."""
    calls, vault = tmp_path / "calls", tmp_path / "vault"
    vault.write_text(output)
    return python(f"import sys; open({str(calls)!r}, 'a').write('x'); "
                  f"secret = open({str(vault)!r}).read(); print(secret); "
                  f"print(secret, file=sys.stderr); sys.exit({status})")


def runs(tmp_path) -> int:
    calls = tmp_path / "calls"
    return len(calls.read_text()) if calls.exists() else 0


@pytest.fixture
def data(controller_folders):
    values = group_data("sandbox")
    values.update(controller_folders, vllm_api_key_file=None, vllm_cpu_threads_bind="1")
    return values


def test_the_api_key_comes_from_the_command_once_for_every_host(data, tmp_path):
    data["vllm_api_key_command"] = counting(tmp_path)
    keys = {read_settings(FakeHost(name, dict(data))).api_key for name in ("t1", "t2", "t3")}
    assert keys == {KEY} and runs(tmp_path) == 1


def test_the_hub_token_comes_from_the_command(tmp_path):
    hub = weights_hub.read_hub_settings(
        "h1", {**group_data(), "weights_hf_token_command": counting(tmp_path, "hf_vault")},
        environ={"HF_TOKEN": "hf_from_the_environment"})
    assert hub.token == "hf_vault"  # the command named in the data wins over the environment


@pytest.mark.parametrize("output, status, need", [
    (KEY, 3, "a command that exits 0 (it exited 3; run it by hand to see why: its output is "
             "not shown here, it may hold the secret)"),
    ("", 0, "a command that prints the secret on its standard output"),
    (f"{KEY}\nsecond line", 0, "a command that prints the secret alone, on one line"),
])
def test_a_failing_command_names_host_key_and_status_never_its_output(data, tmp_path, output,
                                                                       status, need):
    command = counting(tmp_path, output, status)
    data["vllm_api_key_command"] = command
    with pytest.raises(DataError) as error:
        read_settings(FakeHost("t1", data))
    assert f"t1: vllm_api_key_command: found {command!r}; need {need}" in str(error.value)
    assert KEY not in str(error.value)


def test_a_missing_command_and_a_hanging_one_are_one_line_each(data, monkeypatch):
    data["vllm_api_key_command"] = "/nonexistent/vault read secret/vllm"
    with pytest.raises(DataError) as error:
        read_settings(FakeHost("t1", data))
    assert "need a command found on the controller (its PATH, or an absolute path)" in str(
        error.value)
    monkeypatch.setattr(secrets, "TIMEOUT_S", 1)
    data["vllm_api_key_command"] = python("import time; time.sleep(30)")
    with pytest.raises(DataError) as error:
        read_settings(FakeHost("t1", data))
    assert "need a command that answers within 1 s, without a prompt" in str(error.value)


def test_a_file_and_a_command_for_one_secret_are_refused(data, tmp_path):
    key_file = tmp_path / "key"
    key_file.write_text("from-a-file\n")
    data.update(vllm_api_key_file=str(key_file), vllm_api_key_command=counting(tmp_path))
    with pytest.raises(DataError) as error:
        read_settings(FakeHost("t1", data))
    assert "t1: vllm_api_key_command: found " in str(error.value)
    assert "need None when vllm_api_key_file is set: one source per secret" in str(error.value)
    with pytest.raises(DataError) as error:
        weights_hub.read_hub_settings("h1", {**group_data(), "weights_hf_token_file": str(key_file),
                                             "weights_hf_token_command": "echo x"}, environ={})
    assert "h1: weights_hf_token_command: found 'echo x'; need None when weights_hf_token_file" \
        in str(error.value)
    assert runs(tmp_path) == 0  # refused before anything ran


def test_a_command_that_is_no_command_line_is_refused_before_it_runs(data):
    data["vllm_api_key_command"] = "vault read 'unbalanced"
    with pytest.raises(DataError) as error:
        read_settings(FakeHost("t1", data))
    assert "t1: vllm_api_key_command: found \"vault read 'unbalanced\"" in str(error.value)


def test_the_drift_check_redacts_what_the_commands_print(tmp_path):
    found = drift_check.known_secrets({"h1": {"vllm_api_key_command": counting(tmp_path),
                                              "weights_hf_token_command": python("print('hf_v')"),
                                              "k8s_kubectl": "echo not-a-secret"}}, environ={})
    assert found == {KEY, "hf_v"}
