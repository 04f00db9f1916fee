"""`python -m mia_ptq_bench` runs the `mptq-bench` command (for when its script is not on PATH)."""

from .cli import app

if __name__ == "__main__":
    app(prog_name="mptq-bench")
