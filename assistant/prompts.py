"""The fixed texts the assistant is asked with, shared by inference, data generation and evaluation.

A light module on purpose: data tools import these strings without pulling in torch or transformers.
"""

IMAGE_TOKEN = "<image>"  # one per image in chat text; the processor expands it into the image's positions

# Anomaly-OV's detection prompt (its VisA-D&R and Anomaly-Instruct detection turns).
DETECTION_QUESTION = "Are there any defects for the object in the image? Please reply with 'Yes' or 'No'."
INSPECTION_QUESTION = "Is there any defect in the object? If there is, describe the defect and where it is."
DEFECT_QUESTION = "What type of defect is it?"  # also a follow-up turn of the generated training conversations
REFERENCE_INTRO = "The first {n} image(s) show normal samples of the object; the last image is the query."
