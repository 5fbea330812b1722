"""Image classifier pipeline: the library the DVC stages under `stages/` call."""
