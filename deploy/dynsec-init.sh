#!/usr/bin/env bash
# Creates Mosquitto's dynamic-security file with the admin account Silverguard uses to
# manage device credentials (docs/device-credentials.md). Run once, before the first start
# of a broker configured from deploy/mosquitto-secure.conf, then run `silverguard broker
# setup` against the running broker.
#
# Usage: deploy/dynsec-init.sh [FILE]      (default /var/lib/mosquitto/dynamic-security.json)
# Environment:
#   DYNSEC_ADMIN_USER      admin username (default silverguard-admin)
#   DYNSEC_ADMIN_PASSWORD  admin password (default: generated and printed once)
#   DYNSEC_OWNER           user that runs the broker and must own the file (default
#                          mosquitto when that user exists and this runs as root)
set -euo pipefail

file=${1:-/var/lib/mosquitto/dynamic-security.json}
user=${DYNSEC_ADMIN_USER:-silverguard-admin}
pass=${DYNSEC_ADMIN_PASSWORD:-}

if ! command -v mosquitto_ctrl >/dev/null; then
    echo "mosquitto_ctrl not found: install mosquitto-clients (Mosquitto 2.0 or later)" >&2
    exit 1
fi
if [ -e "$file" ]; then
    echo "$file already exists; not overwriting it (remove it to start over)" >&2
    exit 1
fi
generated=0
if [ -z "$pass" ]; then
    pass=$(head -c 24 /dev/urandom | base64 | tr '+/' '-_' | tr -d '=\n')
    generated=1
fi
mkdir -p "$(dirname "$file")"
umask 077
mosquitto_ctrl dynsec init "$file" "$user" "$pass" >/dev/null
chmod 600 "$file"
owner=${DYNSEC_OWNER:-}
if [ -z "$owner" ] && [ "$(id -u)" = 0 ] && id mosquitto >/dev/null 2>&1; then
    owner=mosquitto
fi
if [ -n "$owner" ]; then
    chown "$owner" "$file"
fi

echo "created $file with the dynamic-security admin $user" >&2
if [ "$generated" = 1 ]; then
    echo "admin password (shown only now): $pass"
fi
cat >&2 <<MSG
next:
  1. start the broker with deploy/mosquitto-secure.conf (plugin_opt_config_file $file)
  2. give silverguard the admin account, in its config file:
       [broker_admin]
       username = "$user"
       password = "<the admin password>"
     (or SILVERGUARD_BROKER_ADMIN__USERNAME / SILVERGUARD_BROKER_ADMIN__PASSWORD)
  3. silverguard broker setup     # default deny + the service account; prints its password
  4. set mqtt.username / mqtt.password to the service account and start silverguard
MSG
