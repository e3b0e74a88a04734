"""End-to-end tests: the service started for real and driven from outside, here through a headless browser."""
