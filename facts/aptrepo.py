"""What an apt repository offers, read by the host itself (it may be a host-local mirror)."""

from __future__ import annotations

from pyinfra.api import FactBase, QuoteString, StringCommand


class FlatRepoVersions(FactBase[dict[str, list[str]]]):
    """Versions per package in a flat apt repository's ``Packages`` index.

    + url: the repository URL with ``$(ARCH)`` already substituted

    .. code:: python

        {"nvidia-container-toolkit": ["1.17.8-1", "1.18.0-1"], ...}

    An unreachable repository gives ``{"": ["<curl's error>"]}`` so the caller can say why.
    """

    @staticmethod
    def default() -> dict:
        return {}

    def requires_command(self, url: str) -> str:
        return "curl"

    def command(self, url: str) -> StringCommand:
        packages = QuoteString(url.rstrip("/") + "/Packages")
        return StringCommand("curl -fsSL", packages, "2>&1 || echo '##unreachable'")

    def process(self, output: list[str]) -> dict[str, list[str]]:
        if output and output[-1] == "##unreachable":
            return {"": [" ".join(output[:-1]).strip() or "unreachable"]}
        versions: dict[str, list[str]] = {}
        package = None
        for line in output:
            if line.startswith("Package:"):
                package = line.split(":", 1)[1].strip()
            elif line.startswith("Version:") and package:
                versions.setdefault(package, []).append(line.split(":", 1)[1].strip())
        return versions
