#!/usr/bin/env bash
# Fetches Triton's perf_analyzer into DIR (default .tools) without installing anything into a venv.
#
# The binary ships inside the tritonclient manylinux1 x86_64 wheels; from 2.52 on they need glibc 2.38,
# so it comes from 2.51.0. It links libcudart.so.12 (loaded, unused without a GPU), taken out of the
# nvidia-cuda-runtime-cu12 wheel (downloaded and unzipped, never installed), and libb64.so.0d (Debian
# package libb64-0d). The result is DIR/perf_analyzer, a wrapper that sets LD_LIBRARY_PATH.
set -euo pipefail

DIR="${1:-.tools}"
PYTHON="${PYTHON:-}"
if [[ -z "$PYTHON" ]]; then
  if [[ -x .venv/bin/python ]]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
TRITONCLIENT_VERSION="${TRITONCLIENT_VERSION:-2.51.0}"
CUDART_SPEC="${CUDART_SPEC:-nvidia-cuda-runtime-cu12==12.4.127}"

if [[ "$(uname -m)" != "x86_64" ]]; then
  echo "perf_analyzer wheels exist for x86_64 only (this is $(uname -m))" >&2
  exit 1
fi

mkdir -p "$DIR/lib" "$DIR/bin"
DIR="$(cd "$DIR" && pwd)"
WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT

unzip_member() { # wheel, member glob, destination dir (flattened)
  "$PYTHON" - "$1" "$2" "$3" <<'EOF'
import fnmatch, os, shutil, sys, zipfile
wheel, pattern, dest = sys.argv[1:4]
with zipfile.ZipFile(wheel) as zf:
    names = [n for n in zf.namelist() if fnmatch.fnmatch(n, pattern)]
    if not names:
        sys.exit(f"{pattern} not found in {wheel}")
    for name in names:
        target = os.path.join(dest, os.path.basename(name))
        with zf.open(name) as src, open(target, "wb") as out:
            shutil.copyfileobj(src, out)
        print(f"  extracted {os.path.basename(name)}")
EOF
}

if [[ ! -x "$DIR/bin/perf_analyzer" ]]; then
  echo "==> downloading tritonclient==$TRITONCLIENT_VERSION (manylinux1 wheel, not installed)"
  "$PYTHON" -m pip download -q --no-deps --only-binary=:all: --platform manylinux1_x86_64 \
    --python-version 3.11 -d "$WORK/tc" "tritonclient==$TRITONCLIENT_VERSION"
  unzip_member "$(ls "$WORK"/tc/tritonclient-*.whl)" "*.data/data/bin/perf_analyzer" "$DIR/bin"
  chmod +x "$DIR/bin/perf_analyzer"
fi

if [[ ! -e "$DIR/lib/libcudart.so.12" ]]; then
  echo "==> downloading $CUDART_SPEC (for libcudart.so.12; not installed)"
  "$PYTHON" -m pip download -q --no-deps --only-binary=:all: --platform manylinux2014_x86_64 \
    --python-version 3.11 -d "$WORK/cuda" "$CUDART_SPEC"
  unzip_member "$(ls "$WORK"/cuda/nvidia_cuda_runtime_cu12-*.whl)" "nvidia/cuda_runtime/lib/libcudart.so.12" \
    "$DIR/lib"
fi

have_libb64() {
  [[ -e "$DIR/lib/libb64.so.0d" ]] || [[ -e /usr/lib/x86_64-linux-gnu/libb64.so.0d ]] \
    || /sbin/ldconfig -p 2>/dev/null | grep -q 'libb64\.so\.0d'
}
if ! have_libb64; then
  echo "==> libb64.so.0d missing: installing Debian package libb64-0d"
  SUDO=""
  if [[ "$(id -u)" != "0" ]]; then SUDO="sudo -n"; fi
  if command -v apt-get >/dev/null && { $SUDO apt-get install -y --no-install-recommends libb64-0d \
    || { $SUDO apt-get update -q && $SUDO apt-get install -y --no-install-recommends libb64-0d; }; }; then
    echo "  installed libb64-0d"
  elif command -v apt-get >/dev/null; then
    # No root: fetch the .deb and unpack only the library next to perf_analyzer.
    (cd "$WORK" && apt-get download libb64-0d && dpkg-deb -x libb64-0d_*.deb "$WORK/b64")
    cp "$(find "$WORK/b64" -name 'libb64.so.0d*' | head -1)" "$DIR/lib/libb64.so.0d"
  else
    echo "libb64.so.0d not found and apt-get is unavailable: install libb64-0d by hand" >&2
    exit 1
  fi
fi

cat >"$DIR/perf_analyzer" <<EOF
#!/usr/bin/env bash
# Wrapper written by deploy/fetch-perf-analyzer.sh: perf_analyzer with its private libraries.
export LD_LIBRARY_PATH="$DIR/lib\${LD_LIBRARY_PATH:+:\$LD_LIBRARY_PATH}"
exec "$DIR/bin/perf_analyzer" "\$@"
EOF
chmod +x "$DIR/perf_analyzer"

if "$DIR/perf_analyzer" --help >/dev/null 2>&1 || "$DIR/perf_analyzer" --version >/dev/null 2>&1; then
  echo "==> ready: $DIR/perf_analyzer"
else
  echo "perf_analyzer does not start; missing libraries:" >&2
  LD_LIBRARY_PATH="$DIR/lib" ldd "$DIR/bin/perf_analyzer" | grep 'not found' >&2 || true
  exit 1
fi
