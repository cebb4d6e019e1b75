"""Throughput, latency and memory benchmarks of decision-router (issue 8); see README "Performance"."""
