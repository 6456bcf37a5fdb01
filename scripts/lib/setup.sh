# Sourced by scripts/demo and scripts/test: makes a fresh machine ready.
#   - a virtual environment in .venv with the exact versions, checked by
#     hash, of requirements/test.lock (what the suite was run with), and
#     dicom-watcher installed editable
#   - dcmtk (storescp, storescu) and the other tools the tests use, from
#     Debian's packages when running as root
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
cd "$repo"

python=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    echo "setup: creating .venv with $($python --version)"
    "$python" -m venv .venv
fi
if ! .venv/bin/python -c "import watcher, pytest" 2>/dev/null \
        || [ pyproject.toml -nt .venv/.installed ] \
        || [ requirements/test.lock -nt .venv/.installed ]; then
    echo "setup: installing requirements/test.lock and dicom-watcher into .venv"
    .venv/bin/python -m pip install --quiet --require-hashes -r requirements/test.lock
    .venv/bin/python -m pip install --quiet --no-deps --no-build-isolation -e .
    touch .venv/.installed
fi

apt_install() {
    # apt_install PACKAGE...: install Debian packages when we are root.
    if [ "$(id -u)" -ne 0 ] || ! command -v apt-get >/dev/null; then
        return 1
    fi
    echo "setup: apt-get install $*"
    if [ -z "${DW_APT_UPDATED:-}" ]; then
        apt-get update -qq >/dev/null
        DW_APT_UPDATED=1
    fi
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null
}

missing=()
dcmtk_installed() {
    [[ $(storescp --version 2>&1) == *dcmtk* && $(storescu --version 2>&1) == *dcmtk* ]]
}
dcmtk_installed || missing+=(dcmtk)
command -v systemd-analyze >/dev/null || missing+=(systemd)   # verifies the units in tests
command -v dcm2niix >/dev/null || missing+=(dcm2niix)         # the conversion hook example
command -v sshfs >/dev/null || missing+=(sshfs)               # a real network share in tests
[ -x /usr/sbin/sshd ] || missing+=(openssh-server)            #   served by a private sshd
# The tests that run dicom-watcher as other users install it into a venv of
# Debian's python3 (this machine's default python3 may be private to root).
/usr/bin/python3 -c 'import ensurepip, venv' 2>/dev/null || missing+=(python3-venv)
[ -x /usr/bin/time ] || missing+=(time)                        # peak memory in scripts/bench
command -v chromium >/dev/null || missing+=(chromium)         # the status page, in a real browser
command -v promtool >/dev/null || missing+=(prometheus)       # checks the example alert rules
[ -x /usr/sbin/logrotate ] || missing+=(logrotate)           # checks the logrotate example of docs/operators.md
if ((${#missing[@]})); then
    apt_install "${missing[@]}" \
        || echo "setup: ${missing[*]} missing and cannot be installed without root (tests that need them skip)"
fi
# After the system's: pynetdicom puts programs named storescp/storescu in
# .venv/bin, which must not shadow dcmtk's.
export PATH="$PATH:$repo/.venv/bin"
