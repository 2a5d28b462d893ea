"""Where results go: Postgres (rows and offsets), migrations, dead letters and produced records."""
