"""Training data, above the core: dataset cards (`cards`), sources (`sources`), per-sample checks (`checks`),
preprocessing (`preprocess`), the token/text cache (`cache`) and the datasets the trainer reads (`datasets`)."""
