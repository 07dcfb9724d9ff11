"""`sparse-attention eval`: score a trained checkpoint on a file or folder of text.

Language models report bits per byte (and the loss in nats per token), classifiers accuracy.
Without --data, the run's own validation split is scored.

  sparse-attention eval --checkpoint runs/notes --data held_out.txt
"""

from __future__ import annotations

import argparse
import json

from sparse_attention.training import runtime
from sparse_attention.training.config import DEVICES, PRECISIONS
from sparse_attention.training.data import ClassificationData, LanguageModelingData, pack_documents, read_documents
from sparse_attention.training.evaluation import evaluate, scored_count
from sparse_attention.training.run_data import prepare_run_data
from sparse_attention.training.state import TOKENIZER_FOLDER
from sparse_attention.training.trained_model import load_trained


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True, metavar="DIR",
                        help="a run folder (its latest checkpoint) or one checkpoint folder")
    parser.add_argument("--data", metavar="PATH", help="text to score: a file, folder or JSON Lines file "
                        "(default: the run's validation split)")
    parser.add_argument("--glob", help="files to read in a --data folder (default: the run's)")
    parser.add_argument("--batch-size", type=int, default=4, help="sequences per batch (default: 4)")
    parser.add_argument("--max-batches", type=int, default=None, help="score only this many batches (default: all)")
    parser.add_argument("--device", choices=DEVICES, default="auto", help="(default: auto)")
    parser.add_argument("--precision", choices=PRECISIONS, default="auto", help="(default: auto)")
    parser.add_argument("--json", action="store_true", help="print the scores as JSON")


def run(args: argparse.Namespace) -> dict:
    device = runtime.pick_device(args.device)
    trained = load_trained(args.checkpoint, device)
    if args.data is None:
        data = prepare_run_data(trained.config, tokenizer_folder=trained.folder / TOKENIZER_FOLDER,
                                label_names=trained.label_names).validation
    else:
        data = _dataset(args, trained)
    scores = evaluate(trained.model, data, token_bytes=trained.tokenizer.token_bytes(), batch_size=args.batch_size,
                      max_batches=args.max_batches, device=device,
                      precision=runtime.pick_precision(args.precision, device))
    # "sequences": those scored; "of_sequences": those in the data (more with --max-batches).
    scores = {"step": trained.step, **scores, "of_sequences": len(data)}
    if args.json:
        print(json.dumps(scores))
    else:
        print(f"{trained.folder} (step {trained.step}) on {args.data or 'its validation split'}: "
              + ", ".join(f"{name} {value:.4f}" if isinstance(value, float) else f"{name} {value}"
                          for name, value in scores.items() if name not in ("step", "sequences", "of_sequences"))
              + f", sequences {scored_count(scores['sequences'], len(data))}")
    return scores


def _dataset(args: argparse.Namespace, trained):
    """All of --data, encoded with the run's tokenizer, as the run's task reads it."""
    config, tokenizer = trained.config, trained.tokenizer
    classify = config.task == "classify"
    documents = read_documents(args.data, glob=args.glob or config.glob, text_field=config.text_field,
                               label_field=config.label_field if classify else None)
    encoded = tokenizer.encode_tensors([document.text for document in documents])
    if not classify:
        return LanguageModelingData(pack_documents(encoded, tokenizer.separator_id), config.seq_len)
    index = {name: i for i, name in enumerate(trained.label_names)}
    unknown = sorted({d.label for d in documents} - set(index))
    if unknown:
        raise ValueError(f"data: labels {unknown[:5]} are not among the model's {trained.label_names}")
    return ClassificationData(encoded, [index[d.label] for d in documents], config.seq_len,
                              config.block_size, tokenizer.separator_id)
