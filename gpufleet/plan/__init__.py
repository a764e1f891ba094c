"""A host's plan, pure: the gate, the plan of a converge and of a rollback."""
