"""Training, evaluation, prediction and checkpoints: ``train.train(cfg)`` is the one entry point for training."""
