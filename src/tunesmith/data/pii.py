"""PII redaction: emails, phone numbers, credit cards (Luhn-checked), IP addresses, API keys and secrets."""

from __future__ import annotations

import ipaddress
import re
from collections import Counter

# Order matters: secrets and cards before phones, so a long digit run is not half-taken as a phone number.
PATTERNS = {
    "api_key": re.compile(
        r"\b(?:sk-(?:proj-|ant-)?[A-Za-z0-9_-]{20,}|AKIA[0-9A-Z]{16}|gh[pousr]_[A-Za-z0-9]{36,}|"
        r"xox[baprs]-[A-Za-z0-9-]{10,}|AIza[0-9A-Za-z_-]{35}|hf_[A-Za-z0-9]{30,})\b"),
    "private_key": re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----[\s\S]*?-----END [A-Z ]*PRIVATE KEY-----"),
    "secret": re.compile(r"(?i)\b(password|passwd|secret|api[_-]?key|access[_-]?token)\b(\s*[:=]\s*)([^\s'\",;]{6,})"),
    "email": re.compile(r"\b[A-Za-z0-9._%+-]+@[A-Za-z0-9.-]+\.[A-Za-z]{2,}\b"),
    "credit_card": re.compile(r"\b\d(?:[ -]?\d){12,18}\b"),
    "ip_address": re.compile(r"\b(?:\d{1,3}\.){3}\d{1,3}\b|\b(?:[0-9a-fA-F]{1,4}:){7}[0-9a-fA-F]{1,4}\b"),
    "phone": re.compile(r"(?<![\w+])(?:\+\d{1,3}[ .-]?)?(?:\(\d{2,4}\)[ .-]?)?\d{2,4}(?:[ .-]\d{2,4}){1,3}(?![\w.-]\d)(?!\w)"),
}
# Quick pre-checks: most text has no digit run, no '@' and no key prefix, and skipping the regexes then is cheap.
HAS_DIGITS = re.compile(r"\d{3}")


def luhn_valid(digits: str) -> bool:
    """The Luhn checksum that every real card number passes."""
    total = 0
    for index, char in enumerate(reversed(digits)):
        value = int(char)
        if index % 2:
            value = value * 2 - 9 if value > 4 else value * 2
        total += value
    return total % 10 == 0


def redact(text: str, counts: Counter) -> str:
    """Text with each PII match replaced by `[KIND]`; `counts` is increased per kind replaced."""
    for kind, pattern in PATTERNS.items():
        if kind in ("credit_card", "ip_address", "phone") and not HAS_DIGITS.search(text):
            continue
        if kind == "email" and "@" not in text:
            continue
        text = pattern.sub(lambda match, kind=kind: _replacement(kind, match, counts), text)
    return text


def _replacement(kind: str, match: re.Match, counts: Counter) -> str:
    found = match.group(0)
    if kind == "credit_card" and not luhn_valid(re.sub(r"\D", "", found)):
        return found
    if kind == "ip_address" and not _is_ip(found):
        return found
    if kind == "phone" and not _looks_like_phone(found):
        return found
    counts[kind] += 1
    if kind == "secret":
        return f"{match.group(1)}{match.group(2)}[SECRET]"
    return f"[{kind.upper()}]"


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def _looks_like_phone(text: str) -> bool:
    """9 to 15 digits, or fewer behind a country or area code; keeps dates and version numbers."""
    digits = len(re.sub(r"\D", "", text))
    return 9 <= digits <= 15 or (7 <= digits <= 15 and text[:1] in "+(")
