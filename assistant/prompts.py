"""The fixed texts the assistant is asked with, shared by inference, data generation and evaluation.

A light module on purpose: data tools import these strings without pulling in torch or transformers.
"""

import re

IMAGE_TOKEN = "<image>"  # one per image in chat text; the processor expands it into the image's positions

# Anomaly-OV's detection prompt (its VisA-D&R and Anomaly-Instruct detection turns).
DETECTION_QUESTION = "Are there any defects for the object in the image? Please reply with 'Yes' or 'No'."
INSPECTION_QUESTION = "Is there any defect in the object? If there is, describe the defect and where it is."
DEFECT_QUESTION = "What type of defect is it?"  # also a follow-up turn of the generated training conversations
# Questions that ask for the decision itself: their answers continue the decided "Yes"/"No" (`engine.agreeing_answer`).
DECISION_QUESTIONS = (INSPECTION_QUESTION, DETECTION_QUESTION)
REFERENCE_INTRO = "The first {n} image(s) show normal samples of the object; the last image is the query."

YES, NO = "Yes", "No"  # the answer words of the detection question; P(Yes) is scored on their first tokens


# Words that make a yes/no question ask whether something is wrong ("Is there a defect?": Yes = anomalous) or
# whether it is fine ("Is this part OK?": Yes = normal). A question with neither, or both, has no polarity.
_WRONG = re.compile(r"\b(defect|anomal|damage|broken|crack|scratch|flaw|wrong|problem|fault|issue|stain|dent)", re.I)
_FINE = re.compile(r"\b(ok|okay|normal|fine|good|pass|acceptable|intact|flawless)\b", re.I)


def yes_means_anomalous(question: str) -> bool | None:
    """Whether "Yes" to this question says the image is anomalous (True), normal (False), or neither (None)."""
    if question.strip() in DECISION_QUESTIONS:
        return True
    wrong, fine = bool(_WRONG.search(question)), bool(_FINE.search(question))
    return None if wrong == fine else wrong


def decision_opening(anomalous: bool, yes_is_anomalous: bool = True) -> str:
    """How an answer that states this decision opens: the word and a comma, so that whatever the model writes
    next, the first word stays "Yes" or "No" (a random model could glue letters onto a bare word)."""
    return f"{YES if anomalous == yes_is_anomalous else NO},"


_OPENING = re.compile(r"[^A-Za-z]*(yes|no)(?![A-Za-z])", re.IGNORECASE)
_FIRST_WORD = re.compile(r"[^A-Za-z]*[A-Za-z]+[^A-Za-z]")  # a first word and what ends it


def first_word_known(text: str) -> bool:
    """Whether a growing answer already shows its whole first word (what `stated_decision` reads)."""
    return _FIRST_WORD.match(text) is not None


def stated_decision(answer: str) -> bool | None:
    """The decision an answer states by its first word: True for "Yes", False for "No" (whatever follows that is
    not a letter: "Yes,", "No." and "Yes2"), else None ("Nothing", "There is ...")."""
    match = _OPENING.match(answer)
    return None if match is None else match.group(1).lower() == "yes"
