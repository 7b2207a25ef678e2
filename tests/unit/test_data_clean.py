"""Text clean-up, PII redaction (with Luhn), and MinHash near-duplicate linking."""

from __future__ import annotations

from collections import Counter

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from tunesmith.data.clean import clean_text
from tunesmith.data.dedup import NearDuplicateIndex, connected_rows
from tunesmith.data.pii import luhn_valid, redact


def test_clean_text_normalizes_unicode_line_endings_controls_and_edges():
    assert clean_text("  cafe\u0301\r\nline\x00two \t\r\n\n\n\nend\u200b  ") == "caf\u00e9\nlinetwo\n\nend"
    assert clean_text("keeps\ttabs and  inner  spaces") == "keeps\ttabs and  inner  spaces"


@settings(max_examples=300, deadline=None)
@given(st.text())
def test_clean_text_is_idempotent(text):
    assert clean_text(clean_text(text)) == clean_text(text)


def test_redaction_counts_each_kind_and_keeps_other_text():
    counts = Counter()
    text = ("Mail ann@example.com, call (415) 555-0132, card 4111 1111 1111 1111, server 192.168.0.12, "
            "key sk-abcdefghijklmnopqrstuvwxyz123456, password: hunter2secret, order 1234567890123 shipped.")
    out = redact(text, counts)
    assert counts == {"email": 1, "phone": 1, "credit_card": 1, "ip_address": 1, "api_key": 1, "secret": 1}
    for secret in ("ann@example.com", "555-0132", "4111", "192.168", "sk-abc", "hunter2"):
        assert secret not in out
    assert "password: [SECRET]" in out and "order 1234567890123 shipped" in out  # not Luhn-valid: not a card


def test_luhn_and_ip_checks_reject_lookalikes():
    assert luhn_valid("4111111111111111") and not luhn_valid("4111111111111112")
    counts = Counter()
    assert redact("version 999.1.2.3 and 10.0.0.256", counts) == "version 999.1.2.3 and 10.0.0.256" and not counts


def test_near_duplicate_index_links_similar_rows_only():
    index = NearDuplicateIndex(threshold=0.8, num_perm=64)
    words = [f"w{i}" for i in range(60)]
    base = " ".join(words)
    near = " ".join(words[:30] + ["changed"] + words[31:])
    other = " ".join(reversed(words))
    for text in [base, other, near, "a b c d", "a b c e"]:
        index.add(index.maker.signature(text))
    assert index.links().tolist() == [[2, 0]]  # "a b c d" ~ "a b c e" share 1 of 3 shingles: not near
    clusters = connected_rows(5, index.links())
    assert clusters[0] == clusters[2] != clusters[1]
    assert np.array_equal(index.maker.signature(base), index.maker.signature(base))
