#!/bin/sh
# fetch-model: download one model file into the Hugging Face Hub cache, resuming an interrupted
# download, check its size and hash, and only then move it into place as a blob, stamp it and
# link it from its snapshot. gpufleet uploads it; it runs on the host (POSIX sh: dash or bash,
# with curl, coreutils, and flock from util-linux when FETCH_LOCK is set).
#
#   fetch-model URL BLOB ETAG SIZE [TOKEN_ENV_FILE]
#
#   URL             where the bytes are (a Hub resolve URL pinned to a commit)
#   BLOB            the blob path, <hub>/models--Org--Repo/blobs/<ETAG>; the download grows in
#                   BLOB.incomplete, the name huggingface_hub up to 1.17 resumes too
#   ETAG SIZE       what the file must be, and how it is hashed: 64 lowercase hex digits are the
#                   sha256 of its bytes (a Git LFS file), 40 its git blob sha1 (the sha1 of
#                   "blob <size>\0" and its bytes); SIZE in bytes
#   TOKEN_ENV_FILE  a file with a line HF_TOKEN=... (the stack's .env); the token is handed to
#                   curl as a config line on stdin, never on a command line, and never printed
#
# From the environment:
#   FETCH_STAMP     required: gpufleet's stamp for the blob, outside the cache; it holds
#                   "ETAG SIZE", written once BLOB matched them and dated not older than BLOB.
#                   Such a stamp means BLOB is verified: a rerun does no hashing.
#   FETCH_LOCK      the blob's lock, <hub>/.locks/models--Org--Repo/<ETAG>.lock: taken with
#                   flock(2) (what huggingface_hub's filelock takes) before BLOB or
#                   BLOB.incomplete is looked at, and held until the script ends. It waits at
#                   most FETCH_LOCK_SECONDS (default 3600) for another writer, then exits 6.
#   FETCH_LINK      the snapshot path, <hub>/models--Org--Repo/snapshots/<commit>/<path>: made,
#                   once BLOB is verified, a relative symlink to BLOB, as huggingface_hub makes it
#
# A whole BLOB already there without a stamp (placed by `hf download`) is hashed and stamped
# rather than fetched. A progress line (percent, bytes, rate, ETA) is printed every
# FETCH_PROGRESS_SECONDS (default 5) while curl runs. FETCH_DISTRUST=1 says BLOB was hashed
# already and does not match (the plan knows): its stamp is not trusted and it is not hashed
# again, it is downloaded.
#
# What fails on the way is tried again, resuming from the bytes already there, up to
# FETCH_ATTEMPTS times in all (default 4): a 408, 429, 500, 502, 503 or 504 answer, a reset or
# closed connection, no connection, a stall (under 1 KiB/s for FETCH_STALL_SECONDS, default
# 120). Between attempts it waits the server's Retry-After (at most 60 s), else 1, 2, 4, ... s
# (FETCH_BACKOFF_SECONDS, default 1, is the first wait). Other answers (401, 403, 404) end it at
# once. The last line names the URL (without any user:password in it) and what it answered.
#
# Exit codes:
#   0  BLOB is in place, verified and stamped (downloaded now, or already), and linked
#   1  the download failed (network, or an HTTP error such as 401 from a gated repo), or a
#      file could not be written; BLOB.incomplete stays for the next run to resume
#   2  usage error, TOKEN_ENV_FILE unreadable or holding an impossible token, or FETCH_LOCK set
#      without flock installed
#   3  not enough free space on BLOB's filesystem for the bytes still needed (before the
#      download, or when the filesystem filled during it; BLOB.incomplete stays to resume)
#   4  the download ended at a size other than SIZE; BLOB.incomplete stays
#   5  hash mismatch; BLOB.incomplete is removed (it is corrupt)
#   6  another download held FETCH_LOCK for FETCH_LOCK_SECONDS; nothing was touched
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

[ $# -eq 4 ] || [ $# -eq 5 ] || die 2 "usage: fetch-model URL BLOB ETAG SIZE [TOKEN_ENV_FILE]"
url=$1 blob=$2 etag=$3 size=$4 envfile=${5:-}
case $(expr "x$etag" : 'x[0-9a-f]*$') in
65) kind=sha256 ;;
41) kind=sha1 ;;
*) die 2 "ETAG must be a sha256 (64 lowercase hex digits) or a git blob sha1 (40): $etag" ;;
esac
# no leading zero (shell arithmetic reads it as octal); 17 digits at most keeps every product
# below within 64-bit shell arithmetic
case $size in '' | 0* | *[!0-9]*) die 2 "SIZE must be a byte count: $size" ;; esac
[ "$(expr "x$size" : 'x.*')" -le 18 ] || die 2 "SIZE must be a byte count: $size"
is_file_path() { case $1 in '' | */ | */. | */.. | . | ..) return 1 ;; esac; }
is_file_path "$blob" || die 2 "BLOB must be a file path: $blob"
stamp=${FETCH_STAMP:-}
is_file_path "$stamp" || die 2 "FETCH_STAMP must be the stamp's file path: '$stamp'"
lock=${FETCH_LOCK:-} link=${FETCH_LINK:-}
[ -z "$lock" ] || is_file_path "$lock" || die 2 "FETCH_LOCK must be a file path: $lock"
[ -z "$link" ] || is_file_path "$link" || die 2 "FETCH_LINK must be a file path: $link"

dir=$(dirname -- "$blob")
# the blob's name is its etag: say the file's own name when the snapshot path gives it
if [ -n "$link" ]; then name=$(basename -- "$link"); else name=$(basename -- "$blob"); fi
partial=$blob.incomplete

posint() { # $1: value, $2: default; a positive integer of at most 5 digits, else the default
    case $1 in '' | 0* | *[!0-9]* | ??????*) echo "$2" ;; *) echo "$1" ;; esac
}
# BLOB may be a symlink: huggingface_hub's shared blob store (Xet files, on by default since 2.x)
# links blobs/<etag> to <hub>/blobs/<xx>/<xet hash>; its size and date are the file's (stat -L,
# find -H), and it is read through the link. Only a download replaces it, with a plain file.
size_of() { if [ -f "$1" ]; then stat -L -c %s -- "$1"; else echo 0; fi; }
hash_of() { # $1: a file; prints its ETAG-kind hash, fails if it cannot be read
    if [ "$kind" = sha256 ]; then
        h=$(sha256sum <"$1") || return 1
    else
        # git's blob id; the pipeline's status is sha1sum's, so cat's failure comes back on fd 3
        h=$({ { printf 'blob %s\0' "$(size_of "$1")" && cat -- "$1" || echo failed >&3; } |
            sha1sum; } 3>&1) || return 1
        case $h in *failed*) return 1 ;; esac
    fi
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
    # never older than BLOB: a BLOB dated ahead (the clock stepped back since) would otherwise
    # look changed since it was verified, and be hashed again on every run
    if ! { mkdir -p -- "$(dirname -- "$stamp")" &&
        printf '%s %s\n' "$etag" "$size" >"$stamp.tmp" &&
        { [ -z "$(find -H "$blob" -newer "$stamp.tmp")" ] || touch -r "$blob" -- "$stamp.tmp"; } &&
        mv -f -- "$stamp.tmp" "$stamp"; }; then
        die 1 "cannot write $stamp"
    fi
}
# The snapshot's symlink, relative (as huggingface_hub makes it, so the cache can move), made
# beside the old one and renamed over it: mv -T is one rename(2), where ln -sfn unlinks first
# and a reader in between finds no file.
place_link() {
    [ -n "$link" ] || return 0
    target=$(realpath -s -m --relative-to="$(dirname -- "$link")" -- "$blob") ||
        die 1 "cannot make a path from $link to $blob"
    [ "$(readlink -- "$link")" != "$target" ] || return 0
    if ! { mkdir -p -- "$(dirname -- "$link")" && ln -sfn -- "$target" "$link.fetch-tmp" &&
        mv -fT -- "$link.fetch-tmp" "$link"; }; then
        rm -f -- "$link.fetch-tmp"
        die 1 "cannot link $link to $blob"
    fi
    say "$name: linked $link -> $target"
}
# BLOB is verified: a partial left beside it (by an interrupted run of either tool) is waste
settle() {
    rm -f -- "$partial"
    place_link
}
distrust=${FETCH_DISTRUST:-}

# The lock comes before any look at BLOB or BLOB.incomplete, and before the signal traps below,
# so a TERM while it waits ends the script at once. The file stays (filelock leaves it too, so
# every waiter locks the same inode); group-writable as huggingface_hub makes it, and opened
# read-only, so another user sharing the cache can wait on it as well.
if [ -n "$lock" ]; then
    command -v flock >/dev/null 2>&1 || die 2 "FETCH_LOCK needs flock (util-linux)"
    if ! { mkdir -p -- "$(dirname -- "$lock")" &&
        { [ -e "$lock" ] || (umask 002 && : >>"$lock"); } && [ -r "$lock" ]; }; then
        die 1 "cannot open $lock"
    fi
    exec 9<"$lock"
    if ! flock -n 9; then
        wait_lock=$(posint "${FETCH_LOCK_SECONDS:-}" 3600)
        say "$name: waiting up to ${wait_lock}s for $lock: another download holds it"
        flock -w "$wait_lock" 9 ||
            die 6 "$name: another download holds $lock; gave up after ${wait_lock}s"
    fi
fi

# A stamp for this etag and size, not older than BLOB, means BLOB was hashed after its last
# change. (find -newer because test -ot is not POSIX.)
if [ -z "$distrust" ] && [ -f "$blob" ] && [ -f "$stamp" ] && [ "$(size_of "$blob")" = "$size" ] &&
    [ -z "$(find -H "$blob" -newer "$stamp")" ] && [ "$(cat -- "$stamp")" = "$etag $size" ]; then
    say "$blob already verified"
    settle
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

# A whole blob already there without a stamp (placed by `hf download`, or the stamp lost) is
# checked rather than fetched.
if [ -z "$distrust" ] && [ -f "$blob" ] && [ "$(size_of "$blob")" = "$size" ]; then
    say "$name: checking the file already at $blob"
    if [ "$(hash_of "$blob")" = "$etag" ]; then
        write_stamp
        say "$blob verified"
        settle
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
say "$name: checking $kind"
got=$(hash_of "$partial") || die 1 "cannot read $partial"
if [ "$got" != "$etag" ]; then
    rm -f -- "$partial"
    die 5 "$name: $kind is $got, expected $etag (from $shown); removed the corrupt download"
fi
chmod 0644 -- "$partial" || die 1 "cannot chmod $partial"
mv -f -- "$partial" "$blob" || die 1 "cannot move $partial to $blob"
write_stamp
place_link
say "$name done in $(($(date +%s) - start))s"
