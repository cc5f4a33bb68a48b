"""Pictures of a frame with its label outlines."""
