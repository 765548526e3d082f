"""Source adapters: find, read and translate checkpoints into the canonical flow-map convention."""
