"""Generic chat / question answering: any dataset with a `messages` column, or prompt/response columns.

The last assistant turn is the supervised completion; earlier turns are context.
"""

DEFAULTS = dict(type="chat", system_prompt="You are a helpful assistant.")
