"""Texts from outside: what the service and the pyfunc model accept as texts, and one line for everything else.

A text model tokenizes whatever string it gets (cut at its `max_length` tokens), so what is refused
is what cannot be a text: a body that is not UTF-8, a value that is not a string, a text that is
empty or whitespace only (nothing to classify: the model would answer from [CLS] and [SEP] alone),
and a text over `max_text_chars`, which only costs tokenizer time before truncation throws it away.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from components.serving.image_decoding import BadInputError


def text_from_plain(body: bytes) -> str:
    """A `text/plain` body -> one text."""
    try:
        return body.decode("utf-8")
    except UnicodeDecodeError as error:
        raise BadInputError("not_utf8", f"the text/plain body is not UTF-8 (byte {error.start}: {error.reason}); "
                            f"send UTF-8 text.", 400) from None


def texts_from_document(document: Mapping[str, object]) -> list[object]:
    """`{"texts": ["...", ...]}` or `{"text": "..."}` -> the texts, unchecked (`check_texts` checks them)."""
    if isinstance(document.get("texts"), list):
        items = list(document["texts"])  # type: ignore[arg-type] - checked just above
    elif "text" in document:
        items = [document["text"]]
    else:
        raise BadInputError("bad_json", 'the JSON body must be {"texts": ["...", ...]} or {"text": "..."}.', 400)
    if not items:
        raise BadInputError("no_texts", 'the JSON body has an empty "texts" list.', 400)
    return items


def check_texts(items: Sequence[object], max_chars: int) -> list[str]:
    """`items` as texts a model can classify, or a `BadInputError` naming the first one that is not."""
    for position, text in enumerate(items):
        if not isinstance(text, str):
            raise BadInputError("bad_text", f"texts[{position}] is a {type(text).__name__}, not a string.", 400)
        if not text.strip():
            raise BadInputError("empty_text", f"texts[{position}] is empty or whitespace only; send text to classify.")
        if len(text) > max_chars:
            raise BadInputError("text_too_long", f"texts[{position}] has {len(text):,} characters, above the limit of "
                                f"{max_chars:,} (serve.max_text_chars); send a shorter text.", 413)
    return list(items)  # type: ignore[arg-type] - every item is a str now
