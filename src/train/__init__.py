"""Training: the one trainer (``trainer``), what each recipe objective brings to it (``tasks``),
recipes, LR schedules, metrics and logs, evaluation, preemption, and model merging."""
