#!/bin/sh
# Create Mosquitto's dynamic-security file with one admin client: the client
# the hub uses (broker_admin_username / broker_admin_password) to create and
# delete agent clients. Run it once, before the broker first starts with
# deploy/mosquitto/mosquitto.conf; then start the broker and run
#
#     outpost-hub broker setup --config /etc/outpost/hub.toml
#
# which creates the Outpost roles and the hub's own MQTT client.
#
# usage: dynsec-init.sh [FILE] [ADMIN_USER]
#   FILE        default /var/lib/mosquitto/dynamic-security.json
#   ADMIN_USER  default outpost-admin
# The password is read from $OUTPOST_BROKER_ADMIN_PASSWORD when set (for
# automation: a command-line argument would show in 'ps'), else prompted for.
set -eu

file=${1:-/var/lib/mosquitto/dynamic-security.json}
admin=${2:-outpost-admin}

if [ -e "$file" ]; then
    echo "dynsec-init.sh: $file exists; refusing to replace the broker's clients and roles" >&2
    exit 1
fi
command -v mosquitto_ctrl >/dev/null || { echo "dynsec-init.sh: mosquitto_ctrl not found (Debian: apt-get install mosquitto-clients)" >&2; exit 1; }

# The file holds password hashes: readable by the broker only.
umask 077
if [ -n "${OUTPOST_BROKER_ADMIN_PASSWORD:-}" ]; then
    mosquitto_ctrl dynsec init "$file" "$admin" "$OUTPOST_BROKER_ADMIN_PASSWORD" >/dev/null
else
    mosquitto_ctrl dynsec init "$file" "$admin"
fi
if [ "$(id -u)" = 0 ] && id mosquitto >/dev/null 2>&1; then
    chown mosquitto: "$file"
fi
echo "created $file with admin client '$admin'"
