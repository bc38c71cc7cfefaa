"""Banking intent detection: PolyAI/banking77, 77 fine-grained intents.

Label names come from the dataset's ClassLabel feature. The Hub repo is a legacy loading script;
the loader falls back to its parquet conversion automatically.
"""

DEFAULTS = dict(
    type="classification",
    dataset="PolyAI/banking77",
    text_column="text",
    label_column="label",
    system_prompt="You are a banking assistant who routes customer queries.",
    instruction="Which intent does this banking customer query express?",
)
