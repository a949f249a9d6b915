#!/usr/bin/env bash
# Make the harness's PKI (ECDSA P-256) in pki/ beside this script.
#   root CA -> intermediate CA -> server (SAN DNS:localhost, IP:127.0.0.1)
#                              -> client-a (allowed; URI SAN spiffe://example.org/ns/default/sa/client-a)
#                              -> client-b (valid chain, but NOT authorized -> peers answer 403)
#   rogue CA (untrusted)       -> client-rogue (must fail the TLS handshake)
# Re-runnable: does nothing if pki/.done exists, unless called with --force.
set -euo pipefail
cd "$(dirname "$0")"
D=pki
if [[ -f $D/.done && "${1:-}" != "--force" ]]; then
  echo "pki: already present in $(pwd)/$D (use --force to regenerate)"; exit 0
fi
rm -rf "$D"; mkdir -p "$D"; cd "$D"
DAYS=3650

key() { openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -pkeyopt ec_param_enc:named_curve -out "$1.key" 2>/dev/null; }

# --- extension profiles ---------------------------------------------------
cat > ext.cnf <<'EOF'
[v3_root]
basicConstraints = critical, CA:TRUE
keyUsage = critical, keyCertSign, cRLSign
subjectKeyIdentifier = hash
[v3_int]
basicConstraints = critical, CA:TRUE, pathlen:0
keyUsage = critical, keyCertSign, cRLSign
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid:always
[v3_server]
basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature
extendedKeyUsage = serverAuth
subjectAltName = DNS:localhost, IP:127.0.0.1
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid:always
[v3_client_a]
basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature
extendedKeyUsage = clientAuth
subjectAltName = URI:spiffe://example.org/ns/default/sa/client-a
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid:always
[v3_client_b]
basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature
extendedKeyUsage = clientAuth
subjectAltName = URI:spiffe://example.org/ns/default/sa/client-b
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid:always
EOF

sign() { # name subject issuer ext
  local n=$1 subj=$2 iss=$3 ext=$4
  key "$n"
  openssl req -new -key "$n.key" -subj "$subj" -out "$n.csr"
  openssl x509 -req -in "$n.csr" -CA "$iss.crt" -CAkey "$iss.key" -set_serial "0x$(openssl rand -hex 8)" \
    -days $DAYS -sha256 -extfile ext.cnf -extensions "$ext" -out "$n.crt" 2>/dev/null
  rm -f "$n.csr"
}

# root + rogue root (self-signed)
for r in root rogue-root; do
  key "$r"
  openssl req -new -x509 -key "$r.key" -subj "/O=bench/CN=bench $r CA" -days $DAYS -sha256 \
    -config ext.cnf -extensions v3_root -out "$r.crt"
done
sign intermediate "/O=bench/CN=bench intermediate CA" root v3_int
sign server       "/O=bench/CN=localhost"              intermediate v3_server
sign client-a     "/O=bench/CN=client-a"               intermediate v3_client_a
sign client-b     "/O=bench/CN=client-b"               intermediate v3_client_b
sign client-rogue "/O=bench/CN=client-a"               rogue-root   v3_client_a

# bundles
cat server.crt intermediate.crt            > server-chain.pem     # leaf + intermediate (what servers send)
cat server-chain.pem server.key            > server-full.pem      # haproxy 'crt' wants cert(s)+key in one file
cp root.crt                                  client-ca.pem        # trust anchor used by every terminator
cat intermediate.crt root.crt              > ca-bundle.pem        # for clients: verify server / build client chain
for c in client-a client-b; do
  cat $c.crt intermediate.crt              > $c-chain.pem         # leaf + intermediate (what clients send)
  cat $c-chain.pem $c.key                  > $c-full.pem          # haproxy originator 'crt'
done
cat client-rogue.crt client-rogue.key      > client-rogue-full.pem
chmod 600 ./*.key ./*-full.pem

# sanity
openssl verify -CAfile root.crt -untrusted intermediate.crt server.crt client-a.crt client-b.crt >/dev/null
if openssl verify -CAfile root.crt -untrusted intermediate.crt client-rogue.crt >/dev/null 2>&1; then
  echo "pki: rogue cert unexpectedly verifies" >&2; exit 1
fi
touch .done
echo "pki: generated in $(pwd)"
openssl x509 -in client-a.crt -noout -subject -ext subjectAltName | sed 's/^/  client-a: /'
