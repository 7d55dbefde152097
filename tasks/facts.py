"""Custom pyinfra facts: small, read-only questions asked of a host."""

from __future__ import annotations

from pyinfra.api import FactBase, QuoteString, StringCommand


class TreeDigests(FactBase):
    """The sha256 of every file under a directory, by path relative to it.

    .. code:: python

        {"config.json": "9f2c...", "model-00001-of-00002.safetensors": "41ab..."}

    An absent directory yields ``{}``. Meant for small trees (a tiny model, a config folder):
    it reads every byte, so a 595 GB weights tree has its own completeness check.
    """

    def command(self, path: str) -> StringCommand:
        return StringCommand(
            "cd", QuoteString(path), "2>/dev/null", "&&",
            "find . -type f -print0 | sort -z | xargs -0r sha256sum", "||", "true",
        )

    def process(self, output: list[str]) -> dict[str, str]:
        digests = {}
        for line in output:
            digest, _, name = line.partition("  ")
            digests[name.removeprefix("./")] = digest
        return digests

    @staticmethod
    def default() -> dict[str, str]:
        return {}


class FirstLine(FactBase):
    """The first line of a file, stripped, or ``None`` when the file is absent.

    .. code:: python

        "3f7a...c2  requirements.lock"
    """

    def command(self, path: str) -> StringCommand:
        return StringCommand("head", "-n1", QuoteString(path), "2>/dev/null", "||", "true")

    def process(self, output: list[str]) -> str | None:
        return output[0].strip() if output else None
