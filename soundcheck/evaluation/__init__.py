"""Evaluation: the simulator and its ground truth, scoring alerts against it, the scenario
report, the NAB benchmark, producing to Kafka, worker processes, and the demo."""
