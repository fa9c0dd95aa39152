"""forgelab: record, replay, forge and verify SGD execution traces.

Reproduces and extends "Towards a Re-evaluation of Data Forging Attacks in Practice"
(Suliman, Halimi, Kadhe, Baracaldo, Leith; USENIX Security 2025, arXiv 2411.05658).
"""

__version__ = "0.1.0"
