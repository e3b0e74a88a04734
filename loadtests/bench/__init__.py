"""The `make bench` report: engines, HTTP services and the per-request breakdown, measured side by side in one run."""
