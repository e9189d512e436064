"""A real coordinator and worker (separate OS processes) train one round on user data, fully offline:
a local JSONL file with a tokenizer trained in the test, and a Hugging Face Llama built from a config
on a Hugging Face `datasets` stream of local files.

Both processes build data and model from the run spec the coordinator hands out, so the checks are:
the round closes with every replica's checksum equal to the coordinator's, the tokens counted are
the tokens of the batches, and the coordinator and the worker logged the same corpus fingerprint.
"""

from __future__ import annotations

import json
import math
import random
import re
from pathlib import Path
from typing import Any

import pytest
from _tiny_models import TINY_LLAMA

from antorcha.experiments.cluster import LocalCluster

pytestmark = pytest.mark.slow
transformers = pytest.importorskip("transformers")
pytest.importorskip("tokenizers")
pytest.importorskip("datasets")

WORDS = ["the", "a", "cat", "dog", "sat", "ran", "on", "under", "mat", "big", "red", "and", "then"]
RUN: dict[str, Any] = {
    "seq_len": 32,
    "batch_size": 4,
    "inner_steps": 6,
    "inner_warmup_steps": 0,
    "max_rounds": 1,
    "min_workers": 1,
    "round_deadline_s": 120.0,
    "allreduce_timeout_s": 20.0,
    "eval_batches": 2,
}


@pytest.fixture(autouse=True)
def _offline(hf_offline: None) -> None:
    """Every test here runs with the Hugging Face libraries offline (see tests/conftest.py)."""


def _texts(count: int = 400) -> list[str]:
    rng = random.Random(0)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 15))) + "." for _ in range(count)]


def _jsonl(path: Path, texts: list[str]) -> Path:
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    return path


def _tokenizer(directory: Path, texts: list[str]) -> Path:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(texts, trainer)
    transformers.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>").save_pretrained(
        str(directory)
    )
    return directory


def _fingerprints(cluster: LocalCluster, name: str) -> set[str]:
    return set(re.findall(r"data source=\S+ .*fingerprint=([0-9a-f]{12})", cluster.tail(name, 10_000)))


def _one_round(workdir: Path, run: dict[str, Any]) -> None:
    with LocalCluster(workdir, run=run, coordinator={"lease_s": 10.0, "http_port": 0}) as cluster:
        cluster.start_coordinator()
        cluster.start_worker("w")
        status = cluster.wait_for(
            lambda s: s.phase == "finished" and all(math.isfinite(r.eval_loss) for r in s.rounds), 240
        )
        assert cluster.wait_workers(60) == {"w": 0}, cluster.tail("w")
        assert status.round == 1 and len(status.rounds) == 1
        record = status.rounds[0]
        assert record.replicas_consistent and status.replicas_consistent
        assert math.isfinite(record.eval_loss) and math.isfinite(status.initial_eval_loss)
        # The round's budget is H x batch x seq_len tokens, all trained by the one worker.
        assert record.tokens == run["inner_steps"] * run["batch_size"] * run["seq_len"]
        coordinator_fp, worker_fp = _fingerprints(cluster, "coordinator"), _fingerprints(cluster, "w")
        assert len(coordinator_fp) == 1 and coordinator_fp == worker_fp
        assert "Traceback" not in cluster.tail("w", 10_000)


def test_one_round_on_a_local_jsonl_file_with_a_trained_tokenizer(tmp_path: Path) -> None:
    texts = _texts()
    data = _jsonl(tmp_path / "corpus.jsonl", texts)
    run = {
        **RUN,
        "run_id": "jsonl",
        "tokenizer": str(_tokenizer(tmp_path / "tokenizer", texts)),
        "data": {"source": "jsonl", "paths": [str(data)], "eval_fraction": 0.15},
    }
    _one_round(tmp_path / "cluster", run)


def test_one_round_with_a_hugging_face_llama_on_a_streamed_dataset(tmp_path: Path) -> None:
    texts = _texts()
    data = _jsonl(tmp_path / "corpus.jsonl", texts)
    run = {
        **RUN,
        "run_id": "hf-llama",
        "tokenizer": str(_tokenizer(tmp_path / "tokenizer", texts)),
        "hf_model_config": TINY_LLAMA,
        "data": {
            "source": "hf",
            "hf_name": "json",
            "paths": [str(data)],
            "max_documents": 350,
            "eval_fraction": 0.15,
        },
    }
    _one_round(tmp_path / "cluster", run)
    # Each process cached the streamed tokens on this machine (one file: same spec, same tokenizer).
    assert len(list((tmp_path / "token-cache").glob("*.safetensors"))) == 1
