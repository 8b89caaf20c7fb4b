"""Kafka plumbing: the local single-node broker (:mod:`.local`) and topic administration (:mod:`.admin`)."""
