"""Settings of `poolsvc run-batch`: the engine's (engine/config.py) and the batch's own, each
default written once. The CLI is generated from this dataclass, as `serve`'s is from
ServerConfig, and the settings that change the output make up the resume fingerprint."""

from __future__ import annotations

import dataclasses
import enum
import os
from dataclasses import dataclass

from poolsvc.engine.config import ConfigError, EngineConfig
from poolsvc.engine.config import option as _opt
from poolsvc.engine.params import OutputDType

# What --output-dtype offers: the service's vector dtypes that numpy and Parquet store as such
# (bfloat16 would be raw uint16 bits).
OUTPUT_DTYPES = ("float32", "float16", "int8", "uint8", "binary", "ubinary")


class InputFormat(enum.Enum):
    JSONL = "jsonl"      # one JSON object per line
    TEXT = "txt"         # one text per line
    PARQUET = "parquet"  # a column of texts


class OutputFormat(enum.Enum):
    BATCH_JSONL = "jsonl"  # OpenAI batch output: one response line per request line
    NPY = "npy"            # one vector per input row, row i = input i
    PARQUET = "parquet"    # columns id and embedding


def input_format(path: str) -> InputFormat:
    suffix = os.path.splitext(path)[1].lower()
    if suffix == ".txt":
        return InputFormat.TEXT
    if suffix in (".parquet", ".pq"):
        return InputFormat.PARQUET
    return InputFormat.JSONL


@dataclass(frozen=True)
class BatchConfig(EngineConfig):
    """Settings of `poolsvc run-batch`: the engine's, then the batch's; field help texts become
    the CLI's."""

    input: str = _opt("the input: an OpenAI batch file (.jsonl, one request per line, with a "
                      ".jsonl output), or texts to embed: JSON lines (.jsonl), plain lines "
                      "(.txt) or Parquet (.parquet)", default="",
                      meta={"flag": "--input", "short": "-i", "required": True,
                            "metavar": "INPUT"})
    output: str = _opt("the output: .jsonl (OpenAI batch output, for a batch-file input), .npy "
                       "(row i = input i) or .parquet (columns id, embedding)", default="",
                       meta={"flag": "--output", "short": "-o", "required": True,
                             "metavar": "OUTPUT"})
    field: str = _opt("texts to embed: the JSON key or Parquet column holding the text",
                      default="text")
    id_field: str = _opt("Parquet output: the JSON key or Parquet column copied to the id "
                         "column (default: the row number)", default="")
    output_dtype: str = _opt("texts to embed: the vectors' dtype (engine/compact.py's "
                             "formulas; binary: sign bits packed 8 to a byte, as int8)",
                             default="float32", meta={"choices": OUTPUT_DTYPES})
    dimensions: int = _opt("texts to embed: keep the first N dimensions (Matryoshka models); "
                           "0: all", default=0)
    errors: str = _opt("where bad rows are listed, with their line and reason (default: "
                       "OUTPUT.errors.jsonl)", default="")
    overwrite: bool = _opt("start over: delete an existing output and its progress instead of "
                           "resuming or refusing", default=False)
    chunk_rows: int = _opt("input rows read, computed and committed together (the resume "
                           "granularity)", default=4096)
    progress_seconds: float = _opt("without a terminal, seconds between progress lines on "
                                   "stderr (0: one per chunk)", default=10.0)
    log_level: str = _opt("logging level", default="INFO",
                          meta={"choices": ("DEBUG", "INFO", "WARNING", "ERROR")})

    def __post_init__(self):
        super().__post_init__()
        if not self.input or not self.output:
            raise ConfigError("run-batch needs -i INPUT and -o OUTPUT")
        if not os.path.isfile(self.input):
            raise ConfigError(f"-i {self.input}: no such file")
        if self.output_format is None:
            raise ConfigError(f"-o {self.output}: write .jsonl (for an OpenAI batch file), .npy "
                              "or .parquet (for texts to embed)")
        if os.path.abspath(self.input) == os.path.abspath(self.output):
            raise ConfigError("-o must not be the input file")
        if self.output_dtype not in OUTPUT_DTYPES:
            raise ConfigError(f"--output-dtype must be one of {', '.join(OUTPUT_DTYPES)}")
        if self.chunk_rows < 1:
            raise ConfigError("--chunk-rows must be at least 1")
        if self.dimensions < 0:
            raise ConfigError("--dimensions must be 0 (all) or more")
        if self.progress_seconds < 0:
            raise ConfigError("--progress-seconds must be 0 or more")
        batch = self.output_format is OutputFormat.BATCH_JSONL
        if batch and self.input_format is not InputFormat.JSONL:
            raise ConfigError(f"-o {self.output}: a .jsonl output is OpenAI batch output, for "
                              "an OpenAI batch file (.jsonl) input; for texts to embed write "
                              ".npy or .parquet")
        if batch:
            for name, default in (("output_dtype", "float32"), ("dimensions", 0),
                                  ("id_field", "")):
                if getattr(self, name) != default:
                    raise ConfigError(f"--{name.replace('_', '-')} applies to texts to embed "
                                      "(.npy or .parquet output); a batch file's requests set "
                                      "their own options in each body")
        if self.id_field and self.output_format is OutputFormat.NPY:
            raise ConfigError("--id-field fills a Parquet output's id column; a .npy output's "
                              "row i is input row i")
        if self.id_field and self.input_format is InputFormat.TEXT:
            raise ConfigError("--id-field needs JSON lines or Parquet input; a .txt line has "
                              "only its text")

    @property
    def input_format(self) -> InputFormat:
        return input_format(self.input)

    @property
    def output_format(self) -> OutputFormat | None:
        suffix = os.path.splitext(self.output)[1].lower().lstrip(".")
        return {f.value: f for f in OutputFormat}.get(suffix)

    @property
    def out_dtype(self) -> OutputDType:
        return OutputDType(self.output_dtype)

    @property
    def errors_path(self) -> str:
        return self.errors or self.output + ".errors.jsonl"

    @property
    def checkpoint_path(self) -> str:
        return self.output + ".checkpoint.json"

    def fingerprint_settings(self) -> dict[str, str]:
        """The settings a resumed run must share with the run it continues: every setting that
        changes what a row's output is (not where files go, how often progress is shown, or
        how many rows make a chunk)."""
        skip = {"input", "output", "errors", "overwrite", "chunk_rows", "progress_seconds",
                "log_level", "threads"}
        return {f.name: str(getattr(self, f.name)) for f in dataclasses.fields(self)
                if f.name not in skip}
