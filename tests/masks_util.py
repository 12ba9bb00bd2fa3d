"""Checks shared by the mask and inference-id tests: where the responses are, and that the trained
tokens are exactly them."""

from __future__ import annotations

from exemplar.data.schema import IGNORE_INDEX, Conversation


def response_regions(encoder, conv: Conversation, rendered: str) -> list[tuple[int, int]]:
    """Where each assistant response is in the rendered text: its content as rendered (the mask
    finder's content span, exact to the character, see test_masking) through its stop token (the
    content alone for a template without one)."""
    messages = [m.to_template_dict() for m in conv.messages]
    spans = encoder.masker.content_spans(messages, conv.tools, rendered)
    stop_token = encoder.masker.stop_token
    regions = []
    for message, span in zip(conv.messages, spans, strict=True):
        if message.role == "assistant" and span is not None:
            end = span[1] if stop_token is None else rendered.index(stop_token, span[1]) + len(stop_token)
            regions.append((span[0], end))
    return regions


def trained_runs(ids: list[int], labels: list[int]) -> list[tuple[int, int]]:
    """[start, end) of each maximal run of trained tokens."""
    runs, start = [], None
    for i, (token, label) in enumerate([*zip(ids, labels, strict=True), (None, IGNORE_INDEX)]):
        if label != IGNORE_INDEX:
            assert label == token
            start = i if start is None else start
        elif start is not None:
            runs.append((start, i))
            start = None
    return runs


def assert_runs_are_the_responses(tokenizer, ids, labels, rendered, regions):
    """Asserted for every assistant response, in order: its tokens are one trained run, and the run
    decoded on its own is the response text (content as rendered + stop token) preceded by at most
    a straddling first token's share of the text before the response (a suffix of the rendered
    text before it, shorter than that token) or by the one space a SentencePiece-style tokenizer
    puts before a section; the decoder may drop the run's first space (Llama 2's `Strip`)."""
    runs = trained_runs(ids, labels)
    assert len(runs) == len(regions), (runs, regions)
    for (start, end), (a, b) in zip(runs, regions, strict=True):
        text = tokenizer.decode(ids[start:end], skip_special_tokens=False, clean_up_tokenization_spaces=False)
        response = rendered[a:b]
        first = tokenizer.decode(ids[start : start + 1], skip_special_tokens=False)
        allowed = set()
        for n in range(len(first) + 1):
            if n <= a:
                lead = rendered[a - n : a] + response
                allowed |= {lead, " " + lead, lead[1:] if lead.startswith(" ") else lead}
        assert text in allowed, (text, response)
