"""MLOps: tracking runs, the registry and its champion rule, DVC data versions, the flow steps."""
