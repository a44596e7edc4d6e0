"""Online-learning mechanisms the training loop composes: replay buffer, EMA weights, holdout-gated publishing."""
