"""Can two distinct batches share a gradient? Constructions, searches and evidence.

- :mod:`forgelab.theory.linear`: closed forms for linear and softmax regression.
- :mod:`forgelab.theory.search`: exact search in small grid domains and
  gradient matching in the continuous relaxation.
- :mod:`forgelab.theory.networks`: first-layer gradients of neural networks.
- :mod:`forgelab.theory.float_order`: float32 batch gradients under reordering.
- :mod:`forgelab.theory.run`: the ``forgelab theory`` report.

The question is the theoretical half of the re-evaluation (Suliman et al., USENIX
Security 2025, arXiv 2411.05658).
"""
