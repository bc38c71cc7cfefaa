"""Commonsense multiple-choice QA: tau/commonsense_qa, 5 choices labelled A-E; the target is the letter."""

DEFAULTS = dict(
    type="multiple_choice",
    dataset="tau/commonsense_qa",
    question_column="question",
    choices_column="choices",
    answer_column="answerKey",
    system_prompt="You answer commonsense questions.",
    instruction="Choose the most sensible answer.",
)
