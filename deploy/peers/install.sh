#!/usr/bin/env bash
# Creates the peers' venvs for deploy/peers/compare.py, each apart from the project's .venv:
#   .tools/peers/mlserver  torch, then mlserver + numpy
#   .tools/peers/kserve    torch, then kserve (kserve.ModelServer) + numpy
# torch goes in first and alone, exactly pinned: this spec resolves to the CPU wheel already on disk
# here, where any other spec may pull a multi-GB CUDA build. The server packages are pinned, and their
# dependencies are held to the versions measured (deploy/peers/<name>-constraints.txt).
# A peer that fails to install is reported (its error in .tools/peers/<name>.error) and skipped; the
# script fails only when neither installs. A venv already complete (same pins, same constraints file)
# is left as it is.
set -euo pipefail

cd "$(dirname "$0")/../.."
PYTHON="${PYTHON:-python3}"
TORCH_SPEC="torch==2.13.0"
MLSERVER_SPEC="mlserver==1.7.1"
KSERVE_SPEC="kserve==0.21.0"
NUMPY_SPEC="numpy==2.4.6"
DEST=".tools/peers"
mkdir -p "$DEST"

install_peer() { # name, server spec
  local name="$1" spec="$2" venv="$DEST/$1"
  local constraints="deploy/peers/$name-constraints.txt" stamp
  stamp="$TORCH_SPEC $spec $NUMPY_SPEC $(sha256sum "$constraints" | cut -c1-16)"
  if [[ -f "$venv/.installed" && "$(cat "$venv/.installed")" == "$stamp" ]]; then
    echo "peers: $name already installed ($stamp)"
    return 0
  fi
  echo "peers: installing $name into $venv ($TORCH_SPEC, then $spec $NUMPY_SPEC)"
  # Called inside `if`, where errexit does not apply: every step returns on failure by itself.
  rm -rf "$venv" || return 1
  "$PYTHON" -m venv "$venv" || return 1
  "$venv/bin/python" -m pip install -q "$TORCH_SPEC" || return 1
  "$venv/bin/python" -m pip install -q -c "$constraints" "$spec" "$NUMPY_SPEC" || return 1
  "$venv/bin/python" -c "import importlib.metadata as m, torch, numpy, $name
print('peers: $name', m.version('$name'), 'torch', torch.__version__, 'numpy', numpy.__version__)" || return 1
  echo "$stamp" >"$venv/.installed"
}

ok=0
for peer in "mlserver:$MLSERVER_SPEC" "kserve:$KSERVE_SPEC"; do
  name="${peer%%:*}"
  spec="${peer#*:}"
  rm -f "$DEST/$name.error"
  if (install_peer "$name" "$spec") >"$DEST/$name.install.log" 2>&1; then
    grep '^peers:' "$DEST/$name.install.log" || true
    ok=$((ok + 1))
  else
    grep -v "is ignored: it is neither" "$DEST/$name.install.log" | tail -n 20 >"$DEST/$name.error"
    echo "peers: $name FAILED to install; the error (also in $DEST/$name.error):" >&2
    cat "$DEST/$name.error" >&2
  fi
done
if [[ "$ok" -eq 0 ]]; then
  echo "peers: neither peer installed" >&2
  exit 1
fi
