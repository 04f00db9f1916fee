# Sourced by scripts/quickstart and scripts/run-tests (from the checkout's root): picks the Python to
# install into and sets $python to it.
#
# The active Python when pip may install into it (a virtual environment, pyenv, conda, a container's);
# otherwise a .venv in the checkout, made once: Debian's own python3 refuses pip installs (PEP 668),
# and gets its venv module from the python3-venv package. Where no GPU driver is present, torch
# comes from PyTorch's CPU index first (about 200 MB instead of pip's default CUDA build, about 5 GB);
# where that index cannot be reached, pip's default is installed with the package.

apt_install() {
  command -v apt-get >/dev/null 2>&1 || { echo "no apt-get here: install $* by hand" >&2; return 1; }
  local sudo=""
  [ "$(id -u)" -eq 0 ] || sudo="sudo"
  echo "installing Debian's $*" >&2
  $sudo apt-get update -qq
  $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null  # sudo would drop a plain prefix
}

python=$(command -v python || command -v python3 || true)
if [ -z "$python" ]; then
  apt_install python3 python3-venv
  python=$(command -v python3)
fi
# (sys.prefix tells a virtual environment from the system's Python; $VIRTUAL_ENV may be inherited stale)
if "$python" -c '
import pathlib, sys, sysconfig
managed = (pathlib.Path(sysconfig.get_path("stdlib")) / "EXTERNALLY-MANAGED").exists()
sys.exit(0 if managed and sys.prefix == sys.base_prefix else 1)'; then
  # A .venv without pip (a venv cut short, or made where python3-venv was missing) is made again.
  if ! .venv/bin/python -m pip --version >/dev/null 2>&1; then
    echo "$python refuses pip installs (PEP 668): making a virtual environment in .venv" >&2
    rm -rf .venv
    if ! "$python" -m venv .venv 2>/dev/null; then
      rm -rf .venv
      apt_install python3-venv || { echo "cannot make .venv: install python3-venv" >&2; exit 1; }
      "$python" -m venv .venv
    fi
  fi
  . .venv/bin/activate
  python=python
  made_venv=1
fi
"$python" -m pip --version >/dev/null 2>&1 || { echo "$python has no pip: install it (Debian: python3-pip)" >&2; exit 1; }
"$python" -c "import sys; sys.exit(sys.version_info < (3, 10))" || { echo "$python is older than 3.10" >&2; exit 1; }
if ! "$python" -c "import torch" 2>/dev/null && ! command -v nvidia-smi >/dev/null 2>&1; then
  # A pair that does not load together (a local wheel may outrank the index) is taken out again.
  if ! { "$python" -m pip install -q --retries 1 --timeout 20 torch torchvision \
           --index-url https://download.pytorch.org/whl/cpu 2>/dev/null && "$python" -c "import torchvision" 2>/dev/null; }; then
    echo "no working torch from PyTorch's CPU index here: pip installs its default build" >&2
    "$python" -m pip uninstall -q -y torch torchvision 2>/dev/null || true
  fi
fi
