"""Insurance-claim detection: infinite-dataset-hub/TextClaimsDataset, 'Claim' vs 'Not a Claim'.

The repo's exact column names are not pinned down, so the columns are detected: the label column is
the one whose values are all 'Claim' / 'Not a Claim', the text column the likeliest text field.
"""

DEFAULTS = dict(
    type="classification",
    dataset="infinite-dataset-hub/TextClaimsDataset",
    labels=["Claim", "Not a Claim"],
    system_prompt="You are an insurance assistant who triages customer messages.",
    instruction="Does this message describe an insurance claim?",
)
