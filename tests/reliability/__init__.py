"""Reliability and security scenarios (issue 13): faults, hostile input, secrets, load."""
