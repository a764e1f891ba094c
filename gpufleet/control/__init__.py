"""What the control machine contributes to a plan: Hub metadata, local images, hashes."""
