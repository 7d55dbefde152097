"""pyinfra settings for every run of deploy.py (and the deploys to come)."""

from tasks import facts_together, pyinfra_cpu, ssh_nodelay

# Stop the whole run if any host fails: a half-rolled fleet is worse than a stopped one, and
# it is what makes a failed preflight stop every host before any change.
FAIL_PERCENT = 0
# SSH connections opened at once; raise for large fleets.
PARALLEL = 16

# ~10x faster facts over SSH (see tasks/ssh_nodelay.py).
ssh_nodelay.install()
# Three of pyinfra's CPU hot spots on the controller, patched (tasks/pyinfra_cpu.py).
pyinfra_cpu.install()
# The facts each step's operations read, asked of a host in one command (tasks/facts_together.py).
facts_together.install()
