"""Prompt sets: the text conditions of a text-to-image run, read from the user's file or the command line.

Formats (by the file's suffix; `prompts.column` names the column where the format has columns):
- `.txt`: one prompt a line (blank lines skipped);
- `.csv` / `.tsv`: a header row and a named column (DrawBench's CSV: `Prompts`; PartiPrompts' TSV: `Prompt`);
- `.jsonl`: one JSON object a line, a named key (GenEval's `evaluation_metadata.jsonl`: `prompt`);
- `.json`: a COCO captions annotation file (`captions_val2014.json`: `annotations[i].caption`); with `prompts.n`
  a seeded subset of n captions (COCO-30k: n=30000), drawn without replacement by numpy's generator of
  `prompts.subset_seed`, kept in the file's order.
`prompts.list` (on the command line), when given, is the set: the file (a model's default one) is then not read.
`prompts.n` takes a seeded subset of any format. A negative prompt is one for the whole run (`negative_prompt`), a
column of the file (`negative_column`), or none (each family's null: the empty prompt, or SDXL's zeros).

None of the public sets can be downloaded on a machine without internet: docs/text-to-image.md says where each
comes from. The project ships its own small set (diffguide/data/smoke_prompts.txt) for smoke runs.
"""

import csv
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from diffguide.errors import UserError

_COLUMNS = {".csv": ",", ".tsv": "\t"}
_FORMATS = (".txt", ".csv", ".tsv", ".jsonl", ".json")


@dataclass(frozen=True)
class PromptSet:
    """The prompts of a run in order, each with its negative prompt (None: the family's null condition)."""

    prompts: tuple[str, ...]
    negatives: tuple[str | None, ...]
    source: str = "list"

    def __len__(self) -> int:
        return len(self.prompts)

    @property
    def digest(self) -> str:
        """sha256 of the prompts and negative prompts, in order: two runs with equal digests saw the same set."""
        blob = json.dumps([list(self.prompts), list(self.negatives)], ensure_ascii=False).encode()
        return hashlib.sha256(blob).hexdigest()[:16]


def shipped(name: str) -> str:
    """The path of a prompt file the project ships in diffguide/data (resolver `dg.data`)."""
    return str(Path(__file__).with_name(name))


def _read_text(path: Path, key: str) -> str:
    if not path.exists():
        raise UserError(f"{key}={path}: no such file")
    if path.is_dir():
        raise UserError(f"{key}={path}: a folder, not a prompt file")
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise UserError(f"{key}={path}: not UTF-8 text") from None
    except OSError as exc:
        raise UserError(f"{key}={path}: cannot be read ({exc.strerror or type(exc).__name__})") from None


def _rows(path: Path, text: str) -> tuple[list[dict], list[str]]:
    """The file's records and its column names (.csv/.tsv/.jsonl)."""
    if path.suffix in _COLUMNS:
        reader = csv.DictReader(text.splitlines(), delimiter=_COLUMNS[path.suffix])
        rows = list(reader)
        return rows, list(reader.fieldnames or [])
    rows = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            raise UserError(f"prompts.file={path}: line {number} is not JSON") from None
        if not isinstance(row, dict):
            raise UserError(f"prompts.file={path}: line {number} is not a JSON object")
        rows.append(row)
    return rows, sorted({k for row in rows for k in row})


def _column(rows: list[dict], names: list[str], column: str | None, path: Path, key: str) -> list:
    if column is None:
        raise UserError(f"{key} is needed for {path.name}: name one of its columns ({', '.join(names) or 'none'})")
    if column not in names:
        raise UserError(f"{key}={column}: {path.name} has no such column (it has {', '.join(names) or 'none'})")
    return [row.get(column) for row in rows]


def _coco(path: Path, text: str) -> list[str]:
    try:
        data = json.loads(text)
        captions = [a["caption"] for a in data["annotations"]]
    except (json.JSONDecodeError, KeyError, TypeError):
        raise UserError(f"prompts.file={path}: not a COCO captions file (annotations[i].caption)") from None
    return captions


def load(file: str | None = None, list: list | None = None, column: str | None = None,  # noqa: A002 (config key)
         negative_column: str | None = None, negative_prompt: str | None = None, n: int | None = None,
         subset_seed: int = 0, **_) -> PromptSet:
    """The prompt set a `prompts` config describes (conf/prompts/*.yaml); every mistake one line (UserError)."""
    if file is None and list is None:
        raise UserError("a text-to-image model needs prompts: prompts=smoke (the project's own set), "
                        "prompts.file=PATH, or 'prompts.list=[a photo of a cat,...]'")
    if list is not None and (isinstance(list, (str, bytes)) or not all(isinstance(p, str) for p in list)):
        raise UserError(f"prompts.list must be a list of prompts: 'prompts.list=[a photo of a cat,a red bus]' "
                        f"(got {list!r})")
    if negative_prompt is not None and not isinstance(negative_prompt, str):
        raise UserError(f"prompts.negative_prompt must be text (got {negative_prompt!r})")
    if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 1):
        raise UserError(f"prompts.n must be a whole number >= 1, or null for the whole set (got {n!r})")
    negatives = None
    if list is not None:
        prompts, source = [str(p) for p in list], "list"
        if negative_column is not None:
            raise UserError("prompts.negative_column needs a prompts.file with columns")
    else:
        path = Path(str(file)).expanduser()
        if path.suffix not in _FORMATS:
            raise UserError(f"prompts.file={path}: use a .txt (one prompt a line), .csv, .tsv, .jsonl, or a COCO "
                            f"captions .json")
        text = _read_text(path, "prompts.file")
        source = str(path)
        if path.suffix == ".txt":
            prompts = [line.strip() for line in text.splitlines() if line.strip()]
        elif path.suffix == ".json":
            prompts = _coco(path, text)
        else:
            rows, names = _rows(path, text)
            prompts = _column(rows, names, column, path, "prompts.column")
            if negative_column is not None:
                negatives = _column(rows, names, negative_column, path, "prompts.negative_column")
        bad = [i for i, p in enumerate(prompts) if not isinstance(p, str) or not p.strip()]
        if bad and path.suffix != ".txt":
            raise UserError(f"prompts.file={path}: {len(bad)} empty or non-text prompt(s) (first: record "
                            f"{bad[0] + 1})")
    if not prompts:
        raise UserError(f"prompts: {source} holds no prompts")
    if negatives is None:
        negatives = [negative_prompt] * len(prompts)
    else:
        if negative_prompt is not None:
            raise UserError("give prompts.negative_prompt or prompts.negative_column, not both")
        negatives = [v if isinstance(v, str) and v.strip() else None for v in negatives]
    if n is not None:
        if n > len(prompts):
            raise UserError(f"prompts.n={n}: {source} holds only {len(prompts)} prompts")
        keep = np.sort(np.random.default_rng(subset_seed).choice(len(prompts), n, replace=False))
        prompts, negatives = [prompts[i] for i in keep], [negatives[i] for i in keep]
    return PromptSet(tuple(prompts), tuple(negatives), source)


def given(node) -> bool:
    """Whether a `prompts` config names any prompts (prompts=none leaves both null)."""
    return node is not None and (node.get("file") is not None or node.get("list") is not None)


def as_set(node) -> PromptSet:
    """A model's `prompts` argument as a PromptSet: Hydra gives the instantiated set (the model config's
    `prompts: ${prompts}` names the group's `_target_`); a plain mapping of the group's keys is loaded here."""
    if isinstance(node, PromptSet):
        return node
    from omegaconf import DictConfig, OmegaConf

    if isinstance(node, DictConfig):
        node = OmegaConf.to_container(node, resolve=True)
    keys = {k: v for k, v in dict(node or {}).items() if k != "_target_"}
    return load(**keys)
