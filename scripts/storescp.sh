#!/usr/bin/env bash
# Run dcmtk's storescp (the DICOM Storage SCP) so that it writes every
# received instance into dicom-watcher's inbox.
#
#   scripts/storescp.sh [-p PORT] [-a AE_TITLE] [-o INBOX] [--per-study] [-- STORESCP_ARGS...]
#
# Settings come from the environment, and the options above override them:
#
#   PORT                  TCP port to listen on                      (default 11112)
#   AE_TITLE              our AE title, as the scanners call it      (default DICOMWATCHER)
#   INBOX                 folder storescp writes into (= `inbox:` in
#                         dicom-watcher's config); created if absent  (default ./inbox)
#   STORESCP              the storescp binary                         (default: storescp on PATH)
#   STORESCP_PER_STUDY    1: one sub-folder per study in the inbox   (default 0: flat inbox)
#   STORESCP_PROMISCUOUS  1: also accept unknown/private SOP classes (default 1)
#   STORESCP_LOG_LEVEL    fatal|error|warn|info|debug|trace          (default warn;
#                         info logs every association and every file)
#   STORESCP_ARGS         more storescp options, split on spaces (e.g. "-ts 120")
#
# The script ends by `exec`ing storescp: the process that systemd (or a test)
# starts *is* storescp, so SIGTERM reaches it directly and its exit status is
# the service's. storescp logs to stderr/stdout (journald under systemd).
#
# Why storescp's own end-of-study machinery is NOT used
# -----------------------------------------------------
# storescp can detect "end of study" itself (--eostudy-timeout,
# --exec-on-eostudy, --rename-on-eostudy, --sort-conc-studies), but only in
# a single process. Its manual page (dcmtk 3.6.7, NOTES) says:
#
#   "Please note that two consecutive network connections can transfer
#    objects for the same study. The study will only be considered complete
#    when an object of a different study is received or the --eostudy-timeout
#    is reached. For this reason, the options --fork and --inet are
#    incompatible with --exec-on-eostudy, --rename-on-eostudy and
#    --sort-conc-studies."
#
# and storescp 3.6.7 refuses them outright:
#   "error: --exec-on-eostudy not allowed with --fork"
#   "error: --rename-on-eostudy not allowed with --fork"
# (--sort-conc-studies is still accepted with --fork, but each forked child
# then starts its own timestamped folder, so one study gets split.)
# We need --fork so that several scanners can send at once, and
# dicom-watcher does the end-of-study job better anyway: a study is complete
# when no instance of it has arrived for `quiet_seconds`, whichever
# association or process delivered it, with studies interleaving freely.

set -euo pipefail

PROG=${0##*/}

usage() {
    sed -n '2,/^#   STORESCP_ARGS/{s/^# \{0,1\}//;p}' "$0"
}

die() {
    echo "$PROG: error: $*" >&2
    exit 2
}

PORT=${PORT:-11112}
AE_TITLE=${AE_TITLE:-DICOMWATCHER}
INBOX=${INBOX:-./inbox}
STORESCP=${STORESCP:-storescp}
STORESCP_PER_STUDY=${STORESCP_PER_STUDY:-0}
STORESCP_PROMISCUOUS=${STORESCP_PROMISCUOUS:-1}
STORESCP_LOG_LEVEL=${STORESCP_LOG_LEVEL:-warn}
STORESCP_ARGS=${STORESCP_ARGS:-}

extra=()
while (($#)); do
    case $1 in
        -p|--port)      (($# >= 2)) || die "$1 needs a value"; PORT=$2; shift 2 ;;
        -a|--aetitle)   (($# >= 2)) || die "$1 needs a value"; AE_TITLE=$2; shift 2 ;;
        -o|--inbox)     (($# >= 2)) || die "$1 needs a value"; INBOX=$2; shift 2 ;;
        --per-study)    STORESCP_PER_STUDY=1; shift ;;
        -h|--help)      usage; exit 0 ;;
        --)             shift; extra=("$@"); break ;;
        *)              die "unknown argument '$1' (try --help; storescp options go after --)" ;;
    esac
done

# -- checks, each with a one-line error -------------------------------------

if ! [[ $PORT =~ ^[0-9]+$ ]] || ((10#$PORT < 1 || 10#$PORT > 65535)); then
    die "PORT must be a number from 1 to 65535, not '$PORT'"
fi
PORT=$((10#$PORT))
[[ -n $AE_TITLE && ${#AE_TITLE} -le 16 && $AE_TITLE != *\\* ]] \
    || die "AE title must be 1 to 16 characters without a backslash, not '$AE_TITLE'"
case $STORESCP_LOG_LEVEL in
    fatal|error|warn|info|debug|trace) ;;
    *) die "STORESCP_LOG_LEVEL must be one of fatal error warn info debug trace, not '$STORESCP_LOG_LEVEL'" ;;
esac

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
wanted_program=$STORESCP
STORESCP=$(dcmtk_program "$wanted_program") \
    || die "dcmtk's storescp not found ('$wanted_program'): install dcmtk (apt-get install dcmtk) or set STORESCP=/path/to/storescp"

mkdir -p -- "$INBOX" 2>/dev/null || die "cannot create the inbox folder $INBOX"
[[ -d $INBOX && -w $INBOX ]] || die "the inbox $INBOX is not a writable folder"

# -- the command line --------------------------------------------------------

args=(
    # Fork one child process per association: several scanners (or several
    # parallel sends from one scanner) are received at the same time.
    --fork
    # Our AE title: the "called AE" the scanners are configured with.
    --aetitle "$AE_TITLE"
    # Write received objects into the inbox dicom-watcher watches (it must
    # exist; checked above).
    --output-directory "$INBOX"
    # Accept every transfer syntax dcmtk knows (JPEG, JPEG 2000, JPEG-LS, RLE,
    # deflated, video...) and store each file as received: the default
    # --write-xfer-same keeps the sender's encoding, nothing is transcoded.
    --accept-all
    # Unique file names (<modality>.X.<generated UID>) instead of the default
    # <modality>.<SOPInstanceUID>: with the default, an instance sent twice
    # is rewritten in place ("DICOM file already exists, overwriting"), so a
    # corrected re-send would destroy the first version before dicom-watcher
    # has placed it, or change under it while it is being copied. dicom-watcher
    # reads the headers, never the names, and skips exact duplicates itself.
    --unique-filenames
    # Do not resolve the caller's address to a name for each association
    # (a slow or broken DNS would otherwise delay every association).
    --disable-host-lookup
    # Largest receive PDU dcmtk allows: fewer, bigger network packets.
    --max-pdu 131072
    # Log level (warn = storescp's default: problems only). Goes to stderr.
    --log-level "$STORESCP_LOG_LEVEL"
)
# Scanners often send private SOP classes with a study (e.g. Siemens CSA
# non-image objects). Promiscuous mode accepts them instead of refusing the
# presentation context; dicom-watcher routes them like any other instance.
if [[ $STORESCP_PROMISCUOUS == 1 ]]; then
    args+=(--promiscuous)
fi
# One sub-folder per study, named study_<StudyInstanceUID>. Safe with --fork
# (the name depends on the study only, not on the process or the time).
# dicom-watcher handles a flat inbox and one with study folders alike; the
# default is flat. (Emptied study folders stay behind in the inbox; a daily
# `find "$INBOX" -mindepth 1 -type d -empty -mmin +1440 -delete` tidies them.)
if [[ $STORESCP_PER_STUDY == 1 ]]; then
    args+=(--sort-on-study-uid study)
fi
if [[ -n $STORESCP_ARGS ]]; then
    read -r -a more <<<"$STORESCP_ARGS"
    args+=("${more[@]}")
fi
args+=(${extra[@]+"${extra[@]}"})

# dcmtk reads TCP_NODELAY from the environment to turn off Nagle's algorithm
# (setsockopt TCP_NODELAY). Without it every small C-STORE waits for the
# delayed ACK and transfers crawl at about ten small files per second.
export TCP_NODELAY=1

# exec: storescp replaces this shell (same PID), so signals reach it directly.
exec "$STORESCP" "${args[@]}" "$PORT"
