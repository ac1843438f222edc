"""gptsan-demo: the whole GPTSAN workflow on a generated sample corpus, in minutes on a CPU.

corpus (3 classes) -> SentencePiece tokenizer -> tfrecords with class ids -> a small base model pretrained
briefly in lm mode -> run_modelconvert --add_extra_stage 2 -> run_training --spout_vector onehot (backbone
frozen) -> run_generate --spout k for each class -> class accuracy of the generations by a keyword classifier
(gptsan/demo/corpus.py: the class whose template keywords occur most often).

The contrast figure ("without spout training") generates with the same spout vectors from the base model, whose
spout network was never trained: the class vector then carries no meaning and accuracy sits near chance (1/3).
Each step runs the same command a user would type (printed before it runs).
"""

from __future__ import annotations

import argparse
import glob
import json
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from gptsan import storage
from gptsan.demo.corpus import CLASS_NAMES, classify, write_corpus
from gptsan.errors import UserError, cli_main
from gptsan.memory import keep_freed_memory
from gptsan.seed import seed_flag

NUM_CONTEXT = 96
CONSOLE_SCRIPTS = {"gptsan.data.encode": "gptsan-encode", "gptsan.train.cli": "gptsan-train",
                   "gptsan.convert.cli": "gptsan-convert", "gptsan.generate.cli": "gptsan-generate"}
NUM_SPOUT = 16


@dataclass(frozen=True)
class DemoSize:
    docs_per_class: int
    vocab_size: int
    pretrain_steps: int
    finetune_steps: int
    samples_per_class: int


FULL = DemoSize(docs_per_class=300, vocab_size=600, pretrain_steps=500, finetune_steps=800, samples_per_class=20)
QUICK = DemoSize(docs_per_class=60, vocab_size=800, pretrain_steps=20, finetune_steps=20, samples_per_class=4)


def base_parameters(output_dir: Path, vocab_size: int, steps: int) -> dict:
    """parameters.json of the small base model (2 Switch layers, 4 experts, d 64)."""
    return {
        "train_params": {"output_dir": str(output_dir), "batch_size": 16, "base_lr": 2e-3,
                         "num_warmup_steps": max(1, steps // 10), "max_to_keep_save": 1,
                         "checkpoint_per_hours": 1, "checkpoint_per_steps": steps},
        "model_params": {"num_contexts": NUM_CONTEXT, "num_switch_layers": 2, "num_ext_layers": 0,
                         "num_hidden": 64, "num_header": 4, "num_experts": 4, "num_pallarelizm": 1,
                         "num_spout": NUM_SPOUT, "num_vocabulary": vocab_size, "train_mode": "lm"},
    }


def tfrecord_glob(folder: Path) -> str:
    """The --input_files glob of the tfrecords in `folder`, whose own `*` and `?` are literal."""
    return glob.escape(str(folder)) + "/*.tfrecord"


class Pipeline:
    def __init__(self, workdir: Path, size: DemoSize, seed: int):
        self.workdir = workdir
        self.size = size
        self.seed = seed
        self.started = time.monotonic()

    def say(self, message: str) -> None:
        print(f"[{time.monotonic() - self.started:6.1f}s] {message}", flush=True)

    def command(self, module: str, *args: str) -> str:
        """Run `python -m module args` (what the console script runs) and show the command a user types."""
        self.say("$ " + " ".join([CONSOLE_SCRIPTS[module], *map(shlex.quote, args)]))
        done = subprocess.run([sys.executable, "-m", module, *args], text=True, capture_output=True)
        if done.returncode != 0:
            sys.stderr.write(done.stderr[-4000:])
            raise UserError(f"demo step failed: {module} exited with {done.returncode}")
        return done.stdout

    def run(self) -> tuple[float, float]:
        w, size = self.workdir, self.size
        self.say(f"writing the sample corpus ({size.docs_per_class} documents per class) to {w / 'corpus'}")
        csv_path = write_corpus(w / "corpus", size.docs_per_class, self.seed)

        from gptsan.tokenizer import load_tokenizer
        from gptsan.tokenizer.sentencepiece import train_sentencepiece

        texts = sorted(str(p) for p in (w / "corpus" / "texts").glob("*.txt"))
        prefix = w / "tokenizer" / "sp"
        # in this process (tools/ is not installed with the package), as this command of a clone does:
        self.say("training a SentencePiece tokenizer, as $ python tools/train_tokenizer.py --input_files "
                 f"{shlex.quote(glob.escape(str(w / 'corpus' / 'texts')) + '/*.txt')} --model_prefix "
                 f"{shlex.quote(str(prefix))} --vocab_size {size.vocab_size}")
        (w / "tokenizer").mkdir()
        sp_model = train_sentencepiece(texts, str(prefix), vocab_size=size.vocab_size)
        vocab_size = load_tokenizer("sentencepiece", sp_model).vocab_size
        tok = ["--tokenizer", "sentencepiece", "--vocabulary", sp_model]

        self.command("gptsan.data.encode", "--input_files", str(csv_path), "--mode", "lm", *tok,
                     "--num_context", str(NUM_CONTEXT), "--num_process", "1", "--output_dir", str(w / "data"),
                     "--seed", str(self.seed), "--quiet")
        records = tfrecord_glob(w / "data")

        base = w / "base"
        base.mkdir(exist_ok=True)
        (base / "parameters.json").write_text(json.dumps(
            base_parameters(base, vocab_size, size.pretrain_steps), indent=1))
        self.say("pretraining the base model briefly in lm mode (fresh initialisation)")
        self.command("gptsan.train.cli", "--input_files", records, "--parameter_file", str(base / "parameters.json"),
                     "--max_training_step", str(size.pretrain_steps), "--seed", str(self.seed), "--no_progress",
                     "--routing", "dropless")

        self.say("generating from the base model for each class's spout vector: its spout network never learned "
                 "the classes (the contrast)")
        untrained = self.accuracy(base, tok, "without spout training")
        finetune = w / "finetune"
        self.say("adding 2 extended stages and a fresh spout network for the class vectors")
        self.command("gptsan.convert.cli", "--checkpoint", str(base), "--output", str(finetune),
                     "--add_extra_stage", "2", "--num_spout", str(NUM_SPOUT), "--seed", str(self.seed))

        self.say("fine-tuning the extended layers and the spout with --spout_vector onehot (backbone frozen)")
        self.command("gptsan.train.cli", "--input_files", records,
                     "--parameter_file", str(finetune / "parameters.json"),
                     "--ignore_parameters", str(finetune / "ignore-params.json"), "--spout_vector", "onehot",
                     "--max_training_step", str(size.finetune_steps), "--seed", str(self.seed), "--no_progress",
                     "--routing", "dropless")
        trained = self.accuracy(finetune, tok, "with spout training")
        self.say(f"everything was written under {w}: corpus/, tokenizer/, data/, base/, finetune/, samples_*.jsonl")
        return trained, untrained

    def accuracy(self, model: Path, tok: list[str], label: str) -> float:
        correct = total = 0
        for class_id, name in enumerate(CLASS_NAMES):
            out = self.workdir / f"samples_{label.split()[0]}_{name}.jsonl"
            self.command("gptsan.generate.cli", "--model", str(model), *tok, "--spout", str(class_id),
                         "--context", "", "--num_generate", str(self.size.samples_per_class),
                         "--max_generate", str(NUM_CONTEXT - 4), "--top_k", "3", "--seed", str(self.seed),
                         "--output", str(out))
            texts = [json.loads(line)["text"] for line in out.read_text(encoding="utf-8").splitlines()]
            hits = [classify(t) == class_id for t in texts]
            correct += sum(hits)
            total += len(hits)
            self.say(f"{label}, spout {class_id} ({name}): {sum(hits)}/{len(hits)} classified as {name}; "
                     f"e.g. {texts[0][:60]!r}")
        return correct / max(total, 1)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gptsan-demo", description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", default=None,
                        help="where everything is written (must not exist; default demo_output/<date-time>)")
    parser.add_argument("--quick", action="store_true", help="a much shorter run (for tests)")
    parser.add_argument("--seed", type=seed_flag, default=0)
    return parser


@cli_main
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    keep_freed_memory()
    if args.workdir == "":  # `--workdir "$DIR"` with DIR unset: not the default folder, silently
        raise UserError("--workdir: empty; give a folder, or leave the flag out for demo_output/<date-time>")
    if storage.is_remote(args.workdir or ""):  # Path() would make a local folder `gs:` of it
        raise UserError(f"--workdir {args.workdir}: the demo works in a local folder; give a local path")
    workdir = Path(args.workdir or Path("demo_output") / time.strftime("%Y%m%d-%H%M%S")).resolve()
    storage.check_orbax_folder(str(workdir), "--workdir")  # its models are saved by Orbax
    if workdir.exists():
        raise UserError(f"--workdir: {workdir} already exists; give a new folder")
    workdir.mkdir(parents=True)
    try:
        trained, untrained = Pipeline(workdir, QUICK if args.quick else FULL, args.seed).run()
    except KeyboardInterrupt:  # stopped on purpose: no half-made workdir that a rerun with it refuses
        shutil.rmtree(workdir, ignore_errors=True)
        raise
    except UserError as err:  # a step failed: what it wrote so far stays, to look at
        raise UserError(f"{err} (what the demo wrote so far is in {workdir})") from None
    if args.quick:
        print(f"--quick: {QUICK.finetune_steps} fine-tuning steps are too few to learn the classes; the figures "
              "below show that the pipeline ran, not what it learns (run without --quick for that)")
    print(f"demo: spout-conditioned class accuracy {trained:.2f} (without spout training {untrained:.2f})")
    return 0
