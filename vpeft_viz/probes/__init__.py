"""Model-on-data measurements shared by methods (in ``prepare``) and views alike.

One module per kind of measurement: :mod:`.attention` (attention probabilities, the one place
that unfuses timm's attention), :mod:`.gradients` (squared gradients per weight),
:mod:`.activations` (per-class channel norms of the residual stream). Probes sit below
``methods/`` and above ``backbones``/``data``: they take a model and images and return
arrays, and import nothing from the layers above (see ``docs/architecture.md``).
"""
