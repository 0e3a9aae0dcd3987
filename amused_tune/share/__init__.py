"""Sharing a finished run, above data and below train: the model card (`card`), the push to the Hub (`hub`) and
merging a LoRA into its base (`merge`). The commands live in amused_tune.cli."""
