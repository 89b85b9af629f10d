#!/usr/bin/env bash
# Start the node with encryption on. HOST_PRIVATE_KEY comes from the environment; when it
# is not set, a host key is created once (mode 0600) in the data directory and reused.
# Extra arguments go to `llm-node serve` (for example --port 9000 or --backend echo).
set -euo pipefail
cd "$(dirname "$0")/.."
data_dir=${LLM_NODE_DATA_DIR:-${XDG_DATA_HOME:-$HOME/.local/share}/llm-node}
key_file="$data_dir/host-key"
if [ -z "${HOST_PRIVATE_KEY+x}" ]; then
  if [ ! -s "$key_file" ]; then
    mkdir -p -m 700 "$data_dir"
    (umask 077 && .venv/bin/llm-node keygen --json |
      .venv/bin/python -c 'import json,sys; print(json.load(sys.stdin)["private_key"])' >"$key_file")
    echo "==> created a host key in $key_file (keep it secret; back it up)" >&2
  fi
  HOST_PRIVATE_KEY=$(cat "$key_file")
  export HOST_PRIVATE_KEY
fi
exec .venv/bin/llm-node serve "$@"
