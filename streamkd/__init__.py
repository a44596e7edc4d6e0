"""streamkd: online knowledge distillation from a Kafka image stream."""

__version__ = "0.1.0"
