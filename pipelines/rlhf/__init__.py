"""RLHF: the PPO controller, its pure math and its config; the actors live in ``actors/``."""
