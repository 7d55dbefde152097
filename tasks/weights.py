"""Model weights in <weights_dir>/<profile local name> on the host."""

from pyinfra import host
from pyinfra.api import deploy

from tasks.operations import tree_synced
from tasks.settings import resolve


@deploy("Model weights")
def place():
    """Converge the model folder to the controller's copy; returns the operation (restart trigger).

    Data keys: model_profile, model_source_dir, weights_dir.
    """
    settings = resolve(host)
    return tree_synced(name=f"Place {settings.profile.name} weights in {settings.model_dir}",
                       src=settings.model_source_dir, dest=settings.model_dir)
