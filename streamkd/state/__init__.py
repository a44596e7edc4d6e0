"""State: training checkpoints for resume, snapshots for serving, and the durable file helpers under both."""
