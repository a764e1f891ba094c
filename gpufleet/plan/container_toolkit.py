"""The ``toolkit``, ``daemon`` and ``cdi`` steps (applied by ``deploys/container_toolkit.py``):
the NVIDIA Container Toolkit at its pin from its signed repository, the daemon.json keys
gpufleet owns, the CDI spec; and whether the repository offers the pin at all.
"""

from __future__ import annotations

from gpufleet.core import known
from gpufleet.core.schema import HostConfig
from gpufleet.core.snapshot import Snapshot
from gpufleet.core.wire import Op
from gpufleet.plan.draft import PlanDraft, apt_line
from gpufleet.plan.types import AptSource


def toolkit_unavailable(config: HostConfig, offered: dict[str, list[str]], url: str) -> str | None:
    """Why the pinned toolkit cannot be installed from the repository that offers ``offered``.

    + offered: ``facts.aptrepo.FlatRepoVersions`` of the repository (``{"": [why]}`` when
      unreachable)
    """
    if "" in offered:
        return f"cannot read the toolkit repository {url}: {offered[''][0]}"
    have = offered.get(known.TOOLKIT_PACKAGES[0], [])
    if config.toolkit.version not in have:
        return (
            f"NVIDIA Container Toolkit {config.toolkit.version} is not in {url} "
            f"(it has {', '.join(have) or 'no nvidia-container-toolkit'}); "
            "set toolkit_version to one of those"
        )
    return None


def toolkit_repo_url(config: HostConfig, snap: Snapshot) -> str:
    return config.toolkit.repo_url.replace("$(ARCH)", known.deb_arch(snap.identity.host.arch))


def toolkit_source(config: HostConfig) -> AptSource:
    tk = config.toolkit
    line = apt_line(keyring=tk.keyring, url=tk.repo_url, dist="/")
    return AptSource("NVIDIA Container Toolkit", tk.key_url, tk.keyring, tk.list_path, line)


def owned_daemon_keys(daemon: dict | None, *, set_default: bool, cdi: bool) -> list[str]:
    """The keys of daemon.json that gpufleet owns and that differ from what it wants."""
    daemon = daemon or {}
    drift = []
    if (daemon.get("runtimes") or {}).get("nvidia") != known.NVIDIA_RUNTIME:
        drift.append("runtimes.nvidia")
    if set_default and daemon.get("default-runtime") != "nvidia":
        drift.append("default-runtime")
    if cdi and (daemon.get("features") or {}).get("cdi") is not True:
        drift.append("features.cdi")
    return drift


def toolkit_mismatch(config: HostConfig, snap: Snapshot) -> dict[str, str | None]:
    """Toolkit packages whose installed version (None: absent) differs from the pin."""
    installed = snap.identity.docker.toolkit_packages
    versions = {p: installed.get(p) for p in known.TOOLKIT_PACKAGES}
    return {p: v for p, v in versions.items() if v != config.toolkit.version}


def plan_toolkit(draft: PlanDraft, config: HostConfig, snap: Snapshot) -> bool:
    tk = config.toolkit
    draft.apt_source(snap, "toolkit", toolkit_source(config))
    mismatch = toolkit_mismatch(config, snap)
    install = bool(mismatch)
    if install:
        found = sorted({v or "absent" for v in mismatch.values()})
        if set(mismatch) == set(known.TOOLKIT_PACKAGES) and len(found) == 1:
            what = "not installed" if found == ["absent"] else f"{found[0]} installed"
            reason = f"toolkit {what}, {tk.version} declared"
        else:
            parts = ", ".join(f"{p} {v or 'absent'}" for p, v in mismatch.items())
            reason = f"toolkit packages differ ({parts}), {tk.version} declared"
        draft.add(
            "toolkit",
            "nvidia-container-toolkit",
            reason,
            "install",
            expected=tk.version,
            found=", ".join(found),
            op=Op.INSTALL,
        )
    daemon = snap.identity.docker.daemon_json
    keys = owned_daemon_keys(daemon, set_default=tk.set_default_runtime, cdi=tk.cdi)
    if keys:
        draft.add(
            "daemon",
            known.DAEMON_JSON,
            f"{', '.join(keys)} not as gpufleet sets them",
            "configure the nvidia runtime",
            expected=", ".join(keys) + " set",
            found="absent" if daemon is None else "different",
            restarts=("docker",),
            op=Op.CONFIGURE,
        )
    if tk.cdi and (snap.files.get(known.CDI_SPEC) is None or install):
        why = "toolkit changes" if install else "no CDI spec"
        draft.add("cdi", known.CDI_SPEC, why, "generate", op=Op.GENERATE)
    # the probe proves GPU containers start: worth running when anything between them changed
    return bool(install or keys or not snap.identity.docker.present)
