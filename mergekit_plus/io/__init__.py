"""The checkpoint room: resolving sources, lazy per-tensor reads, shard writing and side files."""
