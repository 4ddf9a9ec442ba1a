"""Expert merging for mixture-of-experts checkpoints: fewer experts per layer, same architecture.

The package follows the merge pipeline: `layout` finds the experts and routers in the tensor names,
`calibration` gathers routing statistics with a forward pass, `grouping` contains the pure math
(dominant experts, groups, permutation alignment, weighted merge, router rows) and `execute`
streams the checkpoint layer by layer through the shard writer.
"""
