"""pyinfra inventory: every host of inventories/gb200.py on pyinfra's @fake connector.

    pyinfra harness/gb200_fake_inventory.py deploy.py --dry       (what gb200-dry-run runs)
    GB200_FAKE_RUNTIME=kubernetes pyinfra harness/gb200_fake_inventory.py deploy.py --dry

The same groups and names as the production inventory, as `@fake/<name>` with no SSH data: the
trays and the router answer the deploy's facts as the seed's GB200 tray does
(harness/seed_facts.py: a Grace host), the other hosts as bare hosts, so the whole plan shows with no machine. Group data applies as it does to
the real hosts (the groups keep their names).

GB200_FAKE_RUNTIME: the trays' vllm_runtime (unset: group_data/gb200.py's); kubernetes also
brings in the production inventory's example control host when it lists none, and leaves the
router out (the Service is the endpoint there).

The production inventory is imported, not copied: the hosts an SRE lists there are the hosts
planned here. `inventories` is a folder of pyinfra files, not a package; it imports as a
namespace package because pyinfra puts the folder it runs in, the checkout, on sys.path (run it
from there, as every pyinfra command of this repository is).
"""

import os

from harness.seed_facts import fake_hosts as _fake_hosts
from harness.seed_facts import fake_responses as _fake_responses
from inventories import gb200 as _production

# A group added to the production inventory must be faked here too, or its hosts would be
# missing from the plan without a word.
_unhandled = sorted(name for name, value in vars(_production).items()
                    if not name.startswith("_") and isinstance(value, (list, tuple))
                    and name not in ("gb200", "router", "drift_control", "k8s_control"))
if _unhandled:
    raise SystemExit(f"{__file__}: inventories/gb200.py declares group(s) {_unhandled} that "
                     "this fake inventory does not turn into @fake hosts: add them here")

_runtime = os.environ.get("GB200_FAKE_RUNTIME")
_data = {"vllm_runtime": _runtime} if _runtime else {}
_k8s_control = _production.k8s_control
if _runtime == "kubernetes" and not _k8s_control:
    _k8s_control = _production._k8s_control_example

gb200 = _fake_hosts(_production.gb200, _fake_responses(), _data)
# The kubernetes runtime serves through its Service: no router in front of pods.
router = [] if _runtime == "kubernetes" else _fake_hosts(_production.router, _fake_responses(),
                                                         _data)
drift_control = _fake_hosts(_production.drift_control, None, _data)
k8s_control = _fake_hosts(_k8s_control, None, _data)
