"""Encode text corpora into GPTSAN tfrecords (`gptsan-encode`, `tools/make_tfrecord_simple.py`).

Inputs: a glob of UTF-8 text files (local or gs://), or a list file named exactly (not matched by a glob):
a CSV list (a `.csv` file, or any file whose first line starts with `filename,`) with header
`filename,fileid` naming files and their class ids, or the original's plain list, whose first line names an
existing file: one file name a line, optionally followed by white space and its class id (the original
meant to read it, but its branch was broken). Listed names are looked up beside the list first, then from
the working directory.
The name of an existing file is taken literally, `[`, `*` or `?` in it or not (`doc[1].txt`, `list [v2].csv`):
a glob only when no file has that exact name (`storage.glob`). One file is one document;
`i` is its CSV `fileid`, else its position in the sorted list of inputs (the original numbered records
instead; one number per file keeps a document's records together, e.g. for `stateless_uniform` spouts).
How a document becomes records: `gptsan.data.layout`.

Parallel and deterministic: the file list is shuffled with `--seed` and split over `--num_process` worker
processes (at most one per file); worker `p` writes `{mode}_{p:04d}.tfrecord` (a worker that wrote no record,
its files all skipped or blank, leaves no file, and the files after it are numbered on without a gap). Each
document draws its random choices (hybrid prefixes, masks, leads) from its own generator, seeded with `seed`
and the document's position in the input list, so its records do not depend on which worker encodes it: the
process count changes how the records are split into files, not which records there are (but for
`--use_nextsent`, whose unrelated leads come from the worker's earlier documents). Workers used to draw from
`seed + p`: the default `--num_process` (the machine's core count, at most 8) changed the corpus a hybrid or
mlm encoding gave, and worker 1 of seed 0 drew what worker 0 of seed 1 did. The same inputs, seed and
process count give byte-identical files. Each worker writes to a temporary name; only when every worker
succeeded are the files renamed (or, for a gs:// `--output_dir`, uploaded with fsspec), so a failed run
leaves no tfrecord behind. Files of the same mode that an earlier encoding left there beyond the ones
written are then removed, with a warning line: the folder's `{mode}_*.tfrecord` is this corpus only.
Files are read whole, as UTF-8 (a leading BOM is dropped); a file that is not UTF-8 stops the run with its
name, or is skipped and counted with `--skip_bad_files`.
"""

from __future__ import annotations

import argparse
import csv
import os
import re
import shutil
import sys
import tempfile
import uuid
from dataclasses import dataclass, field

import numpy as np

from gptsan import storage
from gptsan.data.layout import MIN_CONTEXT, MODES, DocumentEncoder, LayoutSettings
from gptsan.data.schema import frame, serialize_example
from gptsan.errors import UserError, cli_main, path_error, warn
from gptsan.seed import seed_flag
from gptsan.tokenizer import KINDS, load_tokenizer

DEFAULT_VOCABULARY = "ja-swe36k.txt"
LIST_HEAD_BYTES = 4096  # what _list_kind reads of a file to tell a list from a document
LISTED_LINES_LOOKED_AT = 20
MAX_LISTED_NAME = 1024  # a longer line is text (GCS object names end at 1024 bytes, Linux paths at 4096)


@dataclass(frozen=True)
class TokenizerSpec:
    kind: str
    path: str
    emoji_file: str | None = None

    def load(self):
        return load_tokenizer(self.kind, self.path, emoji_file=self.emoji_file)


@dataclass(frozen=True)
class InputFile:
    path: str
    class_id: int
    index: int = 0  # position in the list of inputs: seeds the document's random choices


@dataclass(frozen=True)
class WorkerJob:
    proc: int
    files: tuple[InputFile, ...]
    tokenizer: TokenizerSpec
    layout: LayoutSettings
    seed: int
    out_path: str
    skip_bad_files: bool


@dataclass
class WorkerSummary:
    proc: int
    records: int = 0
    tokens: int = 0
    skipped: list[str] = field(default_factory=list)


# ---- inputs -------------------------------------------------------------------------------------------


def list_inputs(spec: str) -> list[InputFile]:
    kind = _list_kind(spec)
    if kind == "csv":
        return _inputs_from_csv(spec)
    if kind == "plain":
        return _inputs_from_plain_list(spec)
    paths = storage.glob(spec)
    if not paths:
        hint = f" ({spec} is a folder: give a pattern such as {storage.join(spec, '*.txt')})" \
            if storage.isdir(spec) else ""
        raise UserError(f"--input_files: no file matches {spec!r}{hint}")
    return [InputFile(path, class_id, class_id) for class_id, path in enumerate(paths)]


def _list_kind(spec: str) -> str | None:
    """Which list `spec` is: "csv" for a file named exactly `spec` (glob characters and all, as
    `storage.glob` takes it) that is a `.csv` or whose first line starts with `filename,` (the original's
    test); "plain" for one where any of the first LISTED_LINES_LOOKED_AT non-blank lines names an existing
    file (beside the list or from the working directory), alone or followed by a class id (the original's list
    file); None otherwise: `spec` is a glob of documents, or one document. Not the first line alone: a list
    whose first name was misspelt (or whose first class id was not a number) was encoded as a document, its
    file names the corpus, with no word; now its reading stops at that line."""
    if not storage.exists(spec) or storage.isdir(spec):
        return None
    if spec.lower().endswith(".csv"):
        return "csv"
    with storage.open_file(spec, "rb") as f:
        head = f.read(LIST_HEAD_BYTES)
    text = head.decode("utf-8-sig", errors="replace")
    if text.startswith("filename,"):
        return "csv"
    lines = text.splitlines()[:-1] if len(head) == LIST_HEAD_BYTES else text.splitlines()  # the last, cut by the read
    lines = [line for line in lines if line.strip()][:LISTED_LINES_LOOKED_AT]
    named = (len(line) <= MAX_LISTED_NAME and _listed_entry(spec, line) is not None for line in lines)
    return "plain" if any(named) else None


def _listed_entry(list_path: str, line: str) -> tuple[str, str | None] | None:
    """(the file a plain list's `line` names, the text after it or None), or None when it names no existing file.
    The text after the name is its class id, unchecked here."""
    line = line.strip()
    parts = line.rsplit(None, 1)
    candidates = [(line, None)] + ([(parts[0], parts[1])] if len(parts) == 2 else [])
    for name, class_id in candidates:
        found = _existing_listed(list_path, name) if name else None
        if found is not None:
            return found, class_id
    return None


def _inputs_from_plain_list(list_path: str) -> list[InputFile]:
    inputs = []
    for line_number, line in enumerate(read_document(list_path), start=1):
        if not line.strip():
            continue
        entry = _listed_entry(list_path, line)
        if entry is None:
            raise UserError(f"{list_path}:{line_number}: {line.strip()} not found (a list file names one existing "
                            f"file a line, optionally followed by its integer class id)")
        path, class_text = entry
        if class_text is None:
            class_id = len(inputs)
        elif re.fullmatch(r"-?[0-9]+", class_text) and -(2**63) <= int(class_text) < 2**63:
            class_id = int(class_text)
        else:
            raise UserError(f"{list_path}:{line_number}: the class id must be an integer (int64), got {class_text!r}")
        inputs.append(InputFile(path, class_id, len(inputs)))
    return inputs


def _inputs_from_csv(csv_path: str) -> list[InputFile]:
    rows = list(csv.reader(read_document(csv_path)))
    header = [name.strip() for name in rows[0]] if rows else []
    if "filename" not in header or "fileid" not in header:
        got = ",".join(header)
        raise UserError(f"{csv_path}: expected a header with columns filename,fileid, got {got!r}")
    name_col, id_col = header.index("filename"), header.index("fileid")
    inputs = []
    for line_number, row in enumerate(rows[1:], start=2):
        if not any(cell.strip() for cell in row):
            continue
        if len(row) <= max(name_col, id_col):
            raise UserError(f"{csv_path}:{line_number}: expected filename,fileid, got {','.join(row)!r}")
        name, class_id = row[name_col].strip(), row[id_col].strip()
        if not re.fullmatch(r"-?[0-9]+", class_id) or not -(2**63) <= int(class_id) < 2**63:
            raise UserError(f"{csv_path}:{line_number}: fileid must be an integer (int64), got {class_id!r}")
        inputs.append(InputFile(_resolve_listed(csv_path, name, line_number), int(class_id), len(inputs)))
    if not inputs:
        raise UserError(f"{csv_path}: no files listed")
    return inputs


def _resolve_listed(csv_path: str, name: str, line_number: int) -> str:
    found = _existing_listed(csv_path, name)
    if found is None:
        candidates = _listed_candidates(csv_path, name)
        if any(storage.isdir(c) for c in candidates):
            raise UserError(f"{csv_path}:{line_number}: {name} is a folder; a list names files")
        raise UserError(f"{csv_path}:{line_number}: {name} not found (looked for {' and '.join(candidates)})")
    return found


def _listed_candidates(list_path: str, name: str) -> list[str]:
    """Where a list's `name` may be: beside the list first, then from the working directory."""
    if storage.is_remote(name) or os.path.isabs(name):
        return [name]
    base = list_path.rsplit("/", 1)[0] if storage.is_remote(list_path) else os.path.dirname(list_path)
    return list(dict.fromkeys([storage.join(base, name), name]))  # one, for a list in the working directory


def _existing_listed(list_path: str, name: str) -> str | None:
    """The existing file a list names `name` (`_listed_candidates`)."""
    return next((c for c in _listed_candidates(list_path, name) if storage.exists(c) and not storage.isdir(c)), None)


class NotUTF8Error(UserError):
    pass


def read_document(path: str) -> list[str]:
    """The lines of a UTF-8 text file (CR LF and CR count as line ends)."""
    try:
        data = storage.read_bytes(path)
    except FileNotFoundError:
        raise UserError(f"{path}: file not found") from None
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        bad = f"byte 0x{data[err.start]:02x} at offset {err.start}"
        raise NotUTF8Error(f"{path}: not UTF-8 ({bad})") from None
    lines = text.replace("\r\n", "\n").replace("\r", "\n").split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    return lines


# ---- one worker ---------------------------------------------------------------------------------------


def encode_files(job: WorkerJob, report=lambda nbytes: None, tokenizer=None) -> WorkerSummary:
    """Encode `job.files` into `job.out_path`; `report(nbytes)` after each file. Removes the file on error."""
    summary = WorkerSummary(job.proc)
    tokenizer = tokenizer or job.tokenizer.load()
    encoder = DocumentEncoder(tokenizer, job.layout, np.random.default_rng(job.seed))
    pad_id = encoder.tok.pad_id
    try:
        with open(job.out_path, "wb") as out:
            for item in job.files:
                try:
                    lines = read_document(item.path)
                except NotUTF8Error:
                    if not job.skip_bad_files:
                        raise
                    summary.skipped.append(item.path)
                    continue
                if any(line.strip() for line in lines):
                    encoder.rng = np.random.default_rng([job.seed, item.index])
                    for x, y, num_input in encoder.records(lines):
                        features = {"x": x, "y": y, "i": [item.class_id], "num_input": [num_input]}
                        out.write(frame(serialize_example(features)))
                        summary.records += 1
                        summary.tokens += int(np.count_nonzero(x != pad_id))
                report(_size(item.path))
    except BaseException:
        _remove_quietly(job.out_path)
        raise
    return summary


def _size(path: str) -> int:
    fs, p = storage.filesystem(path)
    return int(fs.size(p) or 0)


def _remove_quietly(path: str) -> None:
    try:
        os.remove(path)
    except FileNotFoundError:
        pass


def _worker_entry(job: WorkerJob, messages) -> None:
    """Body of a worker process: progress, the summary or the error go back through `messages` (a pipe)."""
    try:
        summary = encode_files(job, report=lambda nbytes: messages.send(("progress", job.proc, nbytes)))
        messages.send(("done", job.proc, summary))
    except UserError as err:
        messages.send(("user_error", job.proc, str(err)))
    except OSError as err:  # a path the system refused: the one line cli_main gives it in one process
        if err.filename is None:
            messages.send(("crash", job.proc, _crash_text(err)))
        else:
            messages.send(("user_error", job.proc, path_error(err)))
    except BaseException as err:  # a bug: hand the parent the text, it re-raises
        messages.send(("crash", job.proc, _crash_text(err)))


def _crash_text(err: BaseException) -> str:
    import traceback

    return f"{type(err).__name__}: {err}\n{traceback.format_exc()}"


# ---- the run ------------------------------------------------------------------------------------------


MAX_CONTEXT = 1 << 20  # GPTSAN's is 1280; a record of 2^20 tokens is 16 MiB in each of x and y


@dataclass(frozen=True)
class EncodeConfig:
    input_files: str
    tokenizer: TokenizerSpec
    layout: LayoutSettings
    output_dir: str = "."
    num_process: int = 1
    seed: int = 0
    skip_bad_files: bool = False
    progress: bool = True

    def validate(self) -> None:
        s = self.layout
        if s.mode not in MODES:
            raise UserError(f"--mode: expected one of {', '.join(MODES)}, got {s.mode!r}")
        if s.num_context < MIN_CONTEXT:
            raise UserError(
                f"--num_context: must be at least {MIN_CONTEXT} (start, segmenter and end tokens, "
                f"a lead sentence and text), got {s.num_context}"
            )
        if s.num_context > MAX_CONTEXT:
            raise UserError(f"--num_context: at most {MAX_CONTEXT} tokens per record, got {s.num_context}")
        if not 0.0 <= s.num_mask <= 1.0:
            raise UserError(f"--num_mask: expected a rate in [0, 1], got {s.num_mask}")
        if s.max_mask < 0:
            raise UserError(f"--max_mask: expected a count >= 0, got {s.max_mask}")
        if not 0.0 <= s.hybrid_rate <= 1.0:
            raise UserError(f"--hybrid_rate: expected a rate in [0, 1], got {s.hybrid_rate}")
        if self.num_process < 1:
            raise UserError(f"--num_process: expected at least 1, got {self.num_process}")
        if not storage.is_remote(self.output_dir) and os.path.exists(self.output_dir) \
                and not os.path.isdir(self.output_dir):
            raise UserError(f"--output_dir {self.output_dir}: is a file; give a folder")
        storage.check_output_parent(self.output_dir, "--output_dir")


def run(config: EncodeConfig) -> list[WorkerSummary]:
    """Encode the corpus; returns one summary per worker. Raises UserError, leaving no tfrecord behind."""
    config.validate()
    tokenizer = config.tokenizer.load()  # a bad vocabulary fails here, once, before any worker starts
    inputs = list_inputs(config.input_files)
    order = np.random.default_rng(config.seed).permutation(len(inputs))
    shards = [s for s in np.array_split(order, min(config.num_process, len(inputs))) if len(s)]
    remote = storage.is_remote(config.output_dir)
    staging = tempfile.mkdtemp(prefix="gptsan-encode-") if remote else config.output_dir
    made = [] if remote else _missing_folders(staging)
    try:
        os.makedirs(staging, exist_ok=True)
    except OSError as err:  # below a file, in /proc, no permission: name the flag
        raise UserError(f"--output_dir {path_error(err)}") from None
    run_tag = uuid.uuid4().hex[:8]
    jobs = [
        WorkerJob(
            proc, tuple(inputs[k] for k in shard), config.tokenizer, config.layout, config.seed,
            os.path.join(staging, f".{config.layout.mode}_{proc:04d}.tfrecord.partial-{run_tag}"),
            config.skip_bad_files,
        )
        for proc, shard in enumerate(shards)
    ]
    total_bytes = sum(_size(item.path) for item in inputs)
    try:
        summaries = _run_jobs(jobs, total_bytes, config.progress, tokenizer)
        if sum(s.records for s in summaries) == 0:
            skipped = sum(len(s.skipped) for s in summaries)
            raise UserError(f"--input_files: no text in the {len(inputs)} file(s) of {config.input_files!r}"
                            + (f" ({skipped} skipped as not UTF-8)" if skipped else ""))
        written = [job for job, summary in zip(jobs, summaries, strict=True) if summary.records]
        finals = [f"{config.layout.mode}_{n:04d}.tfrecord" for n in range(len(written))]
        _publish(written, finals, config.output_dir, remote)
        _remove_earlier_encoding(config.output_dir, config.layout.mode, finals)
    finally:
        for job in jobs:
            _remove_quietly(job.out_path)
        if remote:
            shutil.rmtree(staging, ignore_errors=True)
        for folder in made:  # a failed run leaves no empty folder either
            if not os.listdir(folder):
                os.rmdir(folder)
    return summaries


def _run_jobs(jobs: list[WorkerJob], total_bytes: int, progress: bool, tokenizer) -> list[WorkerSummary]:
    from tqdm import tqdm

    with tqdm(total=total_bytes, unit="B", unit_scale=True, desc="encode", file=sys.stderr,
              disable=not progress) as bar:
        if len(jobs) == 1:
            return [encode_files(jobs[0], report=bar.update, tokenizer=tokenizer)]
        return _run_in_processes(jobs, bar)


def _run_in_processes(jobs: list[WorkerJob], bar) -> list[WorkerSummary]:
    """One spawned process a job, each reporting through its own pipe (a multiprocessing.Queue's named
    semaphores outlived a Ctrl-C, which ends the tool with os._exit, and the resource tracker warned about
    them after the `interrupted` line)."""
    import multiprocessing
    from multiprocessing.connection import wait

    context = multiprocessing.get_context("spawn")  # safe whatever the parent imported (TensorFlow, JAX)
    pipes = [context.Pipe(duplex=False) for _ in jobs]
    workers = [context.Process(target=_worker_entry, args=(job, sender), daemon=True)
               for job, (_, sender) in zip(jobs, pipes, strict=True)]
    for worker, (_, sender) in zip(workers, pipes, strict=True):
        worker.start()
        sender.close()  # the worker's end: its pipe reads end-of-file when the worker is gone
    receivers = {receiver: proc for proc, (receiver, _) in enumerate(pipes)}
    summaries: dict[int, WorkerSummary] = {}
    try:
        while len(summaries) < len(jobs):
            for receiver in wait(list(receivers), timeout=1.0):
                try:
                    kind, proc, payload = receiver.recv()
                except EOFError:
                    worker = workers[receivers[receiver]]
                    worker.join()
                    raise RuntimeError(f"an encoder worker died (exit code {worker.exitcode})") from None
                if kind == "progress":
                    bar.update(payload)
                elif kind == "done":
                    summaries[proc] = payload
                    del receivers[receiver]
                elif kind == "user_error":
                    raise UserError(payload)
                else:
                    raise RuntimeError(f"encoder worker {proc} failed: {payload}")
    finally:
        for worker in workers:
            if worker.is_alive():
                worker.terminate()
            worker.join()
        for receiver, _ in pipes:
            receiver.close()
    return [summaries[k] for k in range(len(jobs))]


def _missing_folders(path: str) -> list[str]:
    """The folders `os.makedirs(path)` would make, the deepest first."""
    missing, path = [], os.path.abspath(path)
    while not os.path.exists(path):
        missing.append(path)
        path = os.path.dirname(path)
    return missing


def _remove_earlier_encoding(output_dir: str, mode: str, finals: list[str]) -> None:
    """Removes `{mode}_NNNN.tfrecord` files beyond `finals` that an earlier encoding left in `output_dir` (with
    fewer workers now, or fewer files that gave records), so that `{mode}_*.tfrecord` there is this corpus only:
    a training glob used to read the earlier corpus's surplus files with the new ones. The folder is listed, not
    globbed, so that a folder name with `[` `]` in it is taken literally."""
    names = [name for name in storage.folder_names(output_dir)
             if re.fullmatch(rf"{re.escape(mode)}_\d{{4}}\.tfrecord", name) and name not in finals]
    if not names:
        return
    fs, _ = storage.filesystem(output_dir)
    for name in names:
        fs.rm(storage.join(output_dir, name))
    warn(f"--output_dir {output_dir}: removed {len(names)} file(s) of an earlier {mode} encoding "
         f"({', '.join(names[:3])}{' ...' if len(names) > 3 else ''}) so that {mode}_*.tfrecord there is this "
         f"corpus only")


def _publish(jobs: list[WorkerJob], finals: list[str], output_dir: str, remote: bool) -> None:
    for job, name in zip(jobs, finals, strict=True):
        if remote:
            fs, base = storage.filesystem(output_dir)
            try:
                fs.put_file(job.out_path, f"{base.rstrip('/')}/{name}")
            except OSError as err:  # gcsfs's name an upload URL (a bucket deleted meanwhile): a traceback
                raise UserError(f"--output_dir {output_dir}: {storage.remote_failure(output_dir, err)}") from None
        else:
            os.replace(job.out_path, os.path.join(output_dir, name))


# ---- command line -------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="gptsan-encode", description=__doc__.split("\n\n")[0])
    p.add_argument("--input_files", required=True,
                   help="glob of text files, a CSV with filename,fileid, or a list file (a file name a line, "
                        "optionally followed by its class id)")
    p.add_argument("--mode", default="lm", help="lm | hybrid | mlm")
    p.add_argument("--no_offset_mlm", action="store_true", help="mask targets at the masked position itself")
    p.add_argument("--tokenizer", default="swe", help=" | ".join(KINDS))
    p.add_argument("--vocabulary", default=None,
                   help=f"ja-swe36k.txt (swe; default: {DEFAULT_VOCABULARY} in the working directory, as the "
                        "original's) or a .model file (sentencepiece)")
    p.add_argument("--emoji", default=None, help="emoji.json (swe; default: beside the vocabulary)")
    p.add_argument("--num_process", type=int, default=min(8, os.cpu_count() or 1))
    p.add_argument("--num_context", type=int, default=1280)
    p.add_argument("--num_mask", type=float, default=0.08, help="mask rate in the prefix")
    p.add_argument("--max_mask", type=int, default=100, help="most masks per record")
    p.add_argument("--use_nextsent", action="store_true", help="lead sentence with a next-sentence target")
    p.add_argument("--hybrid_rate", type=float, default=1.0, help="share of hybrid records with a prefix")
    p.add_argument("--output_dir", default=".", help="local folder or gs:// prefix")
    p.add_argument("--seed", type=seed_flag, default=0)
    p.add_argument("--skip_bad_files", action="store_true", help="skip (and count) files that are not UTF-8")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def config_from_args(args: argparse.Namespace) -> EncodeConfig:
    vocabulary = args.vocabulary
    if vocabulary is None:
        if args.tokenizer != "swe":
            raise UserError(f"--vocabulary: required with --tokenizer {args.tokenizer} (its .model file)")
        if not storage.exists(DEFAULT_VOCABULARY):
            raise UserError(f"--vocabulary: not given, and its default {DEFAULT_VOCABULARY} is not in the working "
                            f"directory {os.getcwd()}; give --vocabulary PATH")
        vocabulary = DEFAULT_VOCABULARY
    if args.no_offset_mlm and args.mode != "mlm":
        warn(f"--no_offset_mlm applies to --mode mlm only (as in GPTSAN): the {args.mode} records keep each "
             f"target at the position before its mask")
    layout = LayoutSettings(
        mode=args.mode, num_context=args.num_context, num_mask=args.num_mask, max_mask=args.max_mask,
        use_nextsent=args.use_nextsent, hybrid_rate=args.hybrid_rate, no_offset_mlm=args.no_offset_mlm,
    )
    return EncodeConfig(
        input_files=args.input_files, tokenizer=TokenizerSpec(args.tokenizer, vocabulary, args.emoji),
        layout=layout, output_dir=args.output_dir, num_process=args.num_process, seed=args.seed,
        skip_bad_files=args.skip_bad_files, progress=not args.quiet,
    )


@cli_main
def main(argv: list[str] | None = None) -> int:
    config = config_from_args(build_parser().parse_args(argv))
    summaries = run(config)
    records, tokens = sum(s.records for s in summaries), sum(s.tokens for s in summaries)
    skipped = [path for s in summaries for path in s.skipped]
    files = sum(1 for s in summaries if s.records)
    print(f"wrote {records} records ({tokens} tokens) in {files} file(s) to {config.output_dir}",
          file=sys.stderr)
    if skipped:
        print(f"skipped {len(skipped)} file(s) that are not UTF-8: {', '.join(skipped)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
