"""Generic chat / question answering: any dataset with a `messages` column, or prompt/response columns.

Every assistant turn of a conversation carries loss (as with TRL's assistant-only loss); earlier turns
are context for later ones. `assistant_turns: last` supervises the final answer only. An `instruction`
is put before the first user turn.
"""

DEFAULTS = dict(type="chat", system_prompt="You are a helpful assistant.")
