"""The command-line tools other than the daemon: demo, produce, eval, train-teacher, broker, status."""
