"""The layout planner: (model, cluster) -> a parallel layout that fits, with its predicted step time and MFU.

topology (clusters and links) -> params (every parameter tensor, split) -> memory (bytes per device) and time
(seconds per micro-batch and layer) -> estimate (one layout) -> search (all layouts) -> report / plot / dry run.
"""
