"""The `poolsvc` command line: `serve` generated from ServerConfig, `run-batch` from
BatchConfig."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import logging
import os
import sys

from poolsvc import __version__
from poolsvc.batch.config import BatchConfig
from poolsvc.config import ConfigError, ServerConfig
from poolsvc.engine.config import REMOVED


def _flag_type(parse):
    """argparse shows a ConfigError's own message instead of 'invalid value'."""
    def convert(text: str):
        try:
            return parse(text)
        except ConfigError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None
    convert.__name__ = parse.__name__
    return convert


class _Removed(argparse.Action):
    """A flag that no longer exists: using it stops with what to use instead."""

    def __call__(self, parser, namespace, values, option_string=None):
        parser.error(f"{option_string}: " + REMOVED[self.dest].format(dtype="--dtype"))


def _flag(name: str) -> str:
    """The command-line flag derived from an option's name (a config field may name another
    in its metadata)."""
    return "--" + name.replace("_", "-")


def _add_config_flags(parser: argparse.ArgumentParser, config: type = ServerConfig) -> None:
    for name in REMOVED:
        parser.add_argument(_flag(name), dest=name, action=_Removed, nargs="?",
                            default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    for f in dataclasses.fields(config):
        meta = f.metadata
        flag = meta.get("flag", _flag(f.name))
        if meta.get("required"):
            parser.add_argument(meta["short"], flag, dest=f.name, required=True,
                                metavar=meta.get("metavar"), help=meta["help"])
        elif "repeat" in meta:
            parser.add_argument(flag, dest=f.name, action="append", type=_flag_type(meta["repeat"]),
                                metavar=meta.get("metavar"), help=meta["help"])
        elif isinstance(f.default, bool):
            parser.add_argument(flag, dest=f.name, action="store_true", help=meta["help"])
        else:
            parser.add_argument(flag, dest=f.name, type=type(f.default), default=f.default,
                                choices=meta.get("choices"),
                                help=f"{meta['help']} (default: {f.default})")


DESCRIPTION = """\
Serve pooling models over gRPC: embeddings (text and image), classification, sentence-pair
scores and reranking, per-token outputs and rewards, with vLLM's pooling semantics."""

EPILOG = f"""\
examples:
  poolsvc serve                  the bundled default model on {ServerConfig().address}
  poolsvc serve --model BAAI/bge-m3 --model rerank=BAAI/bge-reranker-v2-m3
  poolsvc serve --http-port 8000 also the OpenAI, vLLM and Cohere JSON routes (docs/http.md)
  poolsvc serve --help           every serving flag, with its default
  poolsvc run-batch -i corpus.jsonl -o vectors.npy
                                 embed a corpus in this process (resumable)

The RPCs, health and reflection are described in the README and in protos/poolsvc/v1/."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="poolsvc", description=DESCRIPTION, epilog=EPILOG,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"poolsvc {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    serve = sub.add_parser("serve", help="serve models over gRPC (health and reflection on)",
                           description="Serve pooling models over gRPC (health and reflection on).")
    _add_config_flags(serve)
    batch = sub.add_parser(
        "run-batch", help="embed (or score, classify) a whole file in this process, resumably",
        description="Run an OpenAI batch file (as vLLM's run-batch), or embed every text of a "
        "JSON lines, text or Parquet file into .npy or Parquet, in this process. Killed at any "
        "point, the same command continues where it stopped.")
    _add_config_flags(batch, BatchConfig)
    return parser


def config_from_args(args: argparse.Namespace, config: type = ServerConfig):
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(config)}
    for f in dataclasses.fields(config):  # repeatable flags
        if "repeat" in f.metadata:
            if values[f.name] is None:
                del values[f.name]
            else:
                values[f.name] = tuple(values[f.name])
    return config(**values)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "run-batch":
        return _run_batch(parser, args)
    try:
        config = config_from_args(args)
    except ConfigError as exc:
        parser.error(str(exc))
    handler = logging.StreamHandler(sys.stderr)
    if config.log_format == "json":
        from poolsvc.service.observability import JsonFormatter
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=config.log_level, handlers=[handler])
    from poolsvc.engine.errors import EngineError
    from poolsvc.service.server import serve
    try:
        stopped_cleanly = asyncio.run(serve(config))
    except (ConfigError, EngineError, RuntimeError) as exc:
        logging.getLogger("poolsvc").error("cannot serve: %s", exc)
        return 1
    if not stopped_cleanly:
        # The device thread is inside a batch nobody waits for; finalizing the interpreter under
        # it would abort (torch's C++ threads), and waiting would break the shutdown bound.
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
    return 0


def _run_batch(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    try:
        config = config_from_args(args, BatchConfig)
    except ConfigError as exc:
        parser.error(str(exc))
    logging.basicConfig(level=config.log_level, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from poolsvc.batch.run import BatchError, run_batch
    from poolsvc.engine.errors import EngineError
    try:
        run_batch(config)
    except (ConfigError, EngineError, BatchError) as exc:
        logging.getLogger("poolsvc.batch").error("run-batch stopped: %s", exc)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
