"""One module per concern; each exposes one @deploy function that deploy.py calls in order."""
