"""One training run: data, model, optimizer, the loop, evaluation and checkpoints."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import random
import shutil
import signal
import statistics
import sys
import threading
import time
from pathlib import Path

import torch
from torch import nn

from sparse_attention import measure
from sparse_attention.layout import BlockLayout
from sparse_attention.models.pretrained import WEIGHTS_FILE
from sparse_attention.optional import require
from sparse_attention.training import context_parallel, distributed, runtime
from sparse_attention.training.checkpoint import CHECKPOINTS_FOLDER, find_checkpoint, save_checkpoint
from sparse_attention.training.config import CONFIG_FILE, TrainConfig, check_supported
from sparse_attention.training.data import PreparedData, ResumableSampler, save_tokenizer
from sparse_attention.training.distributed import Processes
from sparse_attention.training.evaluation import evaluate, forward, to_device
from sparse_attention.training.metrics_log import METRICS_FILE, MetricsLog
from sparse_attention.training.model_factory import build_model, model_config
from sparse_attention.training.run_data import prepare_run_data
from sparse_attention.training.schedule import warmup_cosine
from sparse_attention.training.state import (
    STATE_FILE, TOKENIZER_FOLDER, TRAIN_CONFIG_FILE, full_state_dicts, gather_rng_states,
    load_full_state_dicts, load_labels, load_state, save_labels, set_rng_state,
)

# The signals that stop a run as Ctrl-C does: finish the step, save a checkpoint, stop.
STOP_SIGNALS = tuple(getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGHUP") if hasattr(signal, name))


@dataclasses.dataclass
class RunResult:
    """What a finished (or interrupted) run measured, for the report and the caller."""

    name: str
    out: Path
    config: TrainConfig
    step: int
    final: dict
    density: float
    data: PreparedData
    layout: BlockLayout | None
    interrupted: bool = False
    precision: runtime.Precision | None = None  # what the run computed in, and why
    eval_sequences: int | None = None  # validation sequences the final scores are from


def train(config: TrainConfig, *, resume: bool = False, name: str = "sparse",
          data: PreparedData | None = None) -> RunResult:
    """Trains as config says, in config.out. Under torchrun every process calls this.
    data: the prepared data of an earlier run with the same data settings (the dense
    comparison reuses the sparse run's instead of reading and tokenizing again)."""
    processes = distributed.processes_from_environment()
    device = runtime.pick_device(config.device, processes.local_rank)
    distributed.start(processes, device)
    out = Path(config.out)
    made_here = not out.exists()
    try:
        return _Run(config, processes, device, resume=resume, name=name, data=data).train()
    except BaseException:
        if made_here and processes.is_main:
            _remove_if_useless(out)
        raise


class _Run:
    def __init__(self, config: TrainConfig, processes: Processes, device: torch.device, *,
                 resume: bool, name: str, data: PreparedData | None):
        self.config, self.processes, self.device, self.name = config, processes, device, name
        self.precision_choice = runtime.choose_precision(config.precision, device)
        self.precision = self.precision_choice.name
        check_supported(config, device.type, self.precision)
        self.out = Path(config.out)
        self.checkpoints = self.out / CHECKPOINTS_FOLDER
        checkpoint = find_checkpoint(self.out) if resume else None
        if checkpoint is None and self.processes.is_main:
            _check_fresh_out(self.out)
        distributed.barrier(processes)

        torch.manual_seed(config.seed)
        random.seed(config.seed)
        self.data = data if data is not None else self._prepare_data(checkpoint)
        if processes.is_main:
            stats = self.data.stats
            print(f"{name}: {stats['documents']} documents, {measure.format_bytes(stats['bytes'])} of text, "
                  f"{stats['train_sequences']} train and {stats['validation_sequences']} validation "
                  f"sequences of {config.seq_len} tokens ({self.data.tokenizer.kind} tokens)", file=sys.stderr)
            print(f"{name}: precision {self.precision_choice} on {device.type}", file=sys.stderr)
        torch.manual_seed(config.seed)  # the same initial weights for every pattern and process
        self.model_config = model_config(config, self.data.tokenizer.vocab_size, self.data.num_classes)
        self.model = build_model(self.model_config).to(device)
        self.layout = self._check_layouts()
        self.parallel = context_parallel.setup(config, processes)
        if self.parallel is not None:
            self.parallel.install(self.model)
        self.wrapped = distributed.wrap(self.model, processes, device, config.distributed)
        self.trained = torch.compile(self.wrapped) if config.compile else self.wrapped
        self.optimizer = _adamw(self.wrapped, config, device)
        self.scheduler = warmup_cosine(self.optimizer, config.warmup_steps, config.schedule_steps, config.min_lr_ratio)
        self.scaler = runtime.grad_scaler(device, self.precision)
        # The ranks that share a sequence share its batch.
        data_rank, data_world = ((processes.rank, processes.world_size) if self.parallel is None
                                 else (self.parallel.layout.data_rank, self.parallel.layout.data_world))
        self.sampler = ResumableSampler(len(self.data.train), config.batch_size, config.seed,
                                        rank=data_rank, world_size=data_world)
        self.step, self.elapsed, self.tokens_seen = 0, 0.0, 0
        self.eval_sequences: int | None = None
        if checkpoint is not None:
            self._restore(checkpoint)
        # The generators of the processes differ from here on (dropout), the weights do not.
        if checkpoint is None and processes.distributed:
            torch.manual_seed(config.seed + processes.rank)
        # The run folder is made only now that the settings, the data and the model are good.
        if processes.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
        self.log = MetricsLog(self.out, enabled=processes.is_main, tensorboard=config.tensorboard)
        # Steps after the checkpoint (or any, for a run that died before its first one) will
        # be logged again.
        self.log.truncate_after(self.step)
        if processes.is_main:
            config.save(self.out / CONFIG_FILE)
            save_tokenizer(self.data.tokenizer, self.out / TOKENIZER_FOLDER)
        self.stop_requested = False
        self.stop_signal: str | None = None
        self.last_save = time.monotonic()

    # ---- set-up ----

    def _prepare_data(self, checkpoint: Path | None):
        config = self.config
        tokenizer_folder = checkpoint / TOKENIZER_FOLDER if checkpoint is not None else None
        label_names = load_labels(checkpoint) if checkpoint is not None else None
        shared_folder = self.out / TOKENIZER_FOLDER
        if tokenizer_folder is None and config.tokenizer == "bpe" and self.processes.distributed:
            # One process trains the BPE; the others load it, so that all use the same.
            if self.processes.is_main:
                data = prepare_run_data(self.config)
                save_tokenizer(data.tokenizer, shared_folder)
            distributed.barrier(self.processes)
            if self.processes.is_main:
                return data
            tokenizer_folder = shared_folder
        return prepare_run_data(self.config, tokenizer_folder=tokenizer_folder, label_names=label_names)

    def _check_layouts(self) -> BlockLayout:
        """The first layer's layout at the full length; checks that every process built the
        same layouts (random blocks come from the seed, never from the process)."""
        causal = self.config.task == "lm"
        layouts = [pattern.layout(self.config.seq_len, num_heads=self.config.num_heads, causal=causal)
                   for pattern in self.model_config.layer_patterns()]
        masks = b"".join(layout.mask.numpy().tobytes() for layout in layouts)
        distributed.check_same_on_every_rank("the attention layout", masks, self.processes, self.device)
        self.density = statistics.fmean(layout.density for layout in layouts)
        return layouts[0]

    def _restore(self, checkpoint: Path) -> None:
        state = load_state(checkpoint)
        saved_world = len(state["rng"])
        if saved_world != self.processes.world_size:
            raise ValueError(f"--resume: {checkpoint} was saved by {saved_world} process(es); resume it "
                             f"with as many (this run has {self.processes.world_size}) to continue exactly")
        weights = require("safetensors.torch", purpose="checkpoints").load_file(
            str(checkpoint / WEIGHTS_FILE))
        if self.model_config.tie_embeddings:  # stored once by safetensors' save_model
            weights.setdefault("head.weight", weights.get("transformer.embed.weight"))
            weights.setdefault("transformer.embed.weight", weights.get("head.weight"))
        load_full_state_dicts(self.wrapped, self.optimizer, weights, state["optimizer"], self.processes)
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        self.sampler.load_state_dict(state["sampler"])
        set_rng_state(state["rng"][self.processes.rank])
        self.step, self.elapsed, self.tokens_seen = state["step"], state["elapsed_s"], state["tokens_seen"]
        if self.processes.is_main:
            print(f"resumed {self.out} at step {self.step} from {checkpoint}", file=sys.stderr)

    # ---- the loop ----

    def train(self) -> RunResult:
        config = self.config
        baseline = runtime.start_peak_memory(self.device)
        bar = require("tqdm", purpose="the progress bar").tqdm(total=config.steps, initial=self.step, desc=self.name, unit="step", dynamic_ncols=True,
                   disable=not (config.progress and self.processes.is_main))
        final: dict = {}
        self.last_save = time.monotonic()
        with self._stop_on_signals(), bar, self.log:
            while self.step < config.steps and not self.stop_requested:
                loss, step_time, tokens = self._train_step()
                peak = runtime.peak_memory(self.device)
                peak = None if peak is None or baseline is None else peak - baseline
                self.step += 1
                self.elapsed += step_time
                self.tokens_seen += tokens
                self.log.log("train", self.step, {
                    "loss": loss, "lr": self.scheduler.get_last_lr()[0], "tokens_per_s": tokens / step_time,
                    "step_time_s": step_time, "elapsed_s": self.elapsed, "memory_bytes": peak or 0})
                bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{tokens / step_time:,.0f}",
                                mem=measure.format_bytes(peak), refresh=False)
                bar.update()
                # Every process takes the same branches (a time-based save is a collective too).
                self.stop_requested, save_due = distributed.any_rank_each(
                    [self.stop_requested, self._save_due()], self.processes, self.device)
                last = self.step == config.steps or self.stop_requested
                if self.step % config.eval_every == 0 or (last and self.step == config.steps):
                    final = self._evaluate()
                if self.step % config.save_every == 0 or last or save_due:
                    self._save()
            if not final and not self.stop_requested:  # resuming a finished run: already logged
                final = self._evaluate(log=False)
        if self.stop_requested and self.processes.is_main:
            print(f"{self.stop_signal or 'interrupted'}: stopped at step {self.step}; checkpoint saved in "
                  f"{self.checkpoints}. Continue with --resume --out {self.out}", file=sys.stderr)
        return RunResult(name=self.name, out=self.out, config=config, step=self.step, final=final,
                         density=self.density, data=self.data, layout=self.layout,
                         interrupted=self.stop_requested, precision=self.precision_choice,
                         eval_sequences=self.eval_sequences)

    def _save_due(self) -> bool:
        """Whether save_every_minutes of wall time passed since the last checkpoint."""
        minutes = self.config.save_every_minutes
        return minutes > 0 and time.monotonic() - self.last_save >= minutes * 60

    def _train_step(self) -> tuple[float, float, int]:
        """One optimizer step (grad_accum micro-batches): (mean loss, seconds, tokens)."""
        config = self.config
        start = time.perf_counter()
        total = torch.zeros((), device=self.device)
        tokens = 0
        for micro in range(config.grad_accum):
            batch = to_device(self.data.train.collate(self.sampler.next_batch()), self.device)
            sharded = contextlib.nullcontext()
            if self.parallel is not None:
                batch, sharded = self.parallel.shard_batch(batch), self.parallel.active()
            tokens += batch["input_ids"].numel()
            # Gradients are averaged across processes only on the last micro-batch.
            skip_sync = micro < config.grad_accum - 1 and isinstance(self.wrapped, nn.parallel.DistributedDataParallel)
            with self.wrapped.no_sync() if skip_sync else contextlib.nullcontext(), sharded:
                with runtime.autocast(self.device, self.precision):
                    loss = forward(self.trained, batch).loss / config.grad_accum
                self.scaler.scale(loss).backward()
            total += loss.detach()
        self.scaler.unscale_(self.optimizer)
        torch.nn.utils.clip_grad_norm_(self.wrapped.parameters(), config.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        (loss_sum,) = distributed.sum_over_ranks([total.item()], self.processes, self.device)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return loss_sum / self.processes.world_size, time.perf_counter() - start, tokens * self.processes.world_size

    def _evaluate(self, log: bool = True) -> dict:
        model = distributed.unwrap(self.wrapped)
        values = evaluate(model, self.data.validation, token_bytes=self.data.tokenizer.token_bytes(),
                          batch_size=self.config.batch_size, max_batches=self.config.eval_batches,
                          device=self.device, precision=self.precision, processes=self.processes)
        self.eval_sequences = values.pop("sequences")
        if log:
            self.log.log("eval", self.step, {**values, "elapsed_s": self.elapsed})
        return values

    def _save(self) -> None:
        model_state, optimizer_state = full_state_dicts(self.wrapped, self.optimizer, self.processes)
        state = {"step": self.step, "elapsed_s": self.elapsed, "tokens_seen": self.tokens_seen,
                 "optimizer": optimizer_state, "scheduler": self.scheduler.state_dict(),
                 "scaler": self.scaler.state_dict(), "sampler": self.sampler.state_dict(),
                 "rng": gather_rng_states(self.processes)}
        if self.processes.is_main:
            model = distributed.unwrap(self.wrapped)
            if self.processes.distributed:  # a plain copy holds the gathered weights
                model = build_model(self.model_config)
                model.load_state_dict(model_state)

            def write(folder: Path) -> None:
                model.save_pretrained(folder)
                self.config.save(folder / TRAIN_CONFIG_FILE)
                save_tokenizer(self.data.tokenizer, folder / TOKENIZER_FOLDER)
                save_labels(folder, self.data.label_names)
                torch.save(state, folder / STATE_FILE)

            save_checkpoint(self.checkpoints, self.step, write, keep=self.config.keep_checkpoints)
        distributed.barrier(self.processes)
        self.last_save = time.monotonic()

    @contextlib.contextmanager
    def _stop_on_signals(self):
        """A first Ctrl-C, SIGTERM or SIGHUP finishes the current step, saves a checkpoint and
        stops; a second one acts as it would without this (Ctrl-C: KeyboardInterrupt at once,
        without saving; SIGTERM, SIGHUP: the process ends). The previous handlers come back
        afterwards."""
        if not _in_main_thread():
            yield
            return
        previous = {number: signal.getsignal(number) for number in STOP_SIGNALS}

        def request_stop(number, frame):
            name = signal.Signals(number).name
            if self.stop_requested:
                _restore_handlers(previous)
                if number == signal.SIGINT:
                    raise KeyboardInterrupt
                os.kill(os.getpid(), number)
                return
            self.stop_requested, self.stop_signal = True, name
            if self.processes.is_main:
                again = "Ctrl-C" if number == signal.SIGINT else name
                print(f"\n{name}: stopping after this step and saving a checkpoint "
                      f"({again} again to stop now, without saving)", file=sys.stderr)

        for number in STOP_SIGNALS:
            signal.signal(number, request_stop)
        try:
            yield
        finally:
            _restore_handlers(previous)


def _restore_handlers(previous: dict) -> None:
    for number, handler in previous.items():
        # None: a handler installed outside Python, which cannot be put back from here.
        signal.signal(number, signal.SIG_DFL if handler is None else handler)


def _adamw(model: nn.Module, config: TrainConfig, device: torch.device) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices only (not on biases or norms' gains)."""
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    decayed = {id(p) for p in decay}
    rest = [p for p in model.parameters() if p.requires_grad and id(p) not in decayed]
    groups = [{"params": decay, "weight_decay": config.weight_decay}, {"params": rest, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=config.lr, betas=(config.beta1, config.beta2),
                             foreach=device.type == "cuda")


def _check_fresh_out(out: Path) -> None:
    """A new run never writes over an earlier run's checkpoints."""
    checkpoints = out / CHECKPOINTS_FOLDER
    if checkpoints.is_dir() and any(checkpoints.iterdir()):
        raise FileExistsError(f"out: {out} already holds a run's checkpoints; continue it with --resume "
                              "or choose another --out")
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"out: {out} is a file; --out takes a folder")


def _remove_if_useless(out: Path) -> None:
    """Removes the run folder a failed run made, unless it holds a checkpoint or a logged
    training step (a run that failed in its set-up or its first step leaves nothing)."""
    if not out.is_dir() or (out / CHECKPOINTS_FOLDER).exists():
        return
    metrics = out / METRICS_FILE
    if metrics.is_file() and '"kind": "train"' in metrics.read_text(encoding="utf-8", errors="replace"):
        return
    shutil.rmtree(out, ignore_errors=True)


def _in_main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()
