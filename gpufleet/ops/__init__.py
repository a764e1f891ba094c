"""gpufleet's pyinfra operations: what runs inside a deploy to carry out a plan."""
