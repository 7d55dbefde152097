"""Refuse an inventory that names one machine twice, while the inventory file is read; which
groups serve the model.

pyinfra keys hosts by name: a name given twice with data becomes one host whose data is both
entries merged, the later winning key by key; two names for one address become two hosts
that deploy one machine at once. Once loaded, neither can be seen (one Host, or two that look
distinct), so each inventory file calls `refuse_duplicates` on its own groups.
"""

from __future__ import annotations

import re

SSH_PORT = 22
# A connector's prefix on an inventory name (`@fake/gb200-tray-01`): not part of the address.
CONNECTOR_PREFIX = re.compile(r"^@[^/]*/")
# Groups whose hosts serve no model: the drift check's and Kubernetes' control hosts, routers.
NOT_SERVING = frozenset({"router", "drift_control", "k8s_control"})


def serves(groups) -> bool:
    """Whether a host of these inventory groups runs vLLM (or, on Kubernetes, holds its
    weights): every host outside NOT_SERVING."""
    return not NOT_SERVING & {str(group) for group in groups}


def address_of(name: str, values: dict) -> str:
    """How other hosts reach a host of the inventory: its ssh_hostname, else its name."""
    return values.get("ssh_hostname") or CONNECTOR_PREFIX.sub("", name)


def _entries(groups: dict) -> list[tuple[str, str, dict]]:
    """(label, name, data) of every host entry, read as pyinfra reads an inventory file:
    public module-level lists (or (hosts, data) tuples) of names or (name, data) tuples."""
    found = []
    for group, hosts in groups.items():
        if group.startswith("_"):
            continue
        if isinstance(hosts, tuple) and len(hosts) == 2 and isinstance(hosts[1], dict):
            hosts = hosts[0]
        if not isinstance(hosts, (list, tuple)):
            continue
        for index, entry in enumerate(hosts):
            name, data = entry if isinstance(entry, tuple) else (entry, {})
            found.append((f"{group}[{index}]", name, data or {}))
    return found


def duplicate_problems(groups: dict) -> list[str]:
    """One line per entry that repeats another: its name twice in one group, or with data in
    two groups (a bare name in a second group only adds the host to it, as pyinfra means), or
    the address (ssh_hostname, else the name; with ssh_port) of an entry of another name."""
    problems = []
    labels: dict[str, str] = {}  # name -> label of its first entry with data (else first)
    merged: dict[str, dict] = {}  # name -> its data, merged as pyinfra merges it
    for label, name, data in _entries(groups):
        if name not in merged:
            labels[name], merged[name] = label, dict(data)
            continue
        earlier = labels[name]
        if earlier.rsplit("[", 1)[0] == label.rsplit("[", 1)[0] or (data and merged[name]):
            problems.append(f"{name}: found twice, as {earlier} and {label}; need one entry "
                            "per host (pyinfra keeps one host, the later entry's data winning "
                            "key by key)")
        elif data:
            labels[name] = label
        merged[name].update(data)
    owners: dict[tuple[str, str], str] = {}  # address -> the name that has it
    for name, data in merged.items():
        address = (str(data.get("ssh_hostname") or name), str(data.get("ssh_port") or SSH_PORT))
        other = owners.setdefault(address, name)
        if other != name:
            shown = address[0] if address[1] == str(SSH_PORT) else ":".join(address)
            problems.append(f"{name}: ssh_hostname: found {shown} in {labels[name]}, the "
                            f"address of {other} ({labels[other]}) too; need one entry per "
                            "machine (two would deploy it at once)")
    return problems


def refuse_duplicates(inventory: str, groups: dict) -> None:
    """Stop loading ``inventory`` (its path, for the message) with one line per problem of
    ``groups`` (the file's globals()); a clean exit, as pyinfra prints it, not a traceback."""
    problems = duplicate_problems(groups)
    if problems:
        raise SystemExit("\n".join(f"{inventory}: {line}" for line in problems))
