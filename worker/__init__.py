"""recfleet worker: consumes ranking jobs, ranks users with torch, writes results to Redis."""
