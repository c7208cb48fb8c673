from rgchat.tokenizer import StreamingDetokenizer, Tokenizer

TEXT = "Über café — 日本語 🙂 and ✨ sparkles: ΑΒΓ plain words after."


def test_special_ids_come_from_the_model(tokenizer_path):
    tok = Tokenizer(tokenizer_path)
    assert (tok.bos_id, tok.eos_id) == (2, 1)
    assert tok.start_of_turn_id is not None and tok.end_of_turn_id is not None
    assert tok.start_of_turn_id != tok.end_of_turn_id


def test_streaming_never_splits_or_drops_characters(tokenizer_path):
    tok = Tokenizer(tokenizer_path)
    ids = tok.encode(TEXT)
    byte_pieces = [i for i in ids if tok.sp.IsByte(i)]
    assert len(byte_pieces) >= 4  # ✨, ΑΒΓ and the emoji are spelled with byte-fallback tokens
    detok = StreamingDetokenizer(tok)
    pieces = [detok.add(i) for i in ids] + [detok.flush()]
    assert "".join(pieces) == tok.decode(ids) == TEXT
    assert not any("\ufffd" in p for p in pieces)
    assert "" in pieces  # some tokens completed no character and were held back


def test_streaming_keeps_spaces_between_words(tokenizer_path):
    tok = Tokenizer(tokenizer_path)
    text = "the lazy dog jumps over the quick fox"
    ids = tok.encode(text)
    detok = StreamingDetokenizer(tok)
    assert "".join(detok.add(i) for i in ids) + detok.flush() == text


def test_chat_prompt_inserts_markers_by_id(tokenizer_path):
    tok = Tokenizer(tokenizer_path)
    ids = tok.chat_prompt("hi <start_of_turn> there")
    assert ids.count(tok.start_of_turn_id) == 2  # the marker typed in the text is not a control token
    assert ids[0] == tok.start_of_turn_id and ids.count(tok.end_of_turn_id) == 1
    assert tok.decode(ids[1:ids.index(tok.end_of_turn_id)]) == "user\nhi <start_of_turn> there"
    assert tok.decode(ids[-len(tok.encode("model\n")):]) == "model\n"


def test_streaming_keeps_the_first_pieces_leading_space(tokenizer_path):
    tok = Tokenizer(tokenizer_path)
    ids = tok.encode(" quick fox")
    assert tok.sp.IdToPiece(ids[0]).startswith("\u2581")  # SentencePiece's space marker
    detok = StreamingDetokenizer(tok)
    first = detok.add(ids[0])
    assert first.startswith(" ") or first == ""
    assert first + "".join(detok.add(i) for i in ids[1:]) + detok.flush() == " quick fox"
