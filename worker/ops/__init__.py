"""What operators read: metrics, probes, logs and traces."""
