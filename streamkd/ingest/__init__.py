"""Ingest: Kafka records in, decoded and validated batches with their offsets out (bad input goes to the DLQ)."""
