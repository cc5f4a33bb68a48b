"""Training: random crops, the shared loop, and one module per model (OCE, StarDist)."""
