#!/usr/bin/env bash
# Send every DICOM file under some folders to a Storage SCP with dcmtk's
# storescu: an operator's test that storescp + dicom-watcher receive and route.
#
#   scripts/send.sh [-h HOST] [-p PORT] [-a CALLED_AE] [-c CALLING_AE] [-x PROPOSE] FOLDER...
#
#   -h HOST        the SCP's host                    (env HOST, default localhost)
#   -p PORT        the SCP's port                    (env PORT, default 11112)
#   -a CALLED_AE   the SCP's AE title                (env CALLED_AE, default DICOMWATCHER)
#   -c CALLING_AE  our AE title                      (env CALLING_AE, default DICOMSEND)
#   -x PROPOSE     transfer syntaxes to propose: storescu's --propose-PROPOSE
#                  (env PROPOSE, default uncompr = every uncompressed syntax).
#                  storescu does not decompress: to send compressed files as
#                  they are, name their family: lossless, jpeg8, jpeg12,
#                  j2k-lossless, j2k-lossy, jls-lossless, jls-lossy, rle, ...
#   --help         this text
#   STORESCU       (env) the storescu binary         (default: storescu on PATH)
#
# FOLDERs are scanned recursively (files may be given too). Files that are not
# DICOM are skipped with a warning. Prints one line per file sent with the
# SCP's answer, then a summary; exits 0 only if every DICOM file was stored.

set -euo pipefail

PROG=${0##*/}

usage() {
    sed -n '2,/^#   STORESCU/{s/^# \{0,1\}//;p}' "$0"
}

die() {
    echo "$PROG: error: $*" >&2
    exit 2
}

HOST=${HOST:-localhost}
PORT=${PORT:-11112}
CALLED_AE=${CALLED_AE:-DICOMWATCHER}
CALLING_AE=${CALLING_AE:-DICOMSEND}
PROPOSE=${PROPOSE:-uncompr}
STORESCU=${STORESCU:-storescu}

for arg in "$@"; do
    [[ $arg == --help ]] && { usage; exit 0; }
    [[ $arg == -- ]] && break
done

while getopts ":h:p:a:c:x:" opt; do
    case $opt in
        h) HOST=$OPTARG ;;
        p) PORT=$OPTARG ;;
        a) CALLED_AE=$OPTARG ;;
        c) CALLING_AE=$OPTARG ;;
        x) PROPOSE=$OPTARG ;;
        :) die "-$OPTARG needs a value (try --help)" ;;
        *) die "unknown option -$OPTARG (try --help)" ;;
    esac
done
shift $((OPTIND - 1))

(($#)) || die "no FOLDER to send (usage: $PROG [-h HOST] [-p PORT] [-a CALLED_AE] FOLDER...)"
# pynetdicom installs programs named storescp/storescu too: take dcmtk's.
dcmtk_program() {
    local candidate
    while read -r candidate; do
        if [[ $("$candidate" --version 2>&1) == *dcmtk* ]]; then
            echo "$candidate"
            return 0
        fi
    done < <(type -ap "$1")
    return 1
}
wanted_program=$STORESCU
STORESCU=$(dcmtk_program "$wanted_program") \
    || die "dcmtk's storescu not found ('$wanted_program'): install dcmtk (apt-get install dcmtk) or set STORESCU=/path/to/storescu"
if ! [[ $PORT =~ ^[0-9]+$ ]] || ((10#$PORT < 1 || 10#$PORT > 65535)); then
    die "PORT must be a number from 1 to 65535, not '$PORT'"
fi
for ae in "$CALLED_AE" "$CALLING_AE"; do
    [[ -n $ae && ${#ae} -le 16 && $ae != *\\* ]] \
        || die "AE title must be 1 to 16 characters without a backslash, not '$ae'"
done
[[ $PROPOSE =~ ^[a-z0-9-]+$ ]] || die "-x takes a storescu --propose-NAME suffix, e.g. uncompr, lossless, rle"

total=0
for folder in "$@"; do
    [[ -e $folder ]] || die "no such file or folder: $folder"
    count=$(find "$folder" -type f | wc -l)
    echo "$folder: $count file(s)"
    total=$((total + count))
done
((total > 0)) || die "no files under $*"
echo "sending $total file(s) to $CALLED_AE@$HOST:$PORT as $CALLING_AE (--propose-$PROPOSE)"

args=(
    # Log each file sent and each answer (parsed below).
    --verbose
    # Scan the arguments as folders, recursively.
    --scan-directories --recurse
    # Our AE title and the SCP's.
    --aetitle "$CALLING_AE" --call "$CALLED_AE"
    # Which transfer syntaxes to offer for each SOP class.
    "--propose-$PROPOSE"
    # Offer only the SOP classes (and syntaxes) the files need, not the whole
    # default list: files of any storage SOP class can be sent.
    --required
    # Do not stop at the first file that fails (or is not DICOM): try them all,
    # and report each failure.
    --no-halt
)

# dcmtk reads TCP_NODELAY from the environment to turn off Nagle's algorithm;
# without it, each small file waits for a delayed ACK (~10 files/s on loopback).
export TCP_NODELAY=1

# storescu's own exit status does not report failed C-STOREs when --no-halt is
# given, so its --verbose log is read: "Sending file: F" then either
# "Received Store Response (Success|Warning...)" or "Store Failed, file: F".
set +e
"$STORESCU" "${args[@]}" "$HOST" "$PORT" "$@" 2>&1 | awk -v total="$total" '
    function finish(ok, answer) {
        if (file == "") return
        printf "  %-6s %s  (%s)\n", ok ? "ok" : "FAILED", file, answer
        if (ok) stored++; else failed++
        file = ""
    }
    /^I: Sending file: /             { file = $0; sub(/^I: Sending file: /, "", file); conversion = ""; next }
    /^I: Converting transfer syntax: / {
        line = $0; sub(/^I: Converting transfer syntax: /, "", line)
        split(line, ts, / -> /)
        if (ts[1] != ts[2]) conversion = ts[1] " to " ts[2]
        next
    }
    /^I: Received Store Response \(/ {
        answer = $0; sub(/^I: Received Store Response \(/, "", answer); sub(/\)$/, "", answer)
        finish(answer ~ /^(Success|Warning)/, answer); next
    }
    /^E: Store Failed, file: /       { pending_failure = 1; next }
    pending_failure && /^E: /        {
        answer = substr($0, 4); pending_failure = 0
        if (conversion != "")
            answer = answer "; storescu cannot convert " conversion ": propose the file'"'"'s syntax with -x"
        finish(0, answer); next
    }
    /ignoring file/                  { skipped++ }
    /^(W|E|F): /                     { print "  storescu: " $0; next }
    END {
        if (file != "") finish(0, "no answer")
        printf "%d stored, %d failed, %d skipped (not DICOM or unknown SOP class), of %d file(s)\n", \
            stored, failed, skipped, total
        exit (failed > 0 || stored == 0) ? 1 : 0
    }'
status=("${PIPESTATUS[@]}")
set -e
scu=${status[0]} summary=${status[1]}
if ((scu != 0)); then
    echo "$PROG: storescu failed (exit status $scu)" >&2
    exit 1
fi
if ((summary != 0)); then
    echo "$PROG: not every file was stored" >&2
    exit 1
fi
echo "$PROG: all sent files stored"
