#!/usr/bin/env bash
# Generates a private CA and a SuperLink server certificate signed by it.
#
#   bash scripts/make_certs.sh OUT_DIR [NAME_OR_IP ...]
#
# Writes OUT_DIR/ca.crt, ca.key, server.pem, server.key. The server certificate's subject
# alternative names always hold localhost, 127.0.0.1 and ::1 (the SuperLink's own SuperExec and
# the CLI on the server machine dial loopback and check the name), plus every extra argument:
# the DNS names and IP addresses that SuperNodes and users dial. An argument that parses as an
# IPv4 or IPv6 address becomes an IP entry, anything else a DNS entry.
# Existing files are kept, so re-running never invalidates keys already handed out; delete
# OUT_DIR to start over.
set -euo pipefail
OUT=${1:?usage: make_certs.sh OUT_DIR [NAME_OR_IP ...]}
shift
mkdir -p "$OUT"
cd "$OUT"

if [ -f ca.crt ] && [ -f server.pem ] && [ -f server.key ]; then
  echo "Certificates already in $PWD (delete them to regenerate)"
  exit 0
fi

sans="DNS:localhost,IP:127.0.0.1,IP:::1"
for name in "$@"; do
  if python3 -c 'import ipaddress, sys; ipaddress.ip_address(sys.argv[1])' "$name" 2>/dev/null; then
    sans="$sans,IP:$name"
  else
    sans="$sans,DNS:$name"
  fi
done

umask 077  # private keys readable by their owner only
# ECDSA P-384 keys: as strong as RSA 7680 and generated in milliseconds.
openssl ecparam -name secp384r1 -genkey -noout -out ca.key
openssl req -x509 -new -key ca.key -sha384 -days 365 -subj "/CN=bayesfl federation CA" -out ca.crt
openssl ecparam -name secp384r1 -genkey -noout -out server.key
openssl req -new -key server.key -subj "/CN=bayesfl superlink" -out server.csr
printf 'basicConstraints=CA:FALSE\nkeyUsage=digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth\nsubjectAltName=%s\n' \
  "$sans" > server.ext
openssl x509 -req -in server.csr -CA ca.crt -CAkey ca.key -CAcreateserial -days 365 -sha384 \
  -extfile server.ext -out server.pem 2>/dev/null
rm -f server.csr server.ext ca.srl
chmod 644 ca.crt server.pem
echo "CA: $PWD/ca.crt  server certificate: $PWD/server.pem  names: $sans"
