"""Building blocks of the training-free CLIP expert (`assistant.clip_expert.ClipAnomalyExpert`)."""
