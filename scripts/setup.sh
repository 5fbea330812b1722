#!/usr/bin/env bash
# Set up a fresh machine: system packages (Debian, as root), then the project's virtual environment.
#   scripts/setup.sh pipeline   what `make repro` needs: Fashion-MNIST from Debian, the venv
#   scripts/setup.sh team       also what `make team-server` needs: logins and PostgreSQL's driver (extra [team])
#   scripts/setup.sh bench      also what `make bench` needs: real ImageNet weights for its fine-tuning rows
#   scripts/setup.sh test       also what the tests need: Chromium for the browser test, PostgreSQL for the
#                               team-server test (started by the tests, as an unprivileged user), test extras
set -euo pipefail
cd "$(dirname "$0")/.."
purpose=${1:-pipeline}
venv=${VENV:-.venv}
python=${PYTHON:-python3}

say() { printf '%s\n' "setup: $*" >&2; }

packages=(dataset-fashion-mnist)
[ "$purpose" = test ] && packages+=(chromium postgresql)
missing=()
for package in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q "install ok installed" || missing+=("$package")
done
if [ ${#missing[@]} -gt 0 ]; then
  if ! command -v apt-get >/dev/null; then
    say "not a Debian/Ubuntu machine: install ${missing[*]} yourself (the data set can also come from the"
    say "public mirrors: the fetch stage downloads it when /usr/share/datasets/fashion-mnist is absent)"
  elif [ "$(id -u)" != 0 ]; then
    say "not root: run 'sudo apt-get install ${missing[*]}', or continue and let fetch download the data"
  else
    say "installing ${missing[*]} with apt-get"
    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null; } ||
      say "apt-get failed (no network or no Debian mirror?): install ${missing[*]} by hand"
  fi
fi

stamp="$venv/.installed-$purpose"
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  "$python" -c 'import sys; sys.exit(sys.version_info < (3, 10))' ||
    { say "$python is older than Python 3.10; set PYTHON=python3.11"; exit 1; }
  [ -x "$venv/bin/python" ] || "$python" -m venv "$venv"
  extras=""; [ "$purpose" != pipeline ] && extras="[$purpose]"
  say "installing the project into $venv (first time: about 2 minutes, 6 GB)"
  "$venv/bin/python" -m pip install -q --upgrade pip ||
    { say "pip cannot reach a package index: check the network or PIP_INDEX_URL"; exit 1; }
  "$venv/bin/python" -m pip install -q -e ".$extras" ||
    { say "pip install failed (see above): check the network or PIP_INDEX_URL"; exit 1; }
  touch "$stamp"
fi
