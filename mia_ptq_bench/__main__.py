"""`python -m mia_ptq_bench` runs the `mptq-bench` command (for when its script is not on PATH)."""

from .cli import run

if __name__ == "__main__":
    run()
