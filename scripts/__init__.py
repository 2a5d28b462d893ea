"""Helper scripts of the repository; check_monitoring is imported by its tests."""
