"""training.data: every row format, error reporting, assistant-only labels, truncation, padding and exact resume."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest
import torch

from training.data import (
    DEFAULT_CHAT_TEMPLATE,
    Conversation,
    DataError,
    PreferencePair,
    Prompt,
    ResumableSampler,
    collate_preference,
    collate_prompts,
    collate_sft,
    ensure_chat_template,
    iterate_batches,
    load_rows,
    parse_conversation,
    parse_preference,
    parse_prompt,
    read_rows,
    split_eval,
    tokenize_conversation,
    tokenize_preference,
    tokenize_prompt,
)

SHARED = Path(__file__).resolve().parents[2].parent / "shared" / "data"
HH = "\n\nHuman: Hi there\n\nAssistant: Hello! How can I help?\n\nHuman: Tell me a joke\n\nAssistant: "


def _user(c: str) -> dict:
    return {"role": "user", "content": c}


def _bot(c: str) -> dict:
    return {"role": "assistant", "content": c}


def _jsonl(path: Path, rows: list) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return str(path)


# ----------------------------------------------------------------------------- formats


@pytest.mark.parametrize("row, messages", [
    ({"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                   {"role": "assistant", "content": "Hello"}]},
     [{"role": "system", "content": "Be brief."}, _user("Hi"), _bot("Hello")]),
    ({"messages": [{"role": "human", "content": "Hi"}, {"role": "gpt", "content": "Yo"},
                   {"role": "user", "content": "?"}, {"role": "bot", "content": "!"}]},
     [_user("Hi"), _bot("Yo"), _user("?"), _bot("!")]),
    ({"messages": [{"from": "human", "content": "Hi"}, {"from": "assistant", "content": "Yo"}]},
     [_user("Hi"), _bot("Yo")]),
    ({"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Yo"}]}, [_user("Hi"), _bot("Yo")]),
    ({"instruction": "Add", "input": "1 + 2", "output": "3"}, [_user("Add\n\n1 + 2"), _bot("3")]),
    ({"instruction": "Say hi", "input": "", "output": "hi"}, [_user("Say hi"), _bot("hi")]),
    ({"instruction": "Negate", "instances": [{"input": "yes", "output": "no"}, {"input": "a", "output": "b"}]},
     [_user("Negate\n\nyes"), _bot("no")]),
    ({"chosen": HH + "Why? Because.", "rejected": HH + "No."},
     [_user("Hi there"), _bot("Hello! How can I help?"), _user("Tell me a joke"), _bot("Why? Because.")]),
    ({"context": [{"from": "human", "content": "Q"}], "chosen": [{"from": "assistant", "content": "A"}],
      "rejected": [{"from": "assistant", "content": "B"}]}, [_user("Q"), _bot("A")]),
])
def test_sft_formats(row: dict, messages: list) -> None:
    assert parse_conversation(row) == Conversation(messages)


@pytest.mark.parametrize("row, pair", [
    ({"prompt": "Q", "chosen": "A", "rejected": "B"}, PreferencePair([_user("Q")], [_bot("A")], [_bot("B")])),
    ({"messages": [_user("Q")], "chosen": [_bot("A")], "rejected": [_bot("B")]},
     PreferencePair([_user("Q")], [_bot("A")], [_bot("B")])),
    ({"context": [{"from": "human", "content": "Q"}, {"from": "assistant", "content": "A0"},
                  {"from": "human", "content": "Q2"}],
      "chosen": [{"from": "assistant", "content": "A"}], "rejected": [{"from": "assistant", "content": "B"}]},
     PreferencePair([_user("Q"), _bot("A0"), _user("Q2")], [_bot("A")], [_bot("B")])),
    ({"chosen": HH + "Why? Because.", "rejected": HH + " No. "},
     PreferencePair([_user("Hi there"), _bot("Hello! How can I help?"), _user("Tell me a joke")],
                    [_bot("Why? Because.")], [_bot("No.")])),
    ({"chosen": [_user("Q"), _bot("A")], "rejected": [_user("Q"), _bot("B")]},
     PreferencePair([_user("Q")], [_bot("A")], [_bot("B")])),
])
def test_preference_formats(row: dict, pair: PreferencePair) -> None:
    assert parse_preference(row) == pair


def test_hh_quirks() -> None:
    # consecutive turns of one speaker are joined; differing prompts take chosen's prompt, each side's last reply
    row = {"chosen": "\n\nHuman: a\n\nAssistant: b1\n\nAssistant: b2\n\nHuman: c\n\nAssistant: d",
           "rejected": "\n\nHuman: a\n\nAssistant: other\n\nHuman: c\n\nAssistant: e"}
    pair = parse_preference(row)
    assert pair.prompt == [_user("a"), _bot("b1\n\nb2"), _user("c")]
    assert (pair.chosen, pair.rejected) == ([_bot("d")], [_bot("e")])
    # a prompt ignores an empty final reply, a preference or SFT row does not
    assert parse_prompt({"chosen": HH, "rejected": HH + "x"}) == Prompt(
        [_user("Hi there"), _bot("Hello! How can I help?"), _user("Tell me a joke")])
    with pytest.raises(Exception, match="Assistant turn 4 of 4 is empty"):
        parse_preference({"chosen": HH, "rejected": HH + "x"})


@pytest.mark.parametrize("row, messages", [
    ({"instruction": "Write a poem"}, [_user("Write a poem")]),
    ({"instruction": "Translate", "input": "hola"}, [_user("Translate\n\nhola")]),
    ({"prompt": "Hi?"}, [_user("Hi?")]),
    ({"messages": [{"from": "human", "content": "Hi"}]}, [_user("Hi")]),
    ({"context": [{"from": "user", "content": "Q"}, {"from": "assistant", "content": "A"},
                  {"from": "user", "content": "Q2"}]}, [_user("Q"), _bot("A"), _user("Q2")]),
    ({"prompt": "Q", "chosen": "A", "rejected": "B"}, [_user("Q")]),
    ({"chosen": HH + "ha", "rejected": HH + "no"}, [_user("Hi there"), _bot("Hello! How can I help?"),
                                                    _user("Tell me a joke")]),
])
def test_prompt_formats(row: dict, messages: list) -> None:
    assert parse_prompt(row) == Prompt(messages)


ROWS = [{"messages": [_user("Q1"), _bot("A1")]}, {"messages": [_user("Q2"), _bot("A2")]}]


@pytest.mark.parametrize("name", ["d.jsonl", "d.jsonl.gz", "d.json", "d.json.gz", "wrapped.json", "disk", "hf"])
def test_source_kinds(tmp_path: Path, name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / name
    if name == "disk":
        import datasets

        datasets.Dataset.from_list(ROWS).save_to_disk(str(path))
        source = str(path)
    elif name == "hf":  # a local folder through load_dataset, offline
        monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
        path.mkdir()
        _jsonl(path / "train.jsonl", ROWS)
        source = f"hf:{path}:train"
    else:
        body = {"data": ROWS} if name == "wrapped.json" else ROWS
        text = "\n\n".join(json.dumps(r) for r in ROWS) + "\n" if ".jsonl" in name else json.dumps(body)
        path.write_bytes(gzip.compress(text.encode()) if name.endswith(".gz") else text.encode())
        source = str(path)
    items, stats = load_rows([source], "sft")
    assert [c.messages for c in items] == [r["messages"] for r in ROWS]
    assert (stats.rows, stats.skipped) == (2, 0)
    numbers = [n for n, _ in read_rows(source)]
    assert numbers == ([1, 3] if ".jsonl" in name else [0, 1])  # jsonl: 1-based lines, blank lines skipped


# ----------------------------------------------------------------------------- errors


@pytest.mark.parametrize("kind, row, field, text", [
    ("preference", {"prompt": "Q", "chosen": 5, "rejected": "B"}, "chosen",
     "expected a string or a list of messages, got int"),
    ("sft", {"messages": [_user("Q"), {"role": "assistant", "content": ""}]}, "messages[1].content", "is empty"),
    ("sft", {"messages": [_user("Q"), {"role": "robot", "content": "x"}]}, "messages[1].role", "unknown role"),
    ("sft", {"messages": [_user("Q"), "hi"]}, "messages[1]", "expected a message object, got str"),
    ("sft", {"messages": [_user("Q")]}, "messages", "has no assistant message"),
    ("sft", {"instruction": "Write a poem"}, "output", "missing"),
    ("sft", {"prompt": "Write a poem"}, "output", "missing"),
    ("sft", {"instruction": "Say", "output": 3}, "output", "expected a string, got int"),
    ("sft", {"text": "free text"}, None, "keys: text"),
    ("prompt", {"messages": [_user("Q"), _bot("A")]}, "messages[1].role", "must end with a user message"),
    ("prompt", {"question": "?"}, None, "expected 'messages'"),
    ("preference", {"prompt": "Q", "chosen": "A"}, "rejected", "missing"),
    ("preference", {"prompt": [_user("Q"), _bot("A")], "chosen": "A", "rejected": "B"}, "prompt[1].role",
     "must end with a user message"),
    ("preference", {"prompt": "Q", "chosen": [_user("A")], "rejected": "B"}, "chosen[0].role", "expected 'assistant'"),
    ("preference", {"chosen": "plain text", "rejected": "more"}, "chosen", "no 'Human:'/'Assistant:' markers"),
    ("preference", {"chosen": "\n\nHuman: hi", "rejected": "\n\nHuman: hi"}, "chosen",
     "does not end with an assistant"),
])
def test_malformed_row_names_file_line_field(tmp_path: Path, kind: str, row: dict, field: str | None,
                                             text: str) -> None:
    good = {"sft": ROWS[0], "prompt": {"prompt": "ok"}, "preference": {"prompt": "Q", "chosen": "A", "rejected": "B"}}
    src = _jsonl(tmp_path / "x.jsonl", [good[kind], good[kind], row])
    with pytest.raises(DataError) as info:
        load_rows([src], kind)
    err = info.value
    assert (err.source, err.line, err.field) == (src, 3, field)
    assert str(err).startswith(f"{src} line 3: " + (f"field '{field}': " if field else ""))
    assert text in str(err)


def test_invalid_json_and_missing_file(tmp_path: Path) -> None:
    src = tmp_path / "bad.jsonl"
    src.write_text('{"prompt": "a"}\n{"prompt": "b\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"bad.jsonl line 2: invalid JSON"):
        list(read_rows(str(src)))
    with pytest.raises(DataError, match="nope.jsonl: file or folder not found"):
        load_rows([str(tmp_path / "nope.jsonl")], "prompt")
    json_src = tmp_path / "x.json"
    json_src.write_text('[{"prompt": "a"}, {"prompt": ""}]', encoding="utf-8")
    with pytest.raises(DataError, match=r"x.json row 1: field 'prompt': is empty"):
        load_rows([str(json_src)], "prompt")


@pytest.mark.parametrize("damage", ["truncated", "flipped", "not_gzip"])
def test_truncated_or_corrupt_gzip_is_a_data_error_naming_the_file(tmp_path: Path, damage: str) -> None:
    raw = gzip.compress("".join(json.dumps({"prompt": f"question {i} " * 50}) + "\n" for i in range(200)).encode())
    if damage == "truncated":  # a download or copy cut off half-way
        raw = raw[: len(raw) // 2]
    elif damage == "flipped":  # bytes damaged in place: the CRC or the deflate stream fails
        mid = len(raw) // 2
        raw = raw[:mid] + bytes(b ^ 0xFF for b in raw[mid:mid + 4]) + raw[mid + 4:]
    else:
        raw = b"plain text with a .gz name"
    src = tmp_path / "prompts.jsonl.gz"
    src.write_bytes(raw)
    with pytest.raises(DataError, match=r"prompts.jsonl.gz: compressed data is truncated or corrupt") as info:
        load_rows([str(src)], "prompt")
    assert "\n" not in str(info.value)


def test_skip_mode_counts_and_max_samples(tmp_path: Path) -> None:
    rows = [{"prompt": "a"}, {"prompt": 3}, {"nothing": 1}, {"prompt": "b"}, [1, 2]]
    src = _jsonl(tmp_path / "p.jsonl", rows)
    (tmp_path / "p.jsonl").write_text((tmp_path / "p.jsonl").read_text() + "{oops\n{\"prompt\": \"c\"}\n")
    items, stats = load_rows([src], "prompt", on_error="skip")
    assert [p.messages[0]["content"] for p in items] == ["a", "b", "c"]
    assert (stats.rows, stats.skipped) == (3, 4)
    assert [e.split(": ")[0] for e in stats.errors] == [f"{src} line {n}" for n in (2, 3, 5, 6)]
    items, stats = load_rows([src, src], "prompt", on_error="skip", max_samples=2)
    assert len(items) == 2 and stats.rows == 2
    bad = _jsonl(tmp_path / "bad.jsonl", [{"prompt": 3}])
    with pytest.raises(DataError, match="no valid prompt rows"):
        load_rows([bad], "prompt", on_error="skip")


def test_split_eval_is_deterministic() -> None:
    items = list(range(100))
    train, held = split_eval(items, 0.1, seed=3)
    assert len(held) == 10 and sorted(train + held) == items and not set(train) & set(held)
    assert split_eval(items, 0.1, seed=3) == (train, held)
    assert split_eval(items, 0.1, seed=4)[1] != held
    assert split_eval(items, 0.0, seed=3) == (items, [])
    assert len(split_eval(items[:5], 0.01, seed=0)[1]) == 1


# ----------------------------------------------------------------------------- real data


@pytest.mark.skipif(not SHARED.is_dir(), reason="shared data not present")
def test_shared_datasets_parse() -> None:
    hh = str(SHARED / "hh-rlhf-harmless-base" / "test.jsonl.gz")
    empty_chosen = {87, 517, 926, 1104}  # the chosen reply is an empty "Assistant:" turn
    for kind in ("preference", "sft"):
        items, stats = load_rows([hh], kind, on_error="skip")
        assert (stats.rows, stats.skipped) == (1808, 4)
        assert {int(e.split(" line ")[1].split(":")[0]) for e in stats.errors} == empty_chosen
    prompts, stats = load_rows([hh], "prompt")
    assert stats.rows == 1812 and all(p.messages[-1]["role"] == "user" for p in prompts)
    pairs, _ = load_rows([hh], "preference", on_error="skip")
    assert pairs[0].chosen[0]["content"].startswith("No, sorry!")
    assert pairs[0].rejected[0]["content"].startswith("There are lots of funny things")
    assert len(pairs[0].prompt) == 5
    seed, stats = load_rows([str(SHARED / "alpaca-seed-tasks" / "seed_tasks.jsonl")], "sft")
    assert stats.rows == 175 and seed[1].messages[0]["content"].endswith("\n\nNight : Day :: Right : Left")
    for name in ("seed_prompts_en", "seed_prompts_ch", "user_1"):
        _, stats = load_rows([str(SHARED / "instructionwild" / f"{name}.jsonl")], "prompt")
        assert stats.rows == 429
    # user_2/user_3 hold invalid JSON: bad "\d"-style escapes, and one row broken over two lines
    for name, bad_lines in (("user_2", [134, 168]), ("user_3", [10, 121, 122])):
        path = SHARED / "instructionwild" / f"{name}.jsonl"
        lines = sum(1 for line in path.read_text(encoding="utf-8").split("\n") if line.strip())
        _, stats = load_rows([str(path)], "prompt", on_error="skip")
        assert stats.rows == lines - len(bad_lines)
        assert [int(e.split(" line ")[1].split(":")[0]) for e in stats.errors] == bad_lines


# ----------------------------------------------------------------------------- tokenisation


@pytest.fixture(scope="module")
def tok():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    corpus = ["Hello there, how can I help you today?", "Tell me a joke about the sea.", "The answer is four.",
              "system user assistant Be brief please", "你好，世界"]
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<s>", "</s>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tk.train_from_iterator(corpus * 10, trainer)
    t = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>")
    assert t.chat_template is None and t.pad_token is None
    ensure_chat_template(t)
    assert t.chat_template == DEFAULT_CHAT_TEMPLATE and t.pad_token == "</s>"
    return t


def _runs(ids: list[int], labels: list[int]) -> list[list[int]]:
    runs: list[list[int]] = [[]]
    for i, lab in zip(ids, labels, strict=True):
        if lab != -100:
            assert lab == i
            runs[-1].append(i)
        elif runs[-1]:
            runs.append([])
    return [r for r in runs if r]


CONV = Conversation([{"role": "system", "content": "Be brief please"}, _user("Tell me a joke about the sea."),
                     _bot("The sea is wide."), _user("Another, you?"), _bot("Hello there, 你好!")])


def test_labels_cover_assistant_contents_only(tok) -> None:
    out = tokenize_conversation(CONV, tok, 512)
    assert out is not None and len(out["input_ids"]) == len(out["labels"])
    assert [tok.decode(r) for r in _runs(out["input_ids"], out["labels"])] == [
        "The sea is wide.<|im_end|>", "Hello there, 你好!<|im_end|>"]
    assert tok.decode(out["input_ids"]) == tok.apply_chat_template(CONV.messages, tokenize=False)


def test_conversation_truncation(tok) -> None:
    full = tokenize_conversation(CONV, tok, 512)
    first_label = next(i for i, lab in enumerate(full["labels"]) if lab != -100)
    cut = tokenize_conversation(CONV, tok, first_label + 2)
    assert cut["input_ids"] == full["input_ids"][: first_label + 2]
    assert sum(lab != -100 for lab in cut["labels"]) == 2
    assert tokenize_conversation(CONV, tok, first_label) is None


def test_template_not_prefix_consistent(tok) -> None:
    # renders each message's role in upper case only when it is the last one: turns change once extended
    odd = ("{% for m in messages %}{% if loop.last %}{{ m['role'] | upper }}{% else %}{{ m['role'] }}{% endif %}"
           ": {{ m['content'] }}\n{% endfor %}{% if add_generation_prompt %}assistant: {% endif %}")
    tok.chat_template = odd
    try:
        with pytest.raises(DataError, match="not prefix-consistent"):
            tokenize_conversation(Conversation([_user("Hi"), _bot("Yo"), _user("Ok"), _bot("Fine")]), tok, 64)
    finally:
        ensure_chat_template(tok, DEFAULT_CHAT_TEMPLATE)
    assert tok.chat_template == DEFAULT_CHAT_TEMPLATE


def test_preference_truncation(tok) -> None:
    pair = PreferencePair([_user("Tell me a joke about the sea. " * 6)], [_bot("The answer is four.")],
                          [_bot("Hello there!")])
    full = tokenize_preference(pair, tok, 1024)
    prompt_ids = tok.apply_chat_template(pair.prompt, tokenize=False, add_generation_prompt=True)
    n_prompt = len(tok(prompt_ids, add_special_tokens=False)["input_ids"])
    assert full["chosen_input_ids"][:n_prompt] == full["rejected_input_ids"][:n_prompt]
    assert tok.decode(full["chosen_input_ids"][n_prompt:]) == "The answer is four.<|im_end|>\n"
    longest_reply = max(len(full["chosen_input_ids"]), len(full["rejected_input_ids"])) - n_prompt
    limit = 2 * longest_reply + 10  # the prompt keeps limit - longest_reply tokens (more than its floor, limit // 2)
    cut = tokenize_preference(pair, tok, limit)
    for side in ("chosen_input_ids", "rejected_input_ids"):  # the prompt lost its start, both replies survived whole
        assert len(cut[side]) == len(full[side]) - n_prompt + longest_reply + 10 <= limit
        assert cut[side] == full[side][-len(cut[side]):]
    assert cut["rejected_input_ids"][-len(full["rejected_input_ids"]) + n_prompt:] == \
        full["rejected_input_ids"][n_prompt:]
    same_start = PreferencePair([_user("Hi")], [_bot("The sea is wide. A")], [_bot("The sea is wide. B")])
    assert tokenize_preference(same_start, tok, 1024) is not None
    assert tokenize_preference(same_start, tok, 8) is None  # only the shared start fits


def test_prompts_and_collation(tok) -> None:
    short, long = Prompt([_user("Hi")]), Prompt([_user("Tell me a joke about the sea. " * 3)])
    ids = tokenize_prompt(short, tok, 512)
    assert tok.decode(ids) == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    long_ids = tokenize_prompt(long, tok, 512)
    assert tokenize_prompt(long, tok, 10) == long_ids[-10:]
    batch = collate_prompts([ids, long_ids], pad_id=tok.pad_token_id)
    width = len(long_ids)
    assert batch["input_ids"].shape == (2, width)
    assert batch["input_ids"][0].tolist() == [tok.pad_token_id] * (width - len(ids)) + ids
    assert batch["attention_mask"][0].tolist() == [0] * (width - len(ids)) + [1] * len(ids)
    assert batch["attention_mask"][1].all()


def test_collate_right_pads() -> None:
    b = collate_sft([{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}, {"input_ids": [8], "labels": [8]}], pad_id=0)
    assert b["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert b["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert b["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]
    assert b["input_ids"].dtype == torch.long
    p = collate_preference([{"chosen_input_ids": [1, 2], "rejected_input_ids": [3]},
                            {"chosen_input_ids": [4], "rejected_input_ids": [5, 6, 7]}], pad_id=9)
    assert p["chosen_input_ids"].tolist() == [[1, 2], [4, 9]]
    assert p["rejected_input_ids"].tolist() == [[3, 9, 9], [5, 6, 7]]
    assert p["rejected_attention_mask"].tolist() == [[1, 0, 0], [1, 1, 1]]


# ----------------------------------------------------------------------------- sampling


def _take(it, n: int) -> list[list[int]]:
    return [next(it)["idx"].tolist() for _ in range(n)]


def _collate(batch: list[int]) -> dict:
    return {"idx": torch.tensor(batch)}


def test_sampler_shape_and_determinism() -> None:
    s = ResumableSampler(10, seed=1, batch_size=3)
    assert len(s) == 9  # whole batches only
    first = list(s)
    assert len(set(first)) == 9 and s.epoch == 1 and s.position == 0
    second = list(s)
    assert first != second
    assert list(ResumableSampler(10, seed=1, batch_size=3)) == first
    assert list(ResumableSampler(5, shuffle=False)) == [0, 1, 2, 3, 4]
    assert len(ResumableSampler(2, world_size=2, batch_size=4)) == 4  # at least one batch: indices repeat


def test_ranks_partition() -> None:
    per_rank = [ResumableSampler(103, rank=r, world_size=4, seed=7, batch_size=5).indices(2) for r in range(4)]
    assert all(len(p) == 25 for p in per_rank)
    flat = [i for p in per_rank for i in p]
    assert len(set(flat)) == 100 and all(0 <= i < 103 for i in flat)


@pytest.mark.parametrize("stop_after", [3, 7])  # mid-epoch, and across the epoch boundary (4 batches an epoch)
def test_exact_resume(stop_after: int) -> None:
    data = list(range(17))
    ref = _take(iterate_batches(data, ResumableSampler(17, seed=5, batch_size=4), 4, _collate), 12)
    s = ResumableSampler(17, seed=5, batch_size=4)
    head = _take(iterate_batches(data, s, 4, _collate), stop_after)
    state = s.state_dict()
    assert state["position"] == (stop_after * 4) % 16 or state["position"] == 16
    resumed = ResumableSampler(17, seed=5, batch_size=4)
    resumed.load_state_dict(json.loads(json.dumps(state)))
    tail = _take(iterate_batches(data, resumed, 4, _collate), 12 - stop_after)
    assert head + tail == ref
    assert len({tuple(b) for b in ref[:4]}) == 4 and sorted(sum(ref[:4], [])) == sorted(set(sum(ref[:4], [])))


def test_dataloader_position_counts_consumed_samples() -> None:
    s = ResumableSampler(20, seed=0, batch_size=4)
    loader = torch.utils.data.DataLoader(list(range(20)), batch_size=4, sampler=s, num_workers=0)
    it = iter(loader)
    seen = [next(it).tolist() for _ in range(3)]
    assert s.position == 12 and s.epoch == 0
    resumed = ResumableSampler(20, seed=0, batch_size=4)
    resumed.load_state_dict(s.state_dict())
    rest = [b.tolist() for b in torch.utils.data.DataLoader(list(range(20)), batch_size=4, sampler=resumed)]
    assert seen + rest == [b.tolist() for b in torch.utils.data.DataLoader(
        list(range(20)), batch_size=4, sampler=ResumableSampler(20, seed=0, batch_size=4))]
    assert resumed.epoch == 1 and resumed.position == 0


def test_sampler_refuses_changed_dataset() -> None:
    state = ResumableSampler(10).state_dict()
    with pytest.raises(DataError, match="dataset changed since the checkpoint"):
        ResumableSampler(11).load_state_dict(state)
    with pytest.raises(DataError, match="world_size"):
        ResumableSampler(10, world_size=2).load_state_dict(state)
