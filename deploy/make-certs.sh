#!/usr/bin/env bash
# Makes a private certificate authority and a server certificate for the broker's TLS
# listener (deploy/mosquitto-secure.conf, port 8883) — for a pilot or an internal network.
# A public-facing broker can use a certificate from a public CA instead; the files below
# keep the same names either way.
#
# Usage: deploy/make-certs.sh DIR NAME [NAME...]
#   DIR    where to write ca.crt, ca.key, server.crt, server.key (created; existing files
#          are kept, so rerunning is harmless: delete DIR's server.* to reissue)
#   NAME   every host name or IP address devices and the service use to reach the broker,
#          e.g. mqtt.example.org 10.0.0.5 127.0.0.1 (they become subjectAltNames; TLS
#          clients, rustls included, check the name against these, not against the CN)
# Environment:
#   CERT_DAYS  validity of the server certificate in days (default 825, the longest most
#              clients accept)
#   CA_DAYS    validity of the CA (default 3650)
#
# Then: give ca.crt to the service (mqtt.ca_file) and to the bracelets' firmware; give
# server.crt and server.key to Mosquitto (readable by its user only).
set -euo pipefail

if [ $# -lt 2 ]; then
    sed -n '2,20p' "$0" >&2
    exit 2
fi
dir=$1
shift
command -v openssl >/dev/null || { echo "openssl not found (apt-get install openssl)" >&2; exit 1; }
mkdir -p "$dir"
umask 077

if [ ! -s "$dir/ca.key" ] || [ ! -s "$dir/ca.crt" ]; then
    openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes \
        -keyout "$dir/ca.key" -out "$dir/ca.crt" -days "${CA_DAYS:-3650}" \
        -subj "/CN=Silverguard broker CA" \
        -addext "basicConstraints=critical,CA:TRUE" \
        -addext "keyUsage=critical,keyCertSign,cRLSign" 2>/dev/null
    echo "made $dir/ca.crt"
fi

if [ ! -s "$dir/server.key" ] || [ ! -s "$dir/server.crt" ]; then
    san=""
    for name in "$@"; do
        if [[ $name =~ ^[0-9.]+$ || $name == *:* ]]; then
            san+="${san:+,}IP:$name"
        else
            san+="${san:+,}DNS:$name"
        fi
    done
    ext=$(mktemp)
    trap 'rm -f "$ext" "$dir/server.csr"' EXIT
    printf '%s\n' "basicConstraints=CA:FALSE" "keyUsage=critical,digitalSignature" \
        "extendedKeyUsage=serverAuth" "subjectAltName=$san" >"$ext"
    openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes \
        -keyout "$dir/server.key" -out "$dir/server.csr" -subj "/CN=$1" 2>/dev/null
    openssl x509 -req -in "$dir/server.csr" -CA "$dir/ca.crt" -CAkey "$dir/ca.key" \
        -CAcreateserial -out "$dir/server.crt" -days "${CERT_DAYS:-825}" -extfile "$ext" 2>/dev/null
    echo "made $dir/server.crt for $san"
fi
chmod 644 "$dir/ca.crt" "$dir/server.crt"
