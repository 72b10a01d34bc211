"""Training and evaluation engine: ``train`` (the ``sequencer train`` command), ``checkpoint`` (atomic writes,
history, resume), ``distributed`` (torchrun/DDP helpers) and ``evaluate``.

Sub-modules are imported on use so that ``import sequencer`` stays light.
"""
