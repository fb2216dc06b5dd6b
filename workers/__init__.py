"""The worker process: takes jobs from Redis streams and runs them on warm models."""
