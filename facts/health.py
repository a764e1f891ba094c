"""Each service's health endpoint, asked from the host itself, all at once."""

from __future__ import annotations

import re

from pyinfra.api import FactBase, FactProcessError, QuoteString, StringCommand

from facts._sections import Section, excerpt, get_section, mark, split_sections
from gpufleet.core import known
from gpufleet.core.probes import chat_curl, health_status_curl, read_key
from gpufleet.core.snapshot import Probe

SECTION = "health.probes"
TIMEOUT_SECONDS = 2


# curl's exit status when nothing answered: the server hung (28) or was not listening (7, 52, 56)
CURL_ERRORS = {7: "refused", 28: "timeout", 52: "empty reply", 56: "reset"}


_NUMBER = re.compile(r"[0-9]+")  # str.isdigit() also takes "²", which int() refuses

CHAT_SECONDS = 60


def script(probes: dict[str, tuple]) -> StringCommand:
    """Per service, in parallel: ``<service>\\t<port>\\t<path>\\t<HTTP status or 000>\\t<curl
    exit>\\t<chat: ok, fail or ->``.

    + probes: service -> (address, port, path[, chat[, key[, model]]]); a frozen or hung server
      answers nothing and costs at most ``TIMEOUT_SECONDS``; with ``chat``, a healthy service is
      also asked for one token of an OpenAI chat completion (a rollout's gate), naming
      ``model`` when given; ``key`` is ``(.env path, variable)`` of its API key, read on the
      host and handed to curl on stdin (never on a command line)
    """
    parts: list[str | QuoteString] = [f"{mark(SECTION)}; if command -v curl >/dev/null; then"]
    for name, (address, port, path, *rest) in sorted(probes.items()):
        url = f"http://{address}:{port}{path}"
        status = health_status_curl(url, max_seconds=TIMEOUT_SECONDS, quiet=True)
        parts.append(f"(c=$({status}); e=$?; t=-;")
        if rest and rest[0]:
            key = rest[1] if len(rest) > 1 else None
            model = rest[2] if len(rest) > 2 else None
            if key:  # the .env holds VAR='value'; printf is the shell's own: no process argv
                parts.append(read_key(*key, quiet=True) + ";")
            body = known.chat_body(model)
            chat = chat_curl(
                f"http://{address}:{port}",
                body,
                with_key=bool(key),
                max_seconds=CHAT_SECONDS,
                quiet=True,
            )
            parts += [
                f'if [ "$c" = 200 ]; then t=fail; {chat}',
                "| grep -q '\"choices\"' && t=ok; fi;",
            ]
        parts += [
            "printf '%s\\t%s\\t%s\\t%s\\t%s\\t%s\\n'",
            QuoteString(name),
            str(int(port)),
            QuoteString(path),
            '"$c" "$e" "$t") &',
        ]
    parts.append("wait; fi")
    return StringCommand(*parts)


def parse_lines(lines: list[str]) -> dict[str, Probe]:
    result = {}
    for line in lines:
        parts = line.split("\t")
        if len(parts) == 5:  # no chat column (asked of a host by an older gpufleet)
            parts.append("-")
        if len(parts) != 6 or not _NUMBER.fullmatch(parts[1]) or not _NUMBER.fullmatch(parts[4]):
            raise FactProcessError(f"unexpected health line: {excerpt(line)}")
        name, port, path, code, exit_status, chat = parts
        code = code.strip()[-3:]
        status = int(code) if _NUMBER.fullmatch(code) and code != "000" else None
        error = None if status else CURL_ERRORS.get(int(exit_status), f"curl exit {exit_status}")
        answered = {"ok": True, "fail": False}.get(chat)
        result[name] = Probe(port=int(port), path=path, status=status, error=error, chat=answered)
    return result


def from_sections(sections: dict[str, Section]) -> dict[str, Probe]:
    return parse_lines(get_section(sections, SECTION).lines)


class ServiceHealth(FactBase[dict[str, Probe]]):
    """The HTTP status of each service's health endpoint, as the host itself sees it.

    + probes: service -> (address, port, path), e.g. ``{"llama": ("127.0.0.1", 8000, "/health")}``

    .. code:: python

        {"llama": Probe(port=8000, path="/health", status=200),
         "vllm": Probe(port=8001, path="/health", status=None)}   # nothing answered

    No curl on the host gives no probes (the plan then treats the services as unchecked).
    """

    @staticmethod
    def default() -> dict:
        return {}

    def command(self, probes: dict[str, tuple[str, int, str]]) -> StringCommand:
        return script(probes)

    def process(self, output: list[str]) -> dict[str, Probe]:
        return from_sections(split_sections(output))
