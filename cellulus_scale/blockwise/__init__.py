"""The blockwise engine, which knows nothing about Cellulus: blocks, plan, stages, cluster."""
