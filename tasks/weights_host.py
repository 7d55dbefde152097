"""What the host has, against what the Hub lists: whether a weights folder is complete, how many
bytes a fetch still has to write, and whether its filesystem has room for them.

``tree`` is what the tasks.facts.WeightsTree fact reports of a folder; ``free`` what
tasks.facts.FreeBytes reports of its filesystem.
"""

from __future__ import annotations

from tasks.weights_hub import Listing


def is_complete(listing: Listing, tree: dict) -> bool:
    """True when the manifest vouches for exactly this commit and every file still has the
    size and mtime it had when its checksum was verified."""
    manifest = tree.get("manifest") or {}
    if not (manifest.get("complete") and manifest.get("commit") == listing.commit
            and manifest.get("repo") == listing.repo):
        return False
    verified = manifest.get("files") or {}
    for path, want in listing.files.items():
        entry = verified.get(path)
        checksum = want["sha256"] or want["git_sha1"]
        if not entry or entry.get("checksum") != checksum or entry.get("size") != want["size"]:
            return False
        if tree["files"].get(path) != [entry["size"], entry["mtime_ns"]]:
            return False
    return True


def bytes_to_fetch(listing: Listing, tree: dict) -> int:
    """Bytes the client still has to write: every file not present at its listed size."""
    return sum(want["size"] for path, want in listing.files.items()
               if (tree["files"].get(path) or [None])[0] != want["size"])


def space_problem(host_name: str, local_dir: str, listing: Listing, tree: dict,
                  free: dict | None) -> str | None:
    """Why the filesystem of ``local_dir`` cannot take the fetch, naming the host and
    weights_dir; None when it can, or when its free space is unknown."""
    if not free:
        return None
    needed = bytes_to_fetch(listing, tree)
    # The fetch deletes orphaned .incomplete files before it writes anything.
    available = free["free_bytes"] + tree.get("incomplete_bytes", 0)
    if needed <= available:
        return None
    return (f"{host_name}: weights_dir: {local_dir} (filesystem {free['mount']}) needs "
            f"{needed / 1e9:.2f} GB more for {listing.repo}@{listing.commit[:12]}, "
            f"{available / 1e9:.2f} GB free ({needed} > {available} bytes)")
