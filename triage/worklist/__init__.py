"""The reading worklist: the priority policy (pure) and the service that applies it."""
