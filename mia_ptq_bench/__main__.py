"""`python -m mia_ptq_bench` runs the `mptq-bench` command (for when its script is not on PATH)."""

from .cli import app

app(prog_name="mptq-bench")
