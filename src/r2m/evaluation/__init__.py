"""Evaluation: scoring, metrics, the protocol (DROP/GAIN), tables and the gate (SPEC section 6)."""
