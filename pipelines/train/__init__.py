"""Pretraining, SFT and the reward model on one Ray Train + DeepSpeed trainer."""
