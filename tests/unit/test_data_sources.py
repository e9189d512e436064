"""Real data and models, offline: local text/JSONL/Parquet files, HF `datasets` on local files, a tokenizer
trained in the test, and models from the built-in presets or a Hugging Face Llama config.

Nothing here touches the network: HF_HUB_OFFLINE / HF_DATASETS_OFFLINE are set for every test, the
tokenizer is trained from the test's own text, and models are built from configs (no weights).
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from _tiny_models import TINY_LLAMA
from pydantic import ValidationError

from antorcha.config import CoordinatorConfig, DataSpec, RunSpec, load_config
from antorcha.data import eval_batches, evaluate, load_stdlib_corpus
from antorcha.data.files import DataSourceError, expand_paths, file_documents
from antorcha.data.source import load_run_data, token_dtype
from antorcha.data.tokenizers import ByteTokenizer, TokenizerError, load_tokenizer
from antorcha.diloco.params import ParamLayout
from antorcha.model import LlamaLM, causal_lm_loss
from antorcha.model.factory import build_run_model

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

WORDS = ["the", "a", "cat", "dog", "sat", "ran", "on", "under", "mat", "big", "red", "and", "then"]


@pytest.fixture(autouse=True)
def _offline(hf_offline: None) -> None:
    """Every test here runs with the Hugging Face libraries offline (see tests/conftest.py)."""


def sentences(count: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 15))) + "." for _ in range(count)]


def write_jsonl(path: Path, texts: list[str], field: str = "text") -> Path:
    path.write_text("".join(json.dumps({field: t, "id": i}) + "\n" for i, t in enumerate(texts)))
    return path


def build_tokenizer(directory: Path, texts: list[str], vocab_size: int = 320) -> Path:
    """A byte-level BPE trained on ``texts`` and saved as a transformers tokenizer directory."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(texts, trainer)
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>")
    fast.save_pretrained(str(directory))
    return directory


@pytest.fixture
def texts() -> list[str]:
    return sentences(300)


@pytest.fixture
def tokenizer_dir(tmp_path: Path, texts: list[str]) -> Path:
    return build_tokenizer(tmp_path / "tok", texts)


def jsonl_spec(path: Path, tokenizer: str = "bytes", **data: object) -> RunSpec:
    return RunSpec(
        tokenizer=tokenizer,
        data=DataSpec(source="jsonl", paths=[str(path)], eval_fraction=0.1, **data),  # type: ignore[arg-type]
    )


# --- the default stays exactly what it was ------------------------------------------------------------


def test_default_spec_reads_the_builtin_corpus_unchanged() -> None:
    spec = RunSpec(corpus_max_bytes=200_000)
    data = load_run_data(spec)
    raw = load_stdlib_corpus(200_000)
    assert data.vocab_size == 256 and data.tokenizer == "bytes"
    assert torch.equal(data.corpus.train, raw.train) and torch.equal(data.corpus.eval, raw.eval)
    assert data.corpus.fingerprint == raw.fingerprint
    model = build_run_model(spec, data.vocab_size)
    assert isinstance(model, LlamaLM) and model.dims.vocab_size == 256


# --- local files ---------------------------------------------------------------------------------------


def test_jsonl_with_bytes_tokenizer_is_the_utf8_of_each_document(tmp_path: Path, texts: list[str]) -> None:
    path = write_jsonl(tmp_path / "d.jsonl", texts)
    data = load_run_data(jsonl_spec(path))
    corpus = data.corpus
    assert data.vocab_size == 256 and corpus.train.dtype == torch.uint8
    # Every document lands in exactly one split, each followed by the separator.
    joined = bytes(corpus.train.numpy()) + bytes(corpus.eval.numpy())
    assert sorted(joined.split(b"\n\n")[:-1]) == sorted(t.encode() for t in texts)
    assert 0 < corpus.eval.numel() < corpus.train.numel()
    again = load_run_data(jsonl_spec(path))
    assert again.corpus.fingerprint == corpus.fingerprint and torch.equal(again.corpus.train, corpus.train)


def test_the_split_of_a_document_does_not_depend_on_the_others(tmp_path: Path, texts: list[str]) -> None:
    full = load_run_data(jsonl_spec(write_jsonl(tmp_path / "d.jsonl", texts))).corpus
    # Dropping the last documents never moves an earlier one across the split (keys are file:line).
    part = load_run_data(jsonl_spec(write_jsonl(tmp_path / "d.jsonl", texts[:200]))).corpus
    assert bytes(full.train.numpy()).startswith(bytes(part.train.numpy()))
    assert bytes(full.eval.numpy()).startswith(bytes(part.eval.numpy()))


def test_text_parquet_and_jsonl_read_the_same_documents(tmp_path: Path, texts: list[str]) -> None:
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    write_jsonl(tmp_path / "d.jsonl", texts)
    pq.write_table(pa.table({"body": texts[:150]}), tmp_path / "a.parquet", row_group_size=40)
    pq.write_table(pa.table({"body": texts[150:]}), tmp_path / "b.parquet")
    for i, t in enumerate(texts[:3]):
        (tmp_path / f"doc{i}.txt").write_text(t)
    assert [d.text for d in file_documents("jsonl", [str(tmp_path / "d.jsonl")], "text")] == texts
    parquet = list(file_documents("parquet", [str(tmp_path / "*.parquet")], "body"))
    assert [d.text for d in parquet] == texts
    assert parquet[150].key == "b.parquet:0"
    assert [d.text for d in file_documents("text", [str(tmp_path / "doc*.txt")], "")] == texts[:3]


def test_globs_expand_in_sorted_order(tmp_path: Path) -> None:
    for name in ("c.txt", "a.txt", "b.txt"):
        (tmp_path / name).write_text(name)
    assert [p.name for p in expand_paths([str(tmp_path / "*.txt")])] == ["a.txt", "b.txt", "c.txt"]


def test_max_documents_and_max_tokens_bound_the_corpus(tmp_path: Path, texts: list[str]) -> None:
    path = write_jsonl(tmp_path / "d.jsonl", texts)
    few = load_run_data(jsonl_spec(path, max_documents=40)).corpus
    joined = bytes(few.train.numpy()) + bytes(few.eval.numpy())
    assert joined.count(b"\n\n") == 40
    capped = load_run_data(jsonl_spec(path, max_tokens=2000)).corpus
    separators = capped.train.numel() + capped.eval.numel() - 2000
    assert 0 < separators <= 2 * 300  # 2000 text tokens plus one separator per kept document


# --- tokenizer -----------------------------------------------------------------------------------------


def test_hf_tokenizer_sets_the_vocabulary_and_the_dtype(
    tmp_path: Path, texts: list[str], tokenizer_dir: Path
) -> None:
    tok = load_tokenizer(str(tokenizer_dir))
    hf = transformers.AutoTokenizer.from_pretrained(str(tokenizer_dir))
    # The BPE stops merging early on this small text; added special tokens count too.
    vocab = len(hf)
    assert 256 < tok.vocab_size == vocab <= 320 and tok.separator() == [0]  # <|endoftext|> is id 0
    path = write_jsonl(tmp_path / "d.jsonl", texts)
    data = load_run_data(jsonl_spec(path, str(tokenizer_dir)))
    assert data.vocab_size == vocab and data.corpus.train.dtype == token_dtype(vocab) == torch.int16
    assert int(data.corpus.train.max()) < vocab and int(data.corpus.train.min()) >= 0
    # BPE compresses: far fewer tokens than bytes, and the fingerprint covers the tokenizer.
    as_bytes = load_run_data(jsonl_spec(path))
    assert data.corpus.train.numel() < as_bytes.corpus.train.numel() / 2
    assert data.corpus.fingerprint != as_bytes.corpus.fingerprint
    # The tokens decode back to the documents.
    first = data.corpus.train[: (data.corpus.train == 0).nonzero()[0, 0]].tolist()
    assert hf.decode(first) in texts


def test_builtin_corpus_with_an_hf_tokenizer(tokenizer_dir: Path) -> None:
    data = load_run_data(RunSpec(tokenizer=str(tokenizer_dir), corpus_max_bytes=100_000))
    assert data.vocab_size > 256 and data.corpus.train.dtype == torch.int16
    assert data.corpus.eval.numel() > 0


def test_bytes_tokenizer_round_trips_utf8() -> None:
    tok = ByteTokenizer()
    assert tok.encode_batch(["añ"]) == [[97, 195, 177]]


def test_missing_tokenizer_directory_is_named(tmp_path: Path) -> None:
    with pytest.raises(TokenizerError, match="not found"):
        load_tokenizer(str(tmp_path / "nope"))
    with pytest.raises(TokenizerError, match="empty"):
        load_tokenizer("")


# --- Hugging Face datasets on local files --------------------------------------------------------------


def test_hf_json_builder_streams_local_files_offline(tmp_path: Path, texts: list[str]) -> None:
    pytest.importorskip("datasets")
    path = write_jsonl(tmp_path / "d.jsonl", texts)
    cache = tmp_path / "cache"
    spec = RunSpec(
        data=DataSpec(source="hf", hf_name="json", paths=[str(path)], max_documents=100, eval_fraction=0.1)
    )
    first = load_run_data(spec, cache_dir=cache).corpus
    joined = bytes(first.train.numpy()) + bytes(first.eval.numpy())
    assert sorted(joined.split(b"\n\n")[:-1]) == sorted(t.encode() for t in texts[:100])
    # The tokens were cached on this machine; the next load reads them back unchanged.
    (cached,) = cache.glob("*.safetensors")
    path.write_text("")  # the source is gone: only the cache can answer now
    again = load_run_data(spec, cache_dir=cache).corpus
    assert torch.equal(again.train, first.train) and again.fingerprint == first.fingerprint
    # A corrupt cache file is ignored and rebuilt from the source.
    write_jsonl(path, texts)
    cached.write_bytes(b"garbage")
    rebuilt = load_run_data(spec, cache_dir=cache).corpus
    assert rebuilt.fingerprint == first.fingerprint


def test_hf_parquet_builder_without_streaming(tmp_path: Path, texts: list[str]) -> None:
    pytest.importorskip("datasets")
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    pq.write_table(pa.table({"content": texts}), tmp_path / "d.parquet")
    spec = RunSpec(
        data=DataSpec(
            source="hf",
            hf_name="parquet",
            paths=[str(tmp_path / "d.parquet")],
            text_field="content",
            hf_streaming=False,
            eval_fraction=0.1,
        )
    )
    corpus = load_run_data(spec, cache_dir=None).corpus
    assert (corpus.train.numel() + corpus.eval.numel()) == sum(len(t) + 2 for t in texts)


def test_hf_dataset_without_the_text_column_is_named(tmp_path: Path, texts: list[str]) -> None:
    pytest.importorskip("datasets")
    path = write_jsonl(tmp_path / "d.jsonl", texts, field="body")
    spec = RunSpec(data=DataSpec(source="hf", hf_name="json", paths=[str(path)], max_documents=5))
    with pytest.raises(DataSourceError, match="no column 'text'"):
        load_run_data(spec, cache_dir=None)


def test_local_builder_without_files_is_refused() -> None:
    pytest.importorskip("datasets")
    spec = RunSpec(data=DataSpec(source="hf", hf_name="json", max_documents=5))
    with pytest.raises(DataSourceError, match=r"set data\.paths"):
        load_run_data(spec, cache_dir=None)


# --- bad input -----------------------------------------------------------------------------------------


def _lines(tmp_path: Path, *lines: str) -> Path:
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.mark.parametrize(
    ("lines", "message"),
    [
        (('{"text": "ok"}', '{"body": "no text"}'), r"bad\.jsonl:2 has no field 'text' \(it has: body\)"),
        (('{"text": "ok"}', "{not json"), r"bad\.jsonl:2 is not valid JSON"),
        (('["a list"]',), r"bad\.jsonl:1 is a JSON list, not an object"),
        (('{"text": 3}',), r"bad\.jsonl:1: field 'text' is int, not text"),
    ],
)
def test_bad_jsonl_lines_are_named(tmp_path: Path, lines: tuple[str, ...], message: str) -> None:
    with pytest.raises(DataSourceError, match=message):
        load_run_data(jsonl_spec(_lines(tmp_path, *lines)))


def test_missing_files_are_named(tmp_path: Path) -> None:
    with pytest.raises(DataSourceError, match="data file not found"):
        load_run_data(jsonl_spec(tmp_path / "missing.jsonl"))
    with pytest.raises(DataSourceError, match="no file matches"):
        load_run_data(jsonl_spec(tmp_path / "*.jsonl"))


def test_parquet_without_the_column_is_named(tmp_path: Path, texts: list[str]) -> None:
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    pq.write_table(pa.table({"body": texts}), tmp_path / "d.parquet")
    spec = RunSpec(data=DataSpec(source="parquet", paths=[str(tmp_path / "d.parquet")]))
    with pytest.raises(DataSourceError, match="has no column 'text' \\(it has: body\\)"):
        load_run_data(spec)
    (tmp_path / "junk.parquet").write_bytes(b"not parquet")
    spec = RunSpec(data=DataSpec(source="parquet", paths=[str(tmp_path / "junk.parquet")]))
    with pytest.raises(DataSourceError, match="not a readable Parquet file"):
        load_run_data(spec)


def test_files_without_text_are_refused(tmp_path: Path) -> None:
    with pytest.raises(DataSourceError, match="no documents"):
        load_run_data(jsonl_spec(_lines(tmp_path, "", "  ")))
    (tmp_path / "bin.txt").write_bytes(b"\xff\xfe\x00")
    with pytest.raises(DataSourceError, match="not UTF-8"):
        load_run_data(RunSpec(data=DataSpec(source="text", paths=[str(tmp_path / "bin.txt")])))


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"source": "jsonl"}, "needs data.paths"),
        ({"source": "builtin", "paths": ["x"]}, "only read for"),
        ({"source": "hf"}, "needs data.hf_name"),
        ({"source": "hf", "hf_name": "x"}, "max_documents or data.max_tokens"),
        ({"source": "csv", "paths": ["x"]}, "source"),
        ({"eval_fraction": 0}, "eval_fraction"),
    ],
)
def test_inconsistent_data_specs_fail_at_load(data: dict[str, object], message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        RunSpec.model_validate({"data": data})


def test_data_spec_from_toml_and_environment(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text('[run]\ntokenizer = "tok"\n\n[run.data]\nsource = "jsonl"\npaths = ["a.jsonl"]\n')
    config = load_config(CoordinatorConfig, path, environ={})
    assert config.run.data.source == "jsonl" and config.run.data.paths == ["a.jsonl"]
    env = {"ANTORCHA_RUN__DATA": '{source = "parquet", paths = ["b.parquet"], text_field = "body"}'}
    config = load_config(CoordinatorConfig, path, environ=env)
    assert config.run.data.source == "parquet" and config.run.data.text_field == "body"
    # The spec travels as JSON from the coordinator to workers; the hash must survive the trip.
    assert RunSpec.model_validate_json(config.run.model_dump_json()).sha256() == config.run.sha256()


# --- models --------------------------------------------------------------------------------------------



def _params(model: torch.nn.Module) -> Iterator[torch.Tensor]:
    return (p.detach() for p in model.parameters())


def test_builtin_model_vocabulary_follows_the_tokenizer() -> None:
    model = build_run_model(RunSpec(seq_len=32), 320)
    assert isinstance(model, LlamaLM) and model.dims.vocab_size == 320


def test_hf_llama_from_config_values_is_seeded_and_trains(tokenizer_dir: Path) -> None:
    spec = RunSpec(seq_len=32, tokenizer=str(tokenizer_dir), hf_model_config=TINY_LLAMA)
    model = build_run_model(spec, 320)
    assert model.hf.config.vocab_size == 320 and model.hf.config.max_position_embeddings == 32
    again = build_run_model(spec, 320)
    assert all(torch.equal(a, b) for a, b in zip(_params(model), _params(again), strict=True))
    other = build_run_model(spec.model_copy(update={"seed": 1}), 320)
    assert not all(torch.equal(a, b) for a, b in zip(_params(model), _params(other), strict=True))
    torch.manual_seed(0)
    before = torch.randn(3)
    torch.manual_seed(0)
    build_run_model(spec, 320)
    assert torch.equal(torch.randn(3), before), "building must not move the caller's random stream"
    batch = torch.randint(0, 320, (2, 33))
    loss = causal_lm_loss(model, batch)
    loss.backward()
    assert torch.isfinite(loss) and abs(loss.item() - torch.log(torch.tensor(320.0)).item()) < 0.5
    layout = ParamLayout.of(model)
    flat = layout.flatten(model)
    layout.load_into(again, flat + 1)
    assert torch.equal(layout.flatten(again), flat + 1)


def test_hf_llama_from_a_config_directory(tmp_path: Path) -> None:
    config = transformers.LlamaConfig(**{k: v for k, v in TINY_LLAMA.items() if k != "model_type"})
    config.vocab_size = 400
    config.save_pretrained(str(tmp_path / "llama"))
    spec = RunSpec(seq_len=32, hf_model=str(tmp_path / "llama"), hf_model_config={"num_hidden_layers": 1})
    model = build_run_model(spec, 320)
    assert model.hf.config.vocab_size == 400 and model.hf.config.num_hidden_layers == 1


@pytest.mark.parametrize(
    ("update", "message"),
    [
        ({"hf_model_config": {**TINY_LLAMA, "vocab_size": 100}}, "tokenizer has 320 ids but the model"),
        ({"hf_model_config": {**TINY_LLAMA, "max_position_embeddings": 16}}, "exceeds the model's max"),
        ({"hf_model_config": {"hidden_size": 32}}, "needs a model_type"),
        ({"hf_model_config": {"model_type": "no-such-model"}}, "cannot build"),
        ({"hf_model": "/nonexistent/llama-config"}, "cannot load the model config"),
    ],
)
def test_bad_model_configs_are_named(update: dict[str, object], message: str) -> None:
    spec = RunSpec.model_validate({"seq_len": 32, **update})
    with pytest.raises(ValueError, match=message):
        build_run_model(spec, 320)


def test_hf_llama_learns_on_tokenized_jsonl(tmp_path: Path, texts: list[str], tokenizer_dir: Path) -> None:
    """Data and model from one spec: a few AdamW steps on the tokens lower the held-out loss."""
    from antorcha.data import ShardReader
    from antorcha.diloco.inner import InnerTrainer

    path = write_jsonl(tmp_path / "d.jsonl", texts)
    spec = jsonl_spec(path, str(tokenizer_dir)).model_copy(
        update={"hf_model_config": TINY_LLAMA, "seq_len": 32, "batch_size": 8, "inner_warmup_steps": 0}
    )
    data = load_run_data(spec)
    model = build_run_model(spec, data.vocab_size)
    held_out = eval_batches(data.corpus.eval, spec.seq_len, 4, 2)
    before = evaluate(model, held_out)
    trainer = InnerTrainer(model, spec, ShardReader(data.corpus.train, 1, 32, 8), torch.device("cpu"))
    stats = trainer.run(30)
    assert stats.tokens == 30 * 8 * 32
    assert evaluate(model, held_out) < before - 0.5
