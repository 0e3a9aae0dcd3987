"""`amused-tune ui`: a local web page (Gradio) to prepare, watch, compare and share runs (docs/ui.md).

The top layer, beside the commands: every button runs the kit's own functions or the command's own `main`
(training as the process `amused-tune RECIPE ...`), never a second implementation. Gradio is an optional extra,
`pip install "amused-tune[ui]"`; only `command.py` runs without it (to say so)."""
