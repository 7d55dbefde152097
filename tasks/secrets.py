"""A secret read from a command the operator names (a secret manager's CLI), on the controller.

The *_command data keys (vllm_api_key_command, weights_hf_token_command) are the third source
of a secret, beside a controller file (*_file) and, for the Hub token, HF_TOKEN. The command
runs without a shell, with no input, once per controller process for all the hosts that name
it (18 trays ask the secret manager once). Its standard output, stripped, is the secret. When
it fails, the problem names the host, the key and the exit status, never the output or the
error stream: either may hold the secret, and problems are printed.
"""

from __future__ import annotations

import functools
import shlex
import subprocess

from tasks.data_keys import Problem, problem

# A secret manager that needs longer is waiting for something (a login prompt, a network):
# better one clear line than a deploy that hangs before its first operation.
TIMEOUT_S = 60
# The keys that name such a command, by their ending (tools/drift_check.py redacts their output).
COMMAND_KEY_ENDINGS = ("_key_command", "_token_command")


@functools.lru_cache(maxsize=None)
def _run(command: str) -> tuple[str | None, str | None]:
    """(the secret, None) or (None, what the command must do instead)."""
    try:
        result = subprocess.run(shlex.split(command), capture_output=True, text=True,
                                stdin=subprocess.DEVNULL, timeout=TIMEOUT_S)
    except FileNotFoundError:
        return None, "a command found on the controller (its PATH, or an absolute path)"
    except PermissionError:
        return None, "a command the controller's user may run"
    except subprocess.TimeoutExpired:
        return None, f"a command that answers within {TIMEOUT_S} s, without a prompt"
    if result.returncode != 0:
        return None, (f"a command that exits 0 (it exited {result.returncode}; run it by hand "
                      "to see why: its output is not shown here, it may hold the secret)")
    secret = result.stdout.strip()
    if not secret:
        return None, "a command that prints the secret on its standard output"
    if "\n" in secret:
        return None, "a command that prints the secret alone, on one line"
    return secret, None


def from_command(host_name: str, key: str, command: str) -> tuple[str | None, list[Problem]]:
    """The secret ``command`` prints, or a problem naming ``host_name`` and ``key``."""
    secret, need = _run(command)
    return secret, [] if need is None else [problem(host_name, key, command, need)]


def one_source(host_name: str, file_key: str, file_value, command_key: str,
               command_value) -> list[Problem]:
    """A secret has one source: a file or a command, not both (which would win is a guess)."""
    if file_value is not None and command_value is not None:
        return [problem(host_name, command_key, command_value,
                        f"None when {file_key} is set: one source per secret")]
    return []
