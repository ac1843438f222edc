"""Training metrics: TensorBoard event files and a JSONL file in output_dir, and a tqdm progress bar.
Only process 0 writes. For a gs:// output_dir the event files are written locally and copied up at flush
(TensorFlow's own gs:// client ignores STORAGE_EMULATOR_HOST; gptsan's storage goes through fsspec).

The events are written by TensorFlow's `tf.summary.write`, which training has loaded already for tf.data,
as TensorBoard's scalars plugin reads them (a float32 scalar tensor tagged with the `scalars` plugin). The
`tensorboard` package itself is not needed to write them."""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile

import numpy as np

from gptsan import storage
from gptsan.tf_runtime import tensorflow

SCALARS = ("loss", "cross_entropy", "z_loss", "aux_loss", "accuracy", "learning_rate", "grad_norm",
           "loss_scale", "dropped_fraction", "tokens_per_second")
SCALARS_PLUGIN = "scalars"  # TensorBoard's plugin name for scalar summaries


def summarise(metrics: dict, tokens_per_second: float, skipped_steps: int) -> dict:
    """Host values of one step's metrics: scalars, the skipped flag, the steps skipped since the last row
    (this one's included) and per-expert load [S, E]."""
    row = {name: float(np.asarray(metrics[name])) for name in SCALARS if name in metrics}
    row["tokens_per_second"] = tokens_per_second
    row["skipped"] = not bool(np.asarray(metrics["update_applied"]))
    row["skipped_steps"] = skipped_steps
    row["expert_load"] = np.asarray(metrics["expert_load"]).round(4).tolist()
    return row


def eval_summary(rows: list[dict]) -> dict:
    """One evaluation's metrics from its batches' (each a mean over its target tokens): every mean weighted by
    the batch's target tokens, so that each token counts once, and `tokens` their total. A plain mean of the
    batch means let a batch of few targets count as much as a full one, and reported the tokens of an average
    batch."""
    tokens = np.array([float(row["tokens"]) for row in rows])
    weights = tokens / tokens.sum() if tokens.sum() > 0 else np.full(len(rows), 1 / len(rows))
    summary = {name: float(np.dot(weights, [float(row[name]) for row in rows])) for name in rows[0] if name != "tokens"}
    summary["tokens"] = float(tokens.sum())
    return summary


def json_value(value):
    """`value` as strict JSON allows: a non-finite float (the loss of a float16 step that overflowed) is null,
    since NaN and Infinity are not JSON and strict parsers (JavaScript's JSON.parse, for one) reject them."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, list):
        return [json_value(item) for item in value]
    return value


def _row_step(line: str) -> int | None:
    """The step of a metrics.jsonl line, or None for a line that is no whole row."""
    try:
        step = json.loads(line).get("step") if line.endswith("\n") else None
    except (json.JSONDecodeError, AttributeError):
        return None
    return step if isinstance(step, int) else None


class MetricsWriter:
    def __init__(self, output_dir: str, *, enabled: bool, total_steps: int | None, first_step: int,
                 progress: bool = True):
        self.enabled = enabled
        self.output_dir = output_dir
        self.jsonl = storage.join(output_dir, "metrics.jsonl")
        self.remote = storage.is_remote(output_dir)
        self.lines: list[str] = []
        self.bar = None
        self.tb = None
        if not enabled:
            return
        self.tf = tensorflow()
        from tensorflow.core.framework.summary_pb2 import SummaryMetadata

        self.scalar_metadata = SummaryMetadata(plugin_data=SummaryMetadata.PluginData(plugin_name=SCALARS_PLUGIN))
        self.tb_dir = tempfile.mkdtemp(prefix="gptsan-tb-") if self.remote else storage.join(output_dir, "tb")
        self.tb = self.tf.summary.create_file_writer(self.tb_dir)
        self._keep_rows_up_to(first_step)
        if progress:
            from tqdm import tqdm

            self.bar = tqdm(total=total_steps, initial=first_step, unit="step", dynamic_ncols=True)

    def _keep_rows_up_to(self, first_step: int) -> None:
        """Drops the rows of steps after `first_step`, the step this run starts from: a run stopped after its last
        checkpoint (a second Ctrl-C, a kill, a crash) logged steps its successor trains again, which were then in
        the file twice. A line cut by such a stop is dropped too."""
        lines = storage.read_text(self.jsonl).splitlines(keepends=True) if storage.exists(self.jsonl) else []
        kept = [line for line in lines if (step := _row_step(line)) is not None and step <= first_step]
        if self.remote:
            self.lines = kept
        elif kept != lines:
            storage.write_text_atomic(self.jsonl, "".join(kept))

    def write(self, step: int, row: dict, prefix: str = "train") -> None:
        if not self.enabled:
            return
        scalars = {f"{prefix}/{name}": value for name, value in row.items() if isinstance(value, float)}
        for layer, load in enumerate(row.get("expert_load", [])):
            for expert, value in enumerate(load):
                scalars[f"{prefix}/expert_load/layer{layer}/expert{expert}"] = value
        with self.tb.as_default(step=step):
            for tag, value in scalars.items():
                self.tf.summary.write(tag, self.tf.constant(value, self.tf.float32), metadata=self.scalar_metadata)
        line = json.dumps({"step": step, "split": prefix, **{name: json_value(v) for name, v in row.items()}},
                          allow_nan=False) + "\n"
        if self.remote:
            self.lines.append(line)
        else:
            with open(self.jsonl, "a", encoding="utf-8") as f:
                f.write(line)
        if self.bar is not None and prefix == "train":
            self.bar.set_postfix(loss=f"{row['loss']:.4f}", tok_s=f"{row['tokens_per_second']:.0f}")

    def advance(self, steps: int = 1) -> None:
        if self.bar is not None:
            self.bar.update(steps)

    def flush(self) -> None:
        if not self.enabled:
            return
        self.tb.flush()
        if self.remote:
            storage.write_text_atomic(self.jsonl, "".join(self.lines))
            fs, remote_dir = storage.filesystem(storage.join(self.output_dir, "tb"))
            for name in os.listdir(self.tb_dir):
                fs.put(os.path.join(self.tb_dir, name), f"{remote_dir}/{name}")

    def close(self) -> None:
        if not self.enabled:
            return
        self.flush()
        self.tb.close()
        if self.bar is not None:
            self.bar.close()
        if self.remote:
            shutil.rmtree(self.tb_dir, ignore_errors=True)
