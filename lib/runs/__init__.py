"""Single training runs driven by a .config: the training entry point, choosing and resuming run directories."""
