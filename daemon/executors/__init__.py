"""Executors start a Command somewhere (here, or over SSH) and hand its output to a sink."""
