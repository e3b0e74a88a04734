"""Runtimes for the two encoders: one `Engine` protocol, one class per backend, one factory to choose."""
