"""Distillation training: the AML recipe (config), tuple building, the loop, checkpoints, DDP."""
