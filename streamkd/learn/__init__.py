"""Learning: what the student trains on and how (replay, EMA, publishing gate, teacher budget, drift)."""
