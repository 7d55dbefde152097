"""pyinfra settings for every run of deploy.py and bench.py."""

# Stop the whole run if any host fails: a half-rolled fleet is worse than a stopped one.
FAIL_PERCENT = 0
# SSH connections opened at once; raise for large fleets.
PARALLEL = 16
