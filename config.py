"""pyinfra settings for every run of deploy.py (and the deploys to come)."""

from tasks import op_order_fast, ssh_nodelay

# Stop the whole run if any host fails: a half-rolled fleet is worse than a stopped one, and
# it is what makes a failed preflight stop every host before any change.
FAIL_PERCENT = 0
# SSH connections opened at once; raise for large fleets.
PARALLEL = 16

# ~10x faster facts over SSH (see tasks/ssh_nodelay.py).
ssh_nodelay.install()
# Operations ordered from the call stack without reading source lines (tasks/op_order_fast.py).
op_order_fast.install()
