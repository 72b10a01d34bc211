"""Training and evaluation as a library: ``train`` (:func:`~sequencer.engine.train.train`, ``TrainResult``),
``config`` (``TrainConfig``: the train flags with their defaults and checks), ``user_data`` (the caller's Datasets
and modules in a run), ``guest`` (console output and the caller's random state), ``validation``
(:func:`~sequencer.engine.validation.validate`, ``ValidationResult``), ``evaluate`` (the one eval loop), ``inference`` (models with their
class names and preprocessing), ``checkpoint`` (atomic writes, history, resume), ``distributed`` (torchrun/DDP).

Sub-modules are imported on use so that ``import sequencer`` stays light.
"""
