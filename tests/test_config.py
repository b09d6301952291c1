"""ServerConfig validation and the CLI generated from it."""

from __future__ import annotations

import dataclasses
import re

import pytest

from poolsvc.cli import build_parser, config_from_args
from poolsvc.config import (
    BUNDLED_MODEL,
    ConfigError,
    ModelSpec,
    PoolerConfig,
    PoolerOverride,
    ServerConfig,
)
from poolsvc.engine.params import PoolingType


def parse(*argv: str) -> ServerConfig:
    return config_from_args(build_parser().parse_args(["serve", *argv]))


def test_cli_defaults_are_the_dataclass_defaults():
    assert parse() == ServerConfig()
    assert ServerConfig().models == (ModelSpec(BUNDLED_MODEL, "all-MiniLM-L6-v2"),)
    assert ServerConfig().address == "127.0.0.1:50051"


def test_every_field_has_a_flag():
    help_text = build_parser()._subparsers._group_actions[0].choices["serve"].format_help()
    for f in dataclasses.fields(ServerConfig):
        assert f.metadata.get("flag", "--" + f.name.replace("_", "-")) in help_text


def test_flags():
    cfg = parse("--model", "emb=/models/bge", "--model", "BAAI/bge-reranker-v2-m3", "--port",
                "6000", "--host", "0.0.0.0", "--dtype", "bfloat16", "--max-batch-tokens", "4096",
                "--auto-truncate", "--allow-pickle-weights", "--grace-period", "2.5")
    assert cfg.models == (ModelSpec("/models/bge", "emb"),
                          ModelSpec("BAAI/bge-reranker-v2-m3", "bge-reranker-v2-m3"))
    assert (cfg.port, cfg.host, cfg.dtype, cfg.max_batch_tokens) == (6000, "0.0.0.0", "bfloat16",
                                                                      4096)
    assert cfg.auto_truncate and cfg.allow_pickle_weights and cfg.grace_period == 2.5


@pytest.mark.parametrize("changes,message", [
    (dict(port=70000), "--port must be 0..65535"),
    (dict(max_batch_tokens=0), "--max-batch-tokens must be at least 1"),
    (dict(max_batch_inputs=-1), "--max-batch-inputs must be at least 1"),
    (dict(threads=-1), "--threads must be 0 (auto) or more"),
    (dict(grace_period=-1.0), "--grace-period must be >= 0"),
    (dict(dtype="int4"), "--dtype must be one of"),
    (dict(models=()), "serve at least one model"),
    (dict(models=(ModelSpec("/a/m"), ModelSpec("/b/m"))), "names must be unique"),
])
def test_invalid_settings_raise(changes, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        ServerConfig(**changes)


def test_model_names():
    assert ModelSpec.parse("/srv/models/e5-base/").name == "e5-base"
    assert ModelSpec.parse("intfloat/e5-mistral-7b-instruct").name == "e5-mistral-7b-instruct"
    with pytest.raises(ConfigError, match="may only use"):
        ModelSpec.parse("bad name=/x")
    with pytest.raises(ConfigError, match="needs a directory"):
        ModelSpec.parse("name=")


@pytest.mark.parametrize("value,message", [
    ("{not json", "--pooler-config is not JSON"),
    ("[1]", "must be a JSON object"),
    ('{"pooling": "MEAN"}', "unknown keys ['pooling']"),
    ('{"pooling_type": "AVERAGE"}', "pooling_type 'AVERAGE' is not one of"),
    ('{"normalize": "yes"}', "normalize must be true or false"),
    ('{"step_tag_id": -3}', "step_tag_id must be a positive integer"),
    ('{"returned_token_ids": []}', "returned_token_ids must be a list of token ids"),
])
def test_pooler_config_errors_are_usage_errors(value, message, capsys):
    with pytest.raises(SystemExit) as info:
        parse("--pooler-config", value)
    assert info.value.code == 2
    assert message in capsys.readouterr().err


def test_pooler_config_per_model():
    cfg = parse("--model", "a=/x", "--model", "b=/y", "--pooler-config", '{"normalize": false}',
                "--pooler-config", 'b={"pooling_type": "mean", "normalize": true}')
    assert cfg.pooler_config("a") == PoolerConfig(normalize=False)
    assert cfg.pooler_config("b") == PoolerConfig(pooling_type=PoolingType.MEAN, normalize=True)
    with pytest.raises(ConfigError, match="names model 'c', which is not served"):
        ServerConfig(models=(ModelSpec("/x", "a"),),
                     pooler_configs=(PoolerOverride.parse('c={"normalize": true}'),))


@pytest.mark.parametrize("source,name", [
    (BUNDLED_MODEL, "all-MiniLM-L6-v2"),
    ("BAAI/bge-reranker-v2-m3", "bge-reranker-v2-m3"),
    ("/opt/models/bge-small/model", "bge-small"),
    ("/cache/models--BAAI--bge-small-en-v1.5/snapshots/" + "0" * 40, "bge-small-en-v1.5"),
    ("./e5-base/", "e5-base"),
])
def test_default_model_names_name_the_model(source, name):
    """A directory is served by the component that names the model, not by `model` or a hub
    cache's snapshot hash."""
    assert ModelSpec(source).name == name


def test_the_bundled_model_answers_to_its_listed_name(tmp_path, monkeypatch):
    """`--model all-MiniLM-L6-v2` (the name ListModels shows) serves the bundled copy, offline."""
    from poolsvc.engine.loader import resolve

    monkeypatch.chdir(tmp_path)  # no directory of that name here
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    bundled, _ = resolve(BUNDLED_MODEL, allow_pickle=False)
    assert resolve("all-MiniLM-L6-v2", allow_pickle=False)[0] == bundled
    assert resolve("sentence-transformers/all-MiniLM-L6-v2", allow_pickle=False)[0] == bundled
