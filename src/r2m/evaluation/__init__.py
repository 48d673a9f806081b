"""Evaluation: scoring, metrics, the protocol (DROP/GAIN), tables and the gate (docs/method.md, "Evaluation and gate")."""
