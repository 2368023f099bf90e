#!/usr/bin/env bash
# A server and two nodes started from the command line, with TLS, mutual TLS and node
# authentication, all on this machine (127.0.0.1). README.md says what changes on several
# machines. Settings: PYTHON (default python3), ROUNDS (default 3), PORT (default: a free one).
set -euo pipefail
PYTHON=${PYTHON:-python3}
if [[ $PYTHON == */* ]]; then PYTHON="$(cd "$(dirname "$PYTHON")" && pwd)/$(basename "$PYTHON")"; fi
cd "$(dirname "$0")"
ROUNDS=${ROUNDS:-3}
PORT=${PORT:-$("$PYTHON" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')}
stamen() { "$PYTHON" -m stamen "$@"; }  # the `stamen` command of this Python's Stamen

WORK=$(mktemp -d)
PIDS=()
cleanup() {
    for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
    rm -rf "$WORK"
}
trap cleanup EXIT

# 1. TLS: a development CA, a certificate for the server's host names, a client certificate.
stamen certs generate --out-dir "$WORK/certs" --host 127.0.0.1 --host localhost

# 2. Node authentication: a key pair per node; the server trusts the public keys listed in
#    one file (PEM blocks or OpenSSH lines), read again whenever it changes.
for node in 0 1; do
    stamen keys generate --out-dir "$WORK/keys" --name "node$node"
    cat "$WORK/keys/node$node.pub" >> "$WORK/authorized_keys"
done

# 3. The server: TLS, mutual TLS (--require-client-certificate) and signed requests.
stamen server app:server_app --address "127.0.0.1:$PORT" \
    --ssl-ca-certfile "$WORK/certs/ca.crt" \
    --ssl-certfile "$WORK/certs/server.crt" \
    --ssl-keyfile "$WORK/certs/server.key" \
    --require-client-certificate \
    --authorized-keys "$WORK/authorized_keys" \
    --run-config "num-server-rounds=$ROUNDS num-nodes=2" \
    --history "$WORK/history.json" &
PIDS+=($!)

# 4. The nodes: trust the CA, show the client certificate, sign with their own key.
for node in 0 1; do
    stamen node app:client_app --server "127.0.0.1:$PORT" \
        --root-certificates "$WORK/certs/ca.crt" \
        --client-certificate "$WORK/certs/client.crt" "$WORK/certs/client.key" \
        --auth-supernode-private-key "$WORK/keys/node$node.key" \
        --auth-supernode-public-key "$WORK/keys/node$node.pub" \
        --max-wait-time 60 \
        --node-config "partition-id=$node" &
    PIDS+=($!)
done

# 5. Each command exits 0 when the run completed.
for pid in "${PIDS[@]}"; do
    if ! wait "$pid"; then
        echo "FAILED: a process exited with an error"
        exit 1
    fi
done
"$PYTHON" - "$WORK/history.json" <<'PY'
import json, sys
history = json.load(open(sys.argv[1]))
final_round, loss = history["losses_distributed"][-1]
print(f"Final loss: {loss:.4f} after {final_round} rounds over TLS with 2 authenticated nodes")
PY
