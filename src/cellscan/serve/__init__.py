"""Serving runtime: the champion holder, batching, jobs, safe URL fetching, the batch client."""
