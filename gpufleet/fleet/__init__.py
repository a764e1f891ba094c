"""The command's side: pyinfra runs and their typed reports, drift, status, rollouts, the lease."""
