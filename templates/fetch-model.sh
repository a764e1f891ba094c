#!/bin/sh
# fetch-model: download one model file, resuming an interrupted download, check its size and
# sha256, and only then move it to its final path. gpufleet uploads it; it runs on the host
# (POSIX sh: dash or bash, with curl and coreutils).
#
#   fetch-model URL DEST SHA256 SIZE [TOKEN_ENV_FILE]
#
#   URL             where the bytes are (a Hub resolve URL pinned to a commit)
#   DEST            final path; the download grows in DEST.partial beside it, and DEST.verified
#                   holds "SHA256 SIZE" once DEST matched them (a rerun then does no hashing)
#   SHA256 SIZE     what the file must be: 64 lowercase hex digits, bytes
#   TOKEN_ENV_FILE  a file with a line HF_TOKEN=... (the stack's .env); the token is handed to
#                   curl as a config line on stdin, never on a command line, and never printed
#
# A progress line (percent, bytes, rate, ETA) is printed every FETCH_PROGRESS_SECONDS (default
# 5) while curl runs. FETCH_DISTRUST=1 says DEST was hashed already and does not match (the
# plan knows): its stamp is not trusted and it is not hashed again, it is downloaded.
#
# What fails on the way is tried again, resuming from the bytes already there, up to
# FETCH_ATTEMPTS times in all (default 4): a 408, 429, 500, 502, 503 or 504 answer, a reset or
# closed connection, no connection, a stall (under 1 KiB/s for FETCH_STALL_SECONDS, default
# 120). Between attempts it waits the server's Retry-After (at most 60 s), else 1, 2, 4, ... s
# (FETCH_BACKOFF_SECONDS, default 1, is the first wait). Other answers (401, 403, 404) end it at
# once. The last line names the URL (without any user:password in it) and what it answered.
#
# Exit codes:
#   0  DEST is in place and verified (downloaded now, or already)
#   1  the download failed (network, or an HTTP error such as 401 from a gated repo), or a
#      file could not be written; DEST.partial stays for the next run to resume
#   2  usage error, or TOKEN_ENV_FILE unreadable or holding an impossible token
#   3  not enough free space on DEST's filesystem for the bytes still needed (before the
#      download, or when the filesystem filled during it; DEST.partial stays to resume)
#   4  the download ended at a size other than SIZE; DEST.partial stays
#   5  sha256 mismatch; DEST.partial is removed (it is corrupt)
set +x
set -u
umask 022

say() { printf 'fetch: %s\n' "$*"; }
die() {
    code=$1
    shift
    printf 'fetch: %s\n' "$*" >&2
    exit "$code"
}

[ $# -eq 4 ] || [ $# -eq 5 ] || die 2 "usage: fetch-model URL DEST SHA256 SIZE [TOKEN_ENV_FILE]"
url=$1 dest=$2 sha=$3 size=$4 envfile=${5:-}
[ "$(expr "x$sha" : 'x[0-9a-f]*$')" = 65 ] || die 2 "SHA256 must be 64 lowercase hex digits: $sha"
# no leading zero (shell arithmetic reads it as octal); 17 digits at most keeps every product
# below within 64-bit shell arithmetic
case $size in '' | 0* | *[!0-9]*) die 2 "SIZE must be a byte count: $size" ;; esac
[ "$(expr "x$size" : 'x.*')" -le 18 ] || die 2 "SIZE must be a byte count: $size"
case $dest in '' | */ | */. | */..) die 2 "DEST must be a file path: $dest" ;; esac

dir=$(dirname -- "$dest")
name=$(basename -- "$dest")
partial=$dest.partial
stamp=$dest.verified

size_of() { if [ -f "$1" ]; then stat -c %s -- "$1"; else echo 0; fi; }
sha256_of() {
    h=$(sha256sum <"$1") || return 1
    echo "${h%% *}"
}
human() {
    if [ "$1" -ge 1073741824 ]; then set -- "$1" 1073741824 GiB
    elif [ "$1" -ge 1048576 ]; then set -- "$1" 1048576 MiB
    else set -- "$1" 1024 KiB; fi
    t=$(($1 * 10 / $2))
    echo "$((t / 10)).$((t % 10)) $3"
}
write_stamp() {
    # never older than DEST: a DEST dated ahead (the clock stepped back since) would otherwise
    # look changed since it was verified, and be hashed again on every run
    if ! { printf '%s %s\n' "$sha" "$size" >"$stamp.tmp" &&
        { [ -z "$(find "$dest" -newer "$stamp.tmp")" ] || touch -r "$dest" -- "$stamp.tmp"; } &&
        mv -f -- "$stamp.tmp" "$stamp"; }; then
        die 1 "cannot write $stamp"
    fi
}
distrust=${FETCH_DISTRUST:-}

# A stamp for this sha and size, not older than DEST, means DEST was hashed after its last
# change. (find -newer because test -ot is not POSIX.)
if [ -z "$distrust" ] && [ -f "$dest" ] && [ -f "$stamp" ] && [ "$(size_of "$dest")" = "$size" ] &&
    [ -z "$(find "$dest" -newer "$stamp")" ] && [ "$(cat -- "$stamp")" = "$sha $size" ]; then
    say "$dest already verified"
    exit 0
fi

token=
if [ -n "$envfile" ]; then
    if [ ! -f "$envfile" ] || [ ! -r "$envfile" ]; then die 2 "cannot read $envfile"; fi
    while IFS= read -r line || [ -n "$line" ]; do
        case $line in HF_TOKEN=*) token=${line#HF_TOKEN=} ;; esac
    done <"$envfile"
    case $token in
    \"*\") token=${token#\"} token=${token%\"} ;;
    \'*\') token=${token#\'} token=${token%\'} ;;
    esac
    # it goes inside a quoted curl config line: anything else could end the quotes
    case $token in *[!A-Za-z0-9._~+/=-]*) die 2 "HF_TOKEN in $envfile is not a token" ;; esac
    [ -n "$token" ] || say "no HF_TOKEN in $envfile; fetching without one" >&2
fi
curl_config() {
    [ -z "$token" ] || printf 'header = "Authorization: Bearer %s"\n' "$token"
}

mkdir -p -- "$dir" || die 1 "cannot create $dir"
rm -f -- "$stamp"

# A whole file already there (stamp lost, or placed by hand) is checked rather than fetched.
if [ -z "$distrust" ] && [ -f "$dest" ] && [ "$(size_of "$dest")" = "$size" ]; then
    say "$name: checking the file already at $dest"
    if [ "$(sha256_of "$dest")" = "$sha" ]; then
        write_stamp
        say "$dest verified"
        exit 0
    fi
fi

have=$(size_of "$partial")
if [ "$have" -gt "$size" ]; then
    rm -f -- "$partial"
    have=0
fi

need=$((size - have))
avail_kib=$(df -Pk -- "$dir" | {
    read -r _
    read -r _ _ _ a _
    echo "${a:-0}"
})
if [ "$need" -gt $((avail_kib * 1024)) ]; then
    die 3 "need $(((need + 1048575) / 1048576)) MiB free in $dir, have $((avail_kib / 1024)) MiB"
fi

posint() { # $1: value, $2: default; a positive integer of at most 5 digits, else the default
    case $1 in '' | 0* | *[!0-9]* | ??????*) echo "$2" ;; *) echo "$1" ;; esac
}
every=$(posint "${FETCH_PROGRESS_SECONDS:-}" 5)
attempts=$(posint "${FETCH_ATTEMPTS:-}" 4)
stall=$(posint "${FETCH_STALL_SECONDS:-}" 120)
backoff=$(posint "${FETCH_BACKOFF_SECONDS:-}" 1)
# the URL as a line may show it: without user:password@
shown=$(printf '%s\n' "$url" | sed 's#^\([A-Za-z][A-Za-z0-9+.-]*://\)[^/@]*@#\1#')
hdr=$(mktemp) || die 1 "cannot make a temporary file"
cpid='' tpid=''
stop() {
    [ -z "$cpid" ] || kill "$cpid" 2>/dev/null
    [ -z "$tpid" ] || kill "$tpid" 2>/dev/null
}
trap 'rm -f -- "$hdr"' EXIT
trap 'stop; exit 129' HUP
trap 'stop; exit 130' INT
trap 'stop; exit 143' TERM

ticker() {
    s= prev=$(size_of "$partial")
    trap '[ -z "$s" ] || kill "$s" 2>/dev/null; exit 0' TERM
    while :; do
        sleep "$every" >/dev/null 2>&1 &
        s=$!
        wait "$s"
        now=$(size_of "$partial")
        rate=$(((now - prev) / every)) prev=$now
        if [ "$rate" -gt 0 ]; then eta="ETA $(((size - now + rate - 1) / rate))s"; else eta=stalled; fi
        say "$name $((now * 100 / size))% ($(human "$now") of $(human "$size"), $(human "$rate")/s, $eta)"
    done
}

download() { # $1: resume or fresh
    if [ "$1" = resume ]; then set -- -C -; else set --; fi
    : >"$hdr"
    # -s without -S: what went wrong is said once, below, in words (see explain)
    curl_config | curl -K - -fsL --connect-timeout 30 --speed-limit 1024 \
        --speed-time "$stall" -D "$hdr" "$@" -o "$partial" "$url" &
    cpid=$!
    ticker &
    tpid=$!
    wait "$cpid"
    rc=$?
    kill "$tpid" 2>/dev/null
    wait "$tpid" 2>/dev/null
    cpid='' tpid=''
    return "$rc"
}

# the last response's status and Retry-After (seconds), from the headers curl wrote
status_of() { sed -n 's/^HTTP\/[0-9.]* \([0-9][0-9][0-9]\).*/\1/p' "$hdr" | tail -n 1; }
retry_after() {
    sed -n 's/^[Rr][Ee][Tt][Rr][Yy]-[Aa][Ff][Tt][Ee][Rr]:[ 	]*\([0-9][0-9]*\).*/\1/p' "$hdr" |
        tail -n 1
}

free_bytes() {
    df -Pk -- "$dir" | {
        read -r _
        read -r _ _ _ a _
        echo "$((${a:-0} * 1024))"
    }
}

# why: what went wrong with the last attempt, in words; retry: whether trying again may mend it
explain() { # $1: curl's exit status
    retry=yes code=$(status_of)
    case $1 in
    22)
        why="HTTP $code from $shown"
        case $code in 408 | 429 | 500 | 502 | 503 | 504) ;; *) retry=no ;; esac
        ;;
    28)
        if [ -n "$code" ]; then
            why="stalled: under 1 KiB/s for ${stall}s from $shown"
        else why="no answer within 30s from $shown"; fi
        ;;
    18) why="the connection closed early (HTTP $code) from $shown" ;;
    52) why="an empty reply from $shown" ;;
    55 | 56 | 92) why="the connection was reset (curl exit $1) by $shown" ;;
    6 | 7) why="cannot connect to $shown (curl exit $1)" ;;
    23)
        retry=no
        got=$(size_of "$partial")
        free=$(free_bytes)
        if [ "$((size - got))" -gt "$free" ]; then
            die 3 "$name: no space left in $dir: $(human "$((size - got))") more needed," \
                "$(human "$free") free; kept $(human "$got") in $partial to resume"
        fi
        why="cannot write $partial"
        ;;
    *)
        retry=no
        why="curl exit $1 from $shown"
        ;;
    esac
}

start=$(date +%s)
attempt=1 wait_next=$backoff
while [ "$(size_of "$partial")" -lt "$size" ]; do
    have=$(size_of "$partial")
    if [ "$have" -gt 0 ]; then
        say "$name: resuming at $(human "$have") of $(human "$size")"
        download resume
        rc=$?
        if [ "$rc" -eq 33 ]; then # the server answered 200 to a range: it cannot resume
            say "$name: the server cannot resume; starting over"
            rm -f -- "$partial"
            download fresh
            rc=$?
        fi
    else
        say "$name: downloading $(human "$size")"
        download fresh
        rc=$?
    fi
    [ "$rc" -ne 0 ] || break
    explain "$rc"
    if [ "$retry" = no ]; then
        die 1 "$name: download failed: $why; run again to resume"
    fi
    if [ "$attempt" -ge "$attempts" ]; then
        die 1 "$name: download failed after $attempts attempts: $why; run again to resume"
    fi
    pause=$wait_next
    after=$(retry_after)
    if [ -n "$after" ]; then pause=$after; fi
    [ "$pause" -le 60 ] || pause=60
    say "$name: $why; trying again in ${pause}s ($((attempt + 1)) of $attempts)"
    sleep "$pause"
    attempt=$((attempt + 1)) wait_next=$((wait_next * 2))
done

got=$(size_of "$partial")
[ "$got" = "$size" ] || die 4 "$name: downloaded $got bytes, expected $size; kept $partial"
say "$name: checking sha256"
got=$(sha256_of "$partial") || die 1 "cannot read $partial"
if [ "$got" != "$sha" ]; then
    rm -f -- "$partial"
    die 5 "$name: sha256 is $got, expected $sha (from $shown); removed the corrupt download"
fi
chmod 0644 -- "$partial" || die 1 "cannot chmod $partial"
mv -f -- "$partial" "$dest" || die 1 "cannot move $partial to $dest"
write_stamp
say "$name done in $(($(date +%s) - start))s"
