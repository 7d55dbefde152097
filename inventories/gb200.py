"""Production example: GB200 compute trays (aarch64 Grace, 4 x Blackwell GPUs each).

    pyinfra inventories/gb200.py deploy.py

Replace the placeholder addresses (TEST-NET-2, never routable) with your trays'. Per-machine
facts only; shared settings live in group_data/gb200.py and group_data/all.py.
"""

gb200 = [
    # (name, {connection and per-machine data})
    ("gb200-tray-01", {"ssh_hostname": "198.51.100.11", "ssh_user": "root"}),
    ("gb200-tray-02", {"ssh_hostname": "198.51.100.12", "ssh_user": "root"}),
]

# The host that runs the drift check on a timer (tools/drift-check, tasks/drift_control.py):
# a bastion with a checkout of this repository, its .venv and an SSH key for the trays.
drift_control = [
    ("drift-control-01", {"ssh_hostname": "198.51.100.2", "ssh_user": "root",
                          "drift_repo_dir": "/opt/kimi-gb200"}),
]
