"""Analysis of freshly embedded content: classification, moderation and anomaly scores."""
