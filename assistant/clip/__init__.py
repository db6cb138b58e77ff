"""The training-free CLIP expert (`assistant.clip.expert.ClipAnomalyExpert`) and its building blocks."""
