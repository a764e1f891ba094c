"""The ``probe`` step (applied by ``deploys/gpu_probe.py``): a container with the GPU request
must start whenever the plumbing between Docker and the GPU changed; its image first.
"""

from __future__ import annotations

from gpufleet.control.inputs import ControlInputs
from gpufleet.core.schema import HostConfig
from gpufleet.core.snapshot import Snapshot
from gpufleet.core.wire import Op
from gpufleet.plan.draft import PlanDraft, image_missing


def plan_probe(
    draft: PlanDraft, config: HostConfig, snap: Snapshot, control: ControlInputs
) -> None:
    probe = config.probe
    ref = probe.image.ref
    why = image_missing(snap, ref, probe.image.source, control.local_images.get(ref))
    if why:
        how = probe.image.source
        draft.add(
            "probe", ref, f"probe image {why}", how, expected="present", found=why, op=Op(how)
        )
    why = "the GPU plumbing changed: a container with the GPU request must start"
    draft.add("probe", "gpu", why, "run the GPU probe", expected="exit 0", op=Op.PROBE)
