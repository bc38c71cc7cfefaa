"""Generic chat / question answering: any dataset with a `messages` column, or prompt/response columns.

Every assistant turn of a conversation carries loss (as with TRL's assistant-only loss); earlier turns
are context for later ones. `assistant_turns: last` supervises the final answer only. An `instruction`
is put before the first user turn. A `context` column (or tasks.<name>.context_column) is folded into
the prompt after the request when a row has one.

Built-in default: databricks/databricks-dolly-15k (CC BY-SA 3.0): 15k human-written instruction /
context / response rows over open and closed QA, extraction, summarisation, brainstorming and more.
"""

DEFAULTS = dict(type="chat", dataset="databricks/databricks-dolly-15k", system_prompt="You are a helpful assistant.")
