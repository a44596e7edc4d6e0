"""Serving: the HTTP endpoint (metrics, health, snapshots), exports for serving systems, and `streamkd pull`."""
