"""Kafka clients built from settings, and the isolation of records a client cannot parse."""
