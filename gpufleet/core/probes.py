"""The shell that asks a service whether it answers: its health endpoint's HTTP status and a
one-token chat completion, authenticated with the API key the stack's ``.env`` holds.

One copy for the fact that reads every service at once (``facts.health``) and the gate that
waits for one service after it is recreated (``gpufleet.ops.operations``). Pure text: the key
is read on the host and handed to curl on stdin, never on a command line.
"""

from __future__ import annotations

import re
import shlex

CHAT_PATH = "/v1/chat/completions"
# a variable name: it goes into a sed pattern
KEY_VAR = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
# curl reads the header from stdin: the key never reaches a process's argv
BEARER_CURL = 'printf \'header = "Authorization: Bearer %s"\\n\' "$k" | curl -K -'


def _hushed(command: str, quiet: bool) -> str:
    return f"{command} 2>/dev/null" if quiet else command


def health_status_curl(url: str, *, max_seconds: int | None = None, quiet: bool = False) -> str:
    """``curl`` printing only the HTTP status of ``url`` (``000`` when nothing answered)."""
    limit = f" -m {max_seconds}" if max_seconds else ""
    return _hushed(f"curl -s -o /dev/null{limit} -w '%{{http_code}}' {shlex.quote(url)}", quiet)


def read_key(env_path: str, var: str, *, quiet: bool = False) -> str:
    """Shell that sets ``k`` to ``var``'s value in the ``.env`` at ``env_path`` (``VAR='value'``
    lines, as gpufleet writes them). ``var`` must be a variable name (``KEY_VAR``)."""
    pattern = rf"s/^{var}='\(.*\)'\$/\1/p"
    sed = f'sed -n "{pattern}" {shlex.quote(env_path)}'
    return f"k=$({_hushed(sed, quiet)})"


def chat_curl(
    base_url: str,
    body: str,
    *,
    with_key: bool = False,
    max_seconds: int | None = None,
    quiet: bool = False,
) -> str:
    """``curl`` posting ``body`` (``known.chat_body``: one token) to ``base_url``'s chat
    completions, failing on an HTTP error; ``with_key``: with the bearer ``k`` (``read_key``)
    holds."""
    curl = BEARER_CURL if with_key else "curl"
    limit = f" -m {max_seconds}" if max_seconds else ""
    body, url = shlex.quote(body), shlex.quote(base_url + CHAT_PATH)
    return _hushed(
        f"{curl} -s -f{limit} -H 'Content-Type: application/json' -d {body} {url}", quiet
    )
