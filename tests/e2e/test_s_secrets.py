"""The API key and the Hub token, after everything the e2e session did with them (deploys,
Hub fetches, benchmarks, drift checks, roll-outs, a roll-back), are only where they must be:
on the hosts in root-owned 0600 files, on the controller in the files the data names; never in
another file, the journal (every field, the logging process's command line too), a running
process's command line, a unit, the router's configuration, results or reports.

Runs after the Hub weights module (name order), whose token it looks for, and after the
roll-out, whose logs hold vLLM's output."""

from __future__ import annotations

import shlex
import subprocess
from pathlib import Path

import pytest

from tasks.settings import ENV_FILE
from tasks.vllm_service import RELEASE_DIR
from tasks.weights_job import TOKEN_FILE
from tests.e2e.common import api_key, sandbox_tool
from tests.helpers import REPO

# Where a host may hold a secret: the unit's env file, the last good release's copy of it, the
# Hub token of the fetch unit.
HOST_SECRET_FILES = {ENV_FILE, f"{RELEASE_DIR}/{Path(ENV_FILE).name}", TOKEN_FILE}
# Searched on every host; /proc and /sys are the kernel's, /raid the weights, /usr the packages.
HOST_FOLDERS = "/etc /var /run /opt /root /home /tmp /srv /usr/local"
# The patterns come on stdin and stay in the shell's memory (grep reads them from a pipe), so
# neither this search nor its command line leaves a secret behind on the host.
SEARCH = f"""set -u
patterns=$(cat)
matches() {{ grep -aF -f <(printf '%s\\n' "$patterns") "$@"; }}
echo "files:"; matches -rls {HOST_FOLDERS} || true
echo "journal: $(journalctl -o export --no-pager 2>/dev/null | matches -c)"
echo "processes: $(ps -eo args | matches -c)"
echo "units: $(systemctl show '*' --no-pager 2>/dev/null | matches -c)"
"""


def search_host(name: str, secrets: list[str]) -> dict[str, object]:
    """SEARCH on one sandbox host (`sandbox ssh`), the secrets on stdin: {files: [...],
    journal: n, processes: n, units: n}."""
    result = sandbox_tool("ssh", name, "bash", "-c", shlex.quote(SEARCH),
                          input="\n".join(secrets) + "\n")
    assert result.returncode == 0, f"{name}: {result.stderr[-2000:]}"
    found: dict[str, object] = {"files": []}
    section = None
    for line in result.stdout.splitlines():
        if line == "files:":
            section = "files"
        elif section == "files" and line.startswith("/"):
            found["files"].append(line)
        else:
            name, _, count = line.partition(": ")
            found[name] = int(count)
            section = None
    return found


@pytest.fixture(scope="module")
def secrets(sandbox, tmp_path_factory) -> dict[str, str]:
    """The values to look for: the sandbox's API key, and the Hub token the Hub weights module
    fetched with (its controller file, in this session's folders; the trays held it in
    TOKEN_FILE until a deploy of the pushed model removed it)."""
    tokens = {path.read_text().strip()
              for path in tmp_path_factory.getbasetemp().glob("hub-token*/token")}
    assert len(tokens) == 1, "the Hub weights module runs first (name order) and makes one token"
    (token,) = tokens
    return {"API key": api_key(sandbox), "Hub token": token}


def test_secrets_on_the_hosts_only_in_root_owned_0600_files(sandbox, fleet, secrets):
    problems = []
    for entry in sandbox["hosts"] + sandbox["routers"]:
        name, host = entry["name"], fleet[entry["name"]]
        found = search_host(name, list(secrets.values()))
        for place in ("journal", "processes", "units"):
            if found[place]:
                problems.append(f"{name}: {found[place]} line(s) of {place} hold a secret")
        for path in found["files"]:
            if path not in HOST_SECRET_FILES:
                problems.append(f"{name}: {path} holds a secret")
                continue
            held = host.file(path)
            if (held.user, held.group, held.mode) != ("root", "root", 0o600):
                problems.append(f"{name}: {path} is {held.user}:{held.group} {held.mode:04o}")
        if entry in sandbox["hosts"]:
            assert ENV_FILE in found["files"], f"{name}: the search missed {ENV_FILE}"
    assert not problems, "\n".join(problems)


def test_secrets_on_the_controller_only_in_the_files_the_data_names(sandbox, secrets,
                                                                     tmp_path_factory):
    """This checkout (results, reports, roll-out logs, anything written beside the code) and
    the test session's own folders. The sandbox's state folder holds the key file and the
    hosts' disks; .venv and .cache hold only what was installed and built."""
    session = tmp_path_factory.getbasetemp()
    token_files = {path.resolve() for path in session.glob("hub-token*/token")}
    allowed = {Path(sandbox["api_key_file"]).resolve()} | token_files
    searched = [REPO, session]
    result = subprocess.run(
        ["grep", "-rlsaF", "-f", "-", "--exclude-dir=.venv", "--exclude-dir=.cache",
         "--exclude-dir=.sandbox", *map(str, searched)],
        input="\n".join(secrets.values()) + "\n", capture_output=True, text=True, timeout=300)
    assert result.returncode in (0, 1), result.stderr[-2000:]
    found = {Path(line).resolve() for line in result.stdout.splitlines()}
    assert found - allowed == set(), "secrets in: " + ", ".join(map(str, found - allowed))
    assert token_files and token_files <= found, "the search missed the token's own file"
    assert any((REPO / "results" / "rollout").iterdir()), "no roll-out logs were searched"
