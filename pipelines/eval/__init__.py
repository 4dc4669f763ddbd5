"""kiln eval: held-out measurements of every stage's model."""
