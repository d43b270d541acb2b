"""Training objectives: plug-ins that turn the model's output into a summed loss.

An objective is written once and works under every parallel layout (``keyetron.parallel``
never needs to know it): the engine calls the model, hands the ``ModelOutput`` and the batch
to the objective, divides the summed loss by the step's global count of the objective's
units, and backpropagates. ``base.py`` says what an objective must provide.
"""
from keyetron.objectives.base import Objective, ObjectiveLoss  # noqa: F401
from keyetron.objectives.language_model import LanguageModelObjective  # noqa: F401
