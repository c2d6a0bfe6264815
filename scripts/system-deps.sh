#!/bin/sh
# System packages the tests need (Debian): Chromium for the web chat test. Idempotent.
set -e
if [ ! -x /usr/bin/chromium ]; then
    apt-get update
    DEBIAN_FRONTEND=noninteractive apt-get install -y chromium
fi
