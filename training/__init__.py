"""Training: stage 1 (the anomaly expert, vision frozen) and stage 2 (LoRA/QLoRA instruction tuning),
sharing one accelerate loop with exact resume."""
